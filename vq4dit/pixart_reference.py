"""The shipped text-conditioned reference: a tiny PixArt on the digits, with its own text path.

The third model of the reference suite (issues 17 and 21): a ``PixArtTransformer2DModel``
(adaLN-single, self- and cross-attention, learned sigma, epsilon on 1000 linear betas like
PixArt-α/Σ) trained from scratch on scikit-learn's digits (16x16, pixel space, no VAE) from captions
such as "a handwritten seven" or "the number 7" (:data:`TEMPLATES`), encoded by a tiny word-level
text encoder (:mod:`vq4dit.prompts.tiny_encoder`) trained with it. Classifier-free guidance uses
the empty prompt. Samples are judged by the digits reference's classifier (prompt accuracy: the
digit a prompt names) and its features (FID).

``vq4dit/assets/pixart_reference/`` is laid out like a diffusers pipeline folder:
``transformer/`` (FP16 EMA weights), ``text_encoder/``, ``calibration_prompts.txt`` and the
embeddings file ``calibration_prompts.safetensors`` (written by ``python -m vq4dit.prompts encode
--pipeline pixart_reference``; prompt ``i`` names digit ``i mod 10``), ``training.json`` and
``samples_fp.png``. Load with ``load_dit("pixart_reference")``. Training:
``python tools/train_pixart_reference.py train``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .prompts.tiny_encoder import END, PAD, TinyTextEncoder, WordTokenizer, load_tiny_encoder
from .reference import NUM_CLASSES

__all__ = ["CALIBRATION_PROMPTS", "PIXART_ASSETS_DIR", "PIXART_REFERENCE_NAME", "TEMPLATES", "VOCABULARY",
           "calibration_prompts", "load_pixart_reference_model", "load_pixart_reference_text", "prompt_text"]

PIXART_REFERENCE_NAME = "pixart_reference"
PIXART_ASSETS_DIR = Path(__file__).resolve().parent / "assets" / PIXART_REFERENCE_NAME
CALIBRATION_PROMPTS = PIXART_ASSETS_DIR / "calibration_prompts.safetensors"

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("{word}", "{numeral}", "a {word}", "the digit {word}", "the number {numeral}", "a handwritten {word}",
             "an image of the digit {numeral}", "{word} written by hand")
FILLERS = ("a", "an", "the", "digit", "number", "handwritten", "image", "of", "written", "by", "hand")
VOCABULARY = [PAD, END, *WORDS, *(str(d) for d in range(10)), *FILLERS]
MAX_TOKENS = 8  # the longest template is 6 words + <end>


def prompt_text(digit: int, template: int) -> str:
    """The caption of ``digit`` (0-9) in template ``template`` of :data:`TEMPLATES`."""
    return TEMPLATES[template].format(word=WORDS[digit], numeral=str(digit))


def calibration_prompts(count: int = 40) -> tuple[list[str], torch.Tensor]:
    """``count`` captions and their digits ``[count]``: prompt ``i`` names digit ``i mod 10`` in
    template ``i mod 8`` (all 40 (digit, template) pairs once in the first 40)."""
    digits = torch.arange(count) % NUM_CLASSES
    return [prompt_text(int(d), i % len(TEMPLATES)) for i, d in enumerate(digits)], digits


def reference_tokenizer() -> WordTokenizer:
    """The word tokenizer of the reference's vocabulary (``MAX_TOKENS`` tokens)."""
    return WordTokenizer(VOCABULARY, MAX_TOKENS)


def new_text_encoder(channels: int) -> TinyTextEncoder:
    """An untrained text encoder for the reference vocabulary (tokens N(0, 1), positions N(0, 0.02))."""
    encoder = TinyTextEncoder(len(VOCABULARY), MAX_TOKENS, channels)
    nn.init.normal_(encoder.position, std=0.02)
    return encoder


def load_pixart_reference_model(path: str | Path = PIXART_ASSETS_DIR) -> nn.Module:
    """The reference ``PixArtTransformer2DModel`` in eval mode, float32 (stored FP16), CPU."""
    from .models import load_dit

    return load_dit(str(Path(path) / "transformer")).float()  # .to(float32) would warn about fp32 modules


def load_pixart_reference_text(path: str | Path = PIXART_ASSETS_DIR) -> tuple[WordTokenizer, TinyTextEncoder]:
    """``(tokenizer, encoder)`` of the reference's text path (eval mode)."""
    return load_tiny_encoder(Path(path) / "text_encoder")
