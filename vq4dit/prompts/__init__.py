"""Prompt embeddings for text-conditioned models: the ``--data.prompt_embeds`` file, read and checked.

The file is a safetensors file with exactly four tensors (what a pipeline's ``encode_prompt``
returns, once for N prompts and once for the negative prompt):

======================================  ============  ================================================
key                                     shape         dtype
======================================  ============  ================================================
``prompt_embeds``                       ``[N, T, C]``  float (any floating dtype; read as float32)
``prompt_attention_mask``               ``[N, T]``     int32 / int64, values 0 / 1
``negative_prompt_embeds``              ``[1, T, C]``  float
``negative_prompt_attention_mask``      ``[1, T]``     int32 / int64, values 0 / 1
======================================  ============  ================================================

Every mistake is a ``ValueError`` naming the file and the problem (the CLI prints it as one
``error:`` line) before any heavy work; :func:`check_prompts_fit` checks the file against the model
(its family is text-conditioned, ``C`` is its ``caption_channels``). ``python -m vq4dit.prompts
encode`` writes such a file from a prompt text file (:mod:`vq4dit.prompts.encode`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..families import TextPrompts, family_of

CLASSES_FIELD = "vq4dit_prompt_classes"  # optional metadata: JSON list, the class each prompt names
KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
_MASK_DTYPES = (torch.int32, torch.int64)


def _check(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first problem of ``tensors`` (read from ``path``)."""
    where = f"prompt embeddings {path}"
    missing, extra = [k for k in KEYS if k not in tensors], sorted(set(tensors) - set(KEYS))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has extra {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{where} {' and '.join(parts)}; expected exactly {', '.join(KEYS)}")
    embeds, mask = tensors["prompt_embeds"], tensors["prompt_attention_mask"]
    negative, negative_mask = tensors["negative_prompt_embeds"], tensors["negative_prompt_attention_mask"]
    for key, tensor, rank, shape in (("prompt_embeds", embeds, 3, "[N, T, C]"), ("prompt_attention_mask", mask, 2, "[N, T]"),
                                     ("negative_prompt_embeds", negative, 3, "[1, T, C]"),
                                     ("negative_prompt_attention_mask", negative_mask, 2, "[1, T]")):
        if tensor.ndim != rank:
            raise ValueError(f"{where}: {key} is {tuple(tensor.shape)}, expected {shape}")
        if key.endswith("mask") and tensor.dtype not in _MASK_DTYPES:
            raise ValueError(f"{where}: {key} is {tensor.dtype}, expected int32 or int64 (0 / 1 per token)")
        if key.endswith("embeds") and not tensor.is_floating_point():
            raise ValueError(f"{where}: {key} is {tensor.dtype}, expected a floating dtype")
    count, tokens, channels = embeds.shape
    if count == 0 or tokens == 0 or channels == 0:
        raise ValueError(f"{where}: prompt_embeds is {tuple(embeds.shape)}: no prompts (N), tokens (T) or channels (C)")
    if mask.shape != (count, tokens):
        raise ValueError(f"{where}: prompt_attention_mask is {tuple(mask.shape)}, prompt_embeds {tuple(embeds.shape)}: "
                         f"expected [N, T] = {[count, tokens]}")
    if negative.shape != (1, tokens, channels) or negative_mask.shape != (1, tokens):
        raise ValueError(f"{where}: negative_prompt_embeds {tuple(negative.shape)} / negative_prompt_attention_mask "
                         f"{tuple(negative_mask.shape)} do not match prompt_embeds {tuple(embeds.shape)}: expected "
                         f"[1, T, C] = {[1, tokens, channels]} and [1, T] = {[1, tokens]}")
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(f"{where}: {key} holds NaN/Inf")
    for key in ("prompt_attention_mask", "negative_prompt_attention_mask"):
        if not bool(((tensors[key] == 0) | (tensors[key] == 1)).all()):
            raise ValueError(f"{where}: {key} holds values other than 0 and 1")


def load_prompt_embeds(path: str | Path) -> dict[str, torch.Tensor]:
    """The four checked tensors of a prompt-embeddings file: embeddings as float32 (``[N, T, C]``,
    ``[1, T, C]``), masks as int64 (``[N, T]``, ``[1, T]``).

    Raises:
        ValueError: the file is missing or unreadable, or its keys, ranks, dtypes, shapes or values
            are wrong (the message names the file and the problem).
    """
    path = str(path)
    if not Path(path).is_file():
        raise ValueError(f"prompt embeddings {path} do not exist (expected a .safetensors file with {', '.join(KEYS)})")
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError) as error:
        raise ValueError(f"prompt embeddings {path} are not a readable safetensors file: {error}") from None
    _check(path, tensors)
    return {key: tensors[key].float() if key.endswith("embeds") else tensors[key].long() for key in KEYS}


def prompt_classes(path: str | Path) -> torch.Tensor | None:
    """The class each prompt of a (checked) embeddings file names, ``[N]`` int64, from its optional
    metadata ``vq4dit_prompt_classes`` (the shipped reference's files carry it; ``train.py test``
    then scores class accuracy); None when the file has none.

    Raises:
        ValueError: the metadata is not a list of N non-negative integers.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(CLASSES_FIELD)
        count = handle.get_slice("prompt_embeds").get_shape()[0]
    if text is None:
        return None
    try:
        classes = json.loads(text)
    except ValueError:
        classes = None
    if not (isinstance(classes, list) and len(classes) == count and all(isinstance(c, int) and c >= 0 for c in classes)):
        raise ValueError(f"prompt embeddings {path}: metadata {CLASSES_FIELD} must list one class (an integer >= 0) "
                         f"per prompt ({count})")
    return torch.tensor(classes, dtype=torch.long)


def prompt_condition(prompts: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The text condition of the prompts ``index [B]`` (rows of the table, the negative prompt once):
    ``prompt_embeds [B, T, C]``, ``prompt_attention_mask [B, T]``, ``negative_prompt_embeds [1, T, C]``,
    ``negative_prompt_attention_mask [1, T]``."""
    return {key: prompts[key][index] if not key.startswith("negative") else prompts[key] for key in KEYS}


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex): what the trajectory cache keys a prompt file on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_prompts_fit(model: nn.Module, prompts: dict[str, torch.Tensor] | None, path: str | None = None) -> None:
    """Raise a ValueError when ``prompts`` (from :func:`load_prompt_embeds`, or None) do not fit
    ``model``: a text-conditioned model needs them with ``C == caption_channels``, a class-conditional
    one takes none."""
    family = family_of(model)
    text = isinstance(family.conditioning, TextPrompts)
    if prompts is None and text:
        raise ValueError(f"a {family.name} model is text-conditioned: give its calibration prompts with "
                         "--data.prompt_embeds FILE.safetensors (python -m vq4dit.prompts encode writes one) "
                         "or --data.prompts FILE.txt (encoded with the pipeline's text encoder)")
    if prompts is not None and not text:
        raise ValueError(f"--data.prompt_embeds {path} was given for a {family.name} model, which is conditioned on "
                         "class labels, not text: drop it")
    if prompts is not None:
        channels, expected = prompts["prompt_embeds"].shape[-1], model.config.caption_channels
        if channels != expected:
            raise ValueError(f"prompt embeddings {path} have C={channels} channels, but the model's caption_channels "
                             f"is {expected}: were they encoded with this model's text encoder?")


__all__ = ["CLASSES_FIELD", "KEYS", "check_prompts_fit", "file_digest", "load_prompt_embeds", "prompt_classes",
           "prompt_condition"]
