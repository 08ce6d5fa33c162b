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

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python tools/NAME.py`: the repository root on the path, for tools.*
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.diffusion_training import DiTTrainingConfig, xavier_init_
from tools.text_reference import (  # noqa: F401  (caption_tokens, text_forward_of: this tool's API too)
    caption_tokens, evaluate_text_reference, text_forward_of, train_text_reference, write_calibration_prompts,
)
from vq4dit.pixart_reference import PIXART_ASSETS_DIR, new_text_encoder


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


def train(
    out: Path = PIXART_ASSETS_DIR,
    dit: PixArtReferenceConfig = PixArtReferenceConfig(),
    checkpoint: Path = Path("pixart_reference_training.ckpt"),
    threads: int = 1,
    stop_at: int | None = None,
) -> dict:
    """Train the PixArt reference and its text encoder (resumable from ``checkpoint``); write ``out``.

    Args:
        out: artefact folder.
        dit: settings of the transformer, the text encoder and the training (``--dit.train_steps N``;
            not ``config``, which is the command line's config-file option).
        checkpoint: training-state file (resumed when present, kept afterwards).
        threads: torch CPU threads.
        stop_at: end after this many of ``dit.train_steps`` (see ``train_dit``).
    """
    return train_text_reference(Path(out), dit, checkpoint, threads, stop_at, build_text_dit)


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
    from vq4dit.pixart_reference import load_pixart_reference_model

    sampler = f"DDPM {num_steps} steps, learned variance, x0 clipped, cfg {guidance_scale:g} against the empty prompt"
    return evaluate_text_reference(Path(out), PIXART, load_pixart_reference_model(out), sampler, seeds, per_class,
                                   num_steps, guidance_scale, threads)


def main(args: list[str] | None = None) -> None:
    """``python tools/train_pixart_reference.py {train,evaluate} ...``."""
    from jsonargparse import auto_cli

    auto_cli({"train": train, "evaluate": evaluate}, args=args)


if __name__ == "__main__":
    main()
