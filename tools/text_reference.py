"""What the text-conditioned references' tools share (PixArt: ``tools/train_pixart_reference.py``,
MMDiT: ``tools/train_mmdit_reference.py``): the captions as tokens, the loop's text ``forward``, the
training run that writes an asset folder, and the FP evaluation with its noise bars.

Both models are trained with their tiny text encoder as one module (``model.transformer``,
``model.text``) called as ``model(x_t, timesteps, ids, mask)``, on the digits with the captions of
:data:`~vq4dit.pixart_reference.TEMPLATES` (the empty prompt where the loop drops the label).
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tools.diffusion_training import Build, DiTTrainingConfig, Objective, record_noise_bars, spread, train_dit
from tools.train_reference import random_shift, save_grid_png
from vq4dit.pixart_reference import TEMPLATES, calibration_prompts, prompt_text, reference_tokenizer
from vq4dit.reference import NUM_CLASSES, digits_dataset
from vq4dit.sampling import NULL_CLASS


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
    drawn from the loop's generator; ``ids / masks [NUM_CLASSES + 1, templates, T]``."""

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


def train_text_reference(out: Path, config: DiTTrainingConfig, checkpoint: Path, threads: int, stop_at: int | None,
                         build: Build, objective: Objective | None = None,
                         write_extra: Callable[[Path], None] | None = None, objective_text: str = "") -> dict:
    """Train a text reference (``build``: transformer + text encoder; ``config.max_shift`` px random
    shifts) on the shared loop, resumable from ``checkpoint``; write ``out``: FP16 ``transformer/``,
    ``text_encoder/``, whatever ``write_extra(out)`` writes, the calibration prompts and
    ``training.json``. Returns the training record."""
    import diffusers

    from vq4dit.prompts.tiny_encoder import save_tiny_encoder

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_dataset(config.sample_size)
    ids, masks = caption_tokens()

    def shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_shift(batch, config.max_shift, generator)

    model, stats = train_dit(config, images, labels, augment=shift, checkpoint=checkpoint, checkpoint_every=25,
                             stop_at=stop_at, build=build, forward=text_forward_of(ids, masks), objective=objective)
    model.transformer.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    save_tiny_encoder(model.text, reference_tokenizer(), out / "text_encoder")
    if write_extra is not None:
        write_extra(out)
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
        **({"objective": objective_text} if objective_text else {}),
        "templates": list(TEMPLATES),
        "config": asdict(config), "stop_at": stop_at, "weights_dtype": "float16", **stats,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate_text_reference(out: Path, family, model: nn.Module, sampler: str, seeds: tuple[int, ...] = (0, 1, 2),
                            per_class: int = 16, num_steps: int = 25, guidance_scale: float = 4.0, threads: int = 1,
                            clip_denoised: bool = True) -> dict:
    """FP prompt accuracy, FID to the digits, FP-against-FP noise bars and ``samples_fp.png`` of
    ``model`` (of ``family``) on ``out``'s calibration prompts; written to ``training.json``
    (``noise_bars``, ``sampler`` describing the sampling). Sample ``n`` of seed ``s``: prompt ``n
    mod 40`` (digit ``n mod 10``), noise seed ``s * 10^6 + n``."""
    from vq4dit.families.guidance import sample_conditioned
    from vq4dit.metrics import ClassifierFeatures, SampleMetrics
    from vq4dit.prompts import load_prompt_embeds, prompt_condition
    from vq4dit.reference import load_reference_classifier
    from vq4dit.sampling import SamplerConfig

    torch.set_num_threads(threads)
    classifier = load_reference_classifier()
    prompts = load_prompt_embeds(out / "calibration_prompts.safetensors")
    count = prompts["prompt_embeds"].shape[0]
    real, _ = digits_dataset(model.config.sample_size)
    features, logits = ClassifierFeatures(classifier, "features"), ClassifierFeatures(classifier, "logits")
    index = torch.arange(NUM_CLASSES * per_class) % count
    labels = index % NUM_CLASSES
    config = SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, clip_denoised=clip_denoised)
    samples, per_seed = {}, {}
    for seed in seeds:
        start = time.perf_counter()
        samples[seed] = sample_conditioned(family, model, prompt_condition(prompts, index),
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
        "sampler": sampler,
        "samples_per_seed": len(index), "features": "the digits reference classifier's penultimate layer",
        "per_seed": per_seed,
        "fid_to_real": spread([v["fid_to_real"] for v in per_seed.values()]),
        "prompt_accuracy": spread([v["prompt_accuracy"] for v in per_seed.values()]),
        "fp_vs_fp_fid": {"pairs": pairs, **spread(list(pairs.values()))} if pairs else None,
    }
    return record_noise_bars(out, report, ("fid_to_real", "prompt_accuracy", "fp_vs_fp_fid"))
