"""The shipped MMDiT reference: a tiny SD3-style joint-attention transformer on the digits (issue 22).

The fourth model of the reference suite: an ``SD3Transformer2DModel`` (joint image-text attention,
adaLN-Zero modulation of both streams from the timestep and a pooled text embedding, qk RMSNorm as
SD3.5) trained from scratch with rectified flow (SD3's objective: ``x_s = (1 - s) x0 + s noise``,
velocity ``noise - x0``, logit-normal ``s``) on scikit-learn's digits (16x16, pixel space, no VAE),
from the PixArt reference's captions (:data:`~vq4dit.pixart_reference.TEMPLATES`: "a handwritten
seven", "the number 7", ...). Its text path is the same tiny word-level encoder
(:mod:`vq4dit.prompts.tiny_encoder`), trained with it; the pooled embedding (SD3: CLIP's pooled
output) is the mean of the prompt's token embeddings (:func:`~vq4dit.prompts.tiny_encoder.mean_pool`).
Classifier-free guidance uses the empty prompt. Sampled like ``StableDiffusion3Pipeline``: Euler
flow matching with the shift of its ``scheduler/scheduler_config.json`` (1.0: 64 image tokens).

``vq4dit/assets/mmdit_reference/`` is laid out like a diffusers pipeline folder:
``transformer/`` (FP16 EMA weights), ``text_encoder/``, ``scheduler/``, ``calibration_prompts.txt``
and its embeddings ``calibration_prompts.safetensors`` (``python -m vq4dit.prompts encode --pipeline
mmdit_reference``; prompt ``i`` names digit ``i mod 10``), ``training.json`` and ``samples_fp.png``.
Load with ``load_dit("mmdit_reference")``. Training: ``python tools/train_mmdit_reference.py train``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .pixart_reference import MAX_TOKENS, VOCABULARY
from .prompts.tiny_encoder import TinyTextEncoder, WordTokenizer, load_tiny_encoder, mean_pool

__all__ = ["MMDIT_ASSETS_DIR", "MMDIT_CALIBRATION_PROMPTS", "MMDIT_REFERENCE_NAME", "MMDIT_SHIFT", "JointTextDiT",
           "load_mmdit_reference_model", "load_mmdit_reference_text", "new_pooled_text_encoder"]

MMDIT_REFERENCE_NAME = "mmdit_reference"
MMDIT_ASSETS_DIR = Path(__file__).resolve().parent / "assets" / MMDIT_REFERENCE_NAME
MMDIT_CALIBRATION_PROMPTS = MMDIT_ASSETS_DIR / "calibration_prompts.safetensors"
MMDIT_SHIFT = 1.0  # scheduler_config.json "shift": 16x16 px, 64 tokens (SD3's 3.0 is for 4096 latent tokens)


def new_pooled_text_encoder(channels: int) -> TinyTextEncoder:
    """An untrained mean-pooled text encoder for the reference vocabulary (tokens N(0, 1),
    positions N(0, 0.02))."""
    encoder = TinyTextEncoder(len(VOCABULARY), MAX_TOKENS, channels, pooled="mean")
    nn.init.normal_(encoder.position, std=0.02)
    return encoder


class JointTextDiT(nn.Module):
    """An ``SD3Transformer2DModel`` and its text encoder as one trained module (one optimizer, one EMA)."""

    def __init__(self, transformer: nn.Module, text: TinyTextEncoder) -> None:
        super().__init__()
        self.transformer, self.text = transformer, text

    def forward(self, xt: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The velocity ``[B, C, H, W]`` on ``xt [B, C, H, W]``, ``timesteps [B]`` (``s * 1000``) and
        token ``ids / mask [B, T]``; called as the SD3 pipeline calls it (the mask only pools)."""
        embeds = self.text(ids, attention_mask=mask)[0]
        return self.transformer(xt, encoder_hidden_states=embeds, pooled_projections=mean_pool(embeds, mask),
                                timestep=timesteps).sample


def load_mmdit_reference_model(path: str | Path = MMDIT_ASSETS_DIR) -> nn.Module:
    """The reference ``SD3Transformer2DModel`` in eval mode, float32 (stored FP16), CPU."""
    from .models import load_dit

    return load_dit(str(Path(path) / "transformer")).float()


def load_mmdit_reference_text(path: str | Path = MMDIT_ASSETS_DIR) -> tuple[WordTokenizer, TinyTextEncoder]:
    """``(tokenizer, encoder)`` of the reference's text path (eval mode, ``pooled == "mean"``)."""
    return load_tiny_encoder(Path(path) / "text_encoder")
