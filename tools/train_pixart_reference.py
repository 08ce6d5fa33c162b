"""Training of the shipped PixArt reference and its text path (see :mod:`vq4dit.pixart_reference`).

``python tools/train_pixart_reference.py train`` trains a tiny ``PixArtTransformer2DModel`` and its
word-level text encoder together on the shared loop (:mod:`tools.diffusion_training`: hybrid loss,
warm-up + cosine lr, AdamW, EMA, resumable ``--checkpoint``) on the digits with captions drawn
from :data:`~vq4dit.pixart_reference.TEMPLATES` (the empty prompt with probability
``label_dropout``), then writes ``vq4dit/assets/pixart_reference/`` (FP16 transformer, text encoder,
the calibration prompts and their embeddings, ``training.json``). FP quality, FP-against-FP noise
bars and ``samples_fp.png``: ``python tools/train_pixart_reference.py evaluate``.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tools.diffusion_training import DiTTrainingConfig, record_noise_bars, spread, train_dit, xavier_init_
from tools.train_reference import random_shift, save_grid_png
from vq4dit.pixart_reference import (
    PIXART_ASSETS_DIR, TEMPLATES, calibration_prompts, new_text_encoder, prompt_text, reference_tokenizer,
)
from vq4dit.reference import NUM_CLASSES, digits_dataset
from vq4dit.sampling import NULL_CLASS


@dataclass
class PixArtReferenceConfig(DiTTrainingConfig):
    """The PixArt reference: 4 blocks x 128 (4 heads x 32) like the digits DiT, with cross-attention
    to captions of ``caption_channels`` channels; random shift augmentation of ``max_shift`` px.
    The text path learns more slowly than the digits DiT's label table (cross-attention starts
    closed): 1500 steps gave prompt accuracy 0.62 at cfg 4 (the digits DiT: 1.0 after 1200), hence
    3000 steps, about 45 min on one thread."""

    train_steps: int = 3000
    caption_channels: int = 32
    max_shift: int = 1


class TextConditionedDiT(nn.Module):
    """The transformer and its text encoder as one trained module (one optimizer, one EMA)."""

    def __init__(self, transformer: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.transformer, self.text = transformer, text

    def forward(self, xt: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, 2C, H, W]`` on ``xt [B, C, H, W]``, ``timesteps [B]`` and token ``ids / mask [B, T]``."""
        embeds = self.text(ids, attention_mask=mask)[0]
        return self.transformer(xt, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@torch.no_grad()
def init_pixart_weights_(model: nn.Module) -> nn.Module:
    """PixArt's initialisation (from the paper's description), in place: Xavier-uniform Linears and
    patch projection with zero bias; N(0, 0.02) timestep MLP, global adaLN and caption projection;
    zero cross-attention outputs and output layer, so every block starts from self-attention only."""
    xavier_init_(model)
    embedder = model.adaln_single.emb.timestep_embedder
    for layer in (embedder.linear_1, embedder.linear_2, model.adaln_single.linear,
                  model.caption_projection.linear_1, model.caption_projection.linear_2):
        nn.init.normal_(layer.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def build_text_dit(config: PixArtReferenceConfig, in_channels: int) -> TextConditionedDiT:
    """A freshly initialised learned-sigma PixArt and text encoder (``caption_channels`` wide)."""
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
        in_channels=in_channels, out_channels=2 * in_channels, num_layers=config.num_layers,
        cross_attention_dim=config.num_attention_heads * config.attention_head_dim,
        caption_channels=config.caption_channels, sample_size=config.sample_size, patch_size=config.patch_size,
        norm_type="ada_norm_single", use_additional_conditions=False, num_embeds_ada_norm=1000,
    )
    return TextConditionedDiT(init_pixart_weights_(transformer), new_text_encoder(config.caption_channels))


def caption_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks ``[NUM_CLASSES + 1, len(TEMPLATES), T]`` of every caption; row
    ``NUM_CLASSES`` is the empty prompt (every template)."""
    tokenizer = reference_tokenizer()
    texts = [prompt_text(d, t) if d < NUM_CLASSES else "" for d in range(NUM_CLASSES + 1) for t in range(len(TEMPLATES))]
    tokens = tokenizer(texts)
    shape = (NUM_CLASSES + 1, len(TEMPLATES), -1)
    return tokens["input_ids"].view(shape), tokens["attention_mask"].view(shape)


def text_forward_of(ids: torch.Tensor, masks: torch.Tensor):
    """The loop's ``forward``: each item's digit (or ``NULL_CLASS``: the empty prompt) in a template
    drawn from the loop's generator."""

    def forward(model, xt, timesteps, labels, generator):
        template = torch.randint(0, ids.shape[1], (len(labels),), generator=generator)
        row = torch.where(labels == NULL_CLASS, NUM_CLASSES, labels)
        return model(xt, timesteps, ids[row, template], masks[row, template])

    return forward


def write_calibration_prompts(out: Path, count: int = 40) -> None:
    """``calibration_prompts.txt`` and its embeddings file (each prompt's digit in its metadata),
    through the encode command's code."""
    from vq4dit.prompts.encode import encode_file

    texts, digits = calibration_prompts(count)
    (out / "calibration_prompts.txt").write_text("\n".join(texts) + "\n")
    encode_file(str(out), out / "calibration_prompts.txt", out / "calibration_prompts.safetensors",
                max_length=None, progress=False, classes=digits.tolist())


def train(
    out: Path = PIXART_ASSETS_DIR,
    config: PixArtReferenceConfig = PixArtReferenceConfig(),
    checkpoint: Path = Path("pixart_reference_training.ckpt"),
    threads: int = 1,
    stop_at: int | None = None,
) -> dict:
    """Train the PixArt reference and its text encoder (resumable from ``checkpoint``); write ``out``.

    Args:
        out: artefact folder.
        config: settings of the transformer, the text encoder and the training.
        checkpoint: training-state file (resumed when present, kept afterwards).
        threads: torch CPU threads.
        stop_at: end after this many of ``config.train_steps`` (see ``train_dit``).
    """
    import diffusers

    from vq4dit.prompts.tiny_encoder import save_tiny_encoder

    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_dataset(config.sample_size)
    ids, masks = caption_tokens()

    def shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_shift(batch, config.max_shift, generator)

    model, stats = train_dit(config, images, labels, augment=shift, checkpoint=checkpoint, checkpoint_every=25,
                             stop_at=stop_at, build=build_text_dit, forward=text_forward_of(ids, masks))
    model.transformer.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    save_tiny_encoder(model.text, reference_tokenizer(), out / "text_encoder")
    write_calibration_prompts(out)
    print(f"trained in {stats['wall_seconds']:.0f} s, final loss {stats['final_loss']:.4f}", flush=True)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {threads} torch thread(s), "
                   "2 cores shared with other jobs",
        "data": "sklearn load_digits, 1797 images, bilinear 8->16 px, [-1, 1], random shift; captions: each "
                f"batch item's digit in one of {len(TEMPLATES)} templates drawn per step, the empty prompt with "
                f"probability {config.label_dropout}",
        "templates": list(TEMPLATES),
        "config": asdict(config), "stop_at": stop_at, "weights_dtype": "float16", **stats,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate(
    out: Path = PIXART_ASSETS_DIR,
    seeds: tuple[int, ...] = (0, 1, 2),
    per_class: int = 16,
    num_steps: int = 25,
    guidance_scale: float = 4.0,
    threads: int = 1,
) -> dict:
    """FP prompt accuracy, FID to the digits, FP-against-FP noise bars and ``samples_fp.png``;
    written to ``training.json`` (``noise_bars``). Sample ``n`` of seed ``s``: prompt ``n mod 40``
    of the calibration prompts (digit ``n mod 10``), noise seed ``s * 10^6 + n``."""
    from vq4dit.families import PIXART
    from vq4dit.families.guidance import sample_conditioned
    from vq4dit.metrics import ClassifierFeatures, SampleMetrics
    from vq4dit.pixart_reference import load_pixart_reference_model
    from vq4dit.prompts import load_prompt_embeds, prompt_condition
    from vq4dit.reference import load_reference_classifier
    from vq4dit.sampling import SamplerConfig

    torch.set_num_threads(threads)
    out = Path(out)
    model, classifier = load_pixart_reference_model(out), load_reference_classifier()
    prompts = load_prompt_embeds(out / "calibration_prompts.safetensors")
    count = prompts["prompt_embeds"].shape[0]
    real, _ = digits_dataset(model.config.sample_size)
    features, logits = ClassifierFeatures(classifier, "features"), ClassifierFeatures(classifier, "logits")
    index = torch.arange(NUM_CLASSES * per_class) % count
    labels = index % NUM_CLASSES
    config = SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, clip_denoised=True)
    samples, per_seed = {}, {}
    for seed in seeds:
        start = time.perf_counter()
        samples[seed] = sample_conditioned(PIXART, model, prompt_condition(prompts, index),
                                           [seed * 10**6 + n for n in range(len(index))], config).clamp(-1, 1)
        metrics = SampleMetrics(features, logits, real_images=(real + 1) / 2, class_accuracy=True)
        metrics.update((samples[seed] + 1) / 2, labels)
        result = metrics.compute()
        per_seed[seed] = {"fid_to_real": float(result["fid"]), "prompt_accuracy": float(result["class_accuracy"]),
                          "wall_seconds": round(time.perf_counter() - start, 1)}
        print(f"seed {seed}: {per_seed[seed]}", flush=True)
    pairs = {}
    for a, b in zip(seeds, seeds[1:] + seeds[:1]):
        if a != b:
            metrics = SampleMetrics(features)
            metrics.update((samples[b] + 1) / 2, labels, fp_images=(samples[a] + 1) / 2)
            pairs[f"{a}-{b}"] = float(metrics.compute()["fid_to_fp"])

    first = samples[seeds[0]]
    order = torch.argsort(labels * len(labels) + torch.arange(len(labels)))  # rows = digits 0-9
    save_grid_png({f"FP, cfg {guidance_scale:g}": first[order].view(NUM_CLASSES, per_class, *first.shape[1:])[:, :8]
                   .reshape(-1, *first.shape[1:])}, out / "samples_fp.png", columns=8)
    report = {
        "sampler": f"DDPM {num_steps} steps, learned variance, x0 clipped, cfg {guidance_scale:g} against the empty prompt",
        "samples_per_seed": len(index), "features": "the digits reference classifier's penultimate layer",
        "per_seed": per_seed,
        "fid_to_real": spread([v["fid_to_real"] for v in per_seed.values()]),
        "prompt_accuracy": spread([v["prompt_accuracy"] for v in per_seed.values()]),
        "fp_vs_fp_fid": {"pairs": pairs, **spread(list(pairs.values()))} if pairs else None,
    }
    return record_noise_bars(out, report, ("fid_to_real", "prompt_accuracy", "fp_vs_fp_fid"))


def main(args: list[str] | None = None) -> None:
    """``python tools/train_pixart_reference.py {train,evaluate} ...``."""
    from jsonargparse import auto_cli

    auto_cli({"train": train, "evaluate": evaluate}, args=args)


if __name__ == "__main__":
    main()
