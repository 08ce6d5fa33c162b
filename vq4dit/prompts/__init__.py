"""Prompt embeddings for text-conditioned models: the ``--data.prompt_embeds`` file, read and checked.

The file is a safetensors file with exactly four tensors, six for a family conditioned on pooled
embeddings too (what a pipeline's ``encode_prompt`` returns, once for N prompts and once for the
negative prompt; SD3's pipeline has no masks: write ones), three for a guidance-distilled family
(Flux: ``prompt_embeds``, ``prompt_attention_mask`` (ones) and ``pooled_prompt_embeds``, no negative
keys: such a model has no unconditional branch, a file with them is refused):

======================================  ============  ================================================
key                                     shape         dtype
======================================  ============  ================================================
``prompt_embeds``                       ``[N, T, C]``  float (any floating dtype; read as float32)
``prompt_attention_mask``               ``[N, T]``     int32 / int64, values 0 / 1
``negative_prompt_embeds``              ``[1, T, C]``  float
``negative_prompt_attention_mask``      ``[1, T]``     int32 / int64, values 0 / 1
``pooled_prompt_embeds``                ``[N, P]``     float: families with pooled embeddings (SD3, Flux) only
``negative_pooled_prompt_embeds``       ``[1, P]``     float: with the former (not Flux)
======================================  ============  ================================================

Every mistake is a ``ValueError`` naming the file and the problem (the CLI prints it as one
``error:`` line) before any heavy work; :func:`check_prompts_fit` checks the file against the model
(its family is text-conditioned, pooled or not; ``C`` (and ``P``) are its config's widths). ``python -m vq4dit.prompts
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

from ..families import DistilledTextPrompts, PooledTextPrompts, TextPrompts, family_of

CLASSES_FIELD = "vq4dit_prompt_classes"  # optional metadata: JSON list, the class each prompt names
KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
POOLED_KEYS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")  # [N, P], [1, P]: SD3's pooled CLIP
DISTILLED_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")  # Flux: no negative prompt
POOLED_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")  # the pipelines whose pooled embeddings the encode command writes
_MASK_DTYPES = (torch.int32, torch.int64)


def _check(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first problem of ``tensors`` (read from ``path``)."""
    where = f"prompt embeddings {path}"
    negative = any(k.startswith("negative") for k in tensors)
    if POOLED_KEYS[0] in tensors and not negative:
        expected = DISTILLED_KEYS
    else:
        expected = (*KEYS, *POOLED_KEYS) if any(k in tensors for k in POOLED_KEYS) else KEYS
    missing, extra = [k for k in expected if k not in tensors], sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has extra {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{where} {' and '.join(parts)}; expected exactly {', '.join(KEYS)} "
                         f"(and {', '.join(POOLED_KEYS)} for pooled families; Flux: {', '.join(DISTILLED_KEYS)})")
    embeds, mask = tensors["prompt_embeds"], tensors["prompt_attention_mask"]
    for key, rank, shape in (("prompt_embeds", 3, "[N, T, C]"), ("prompt_attention_mask", 2, "[N, T]"),
                             ("negative_prompt_embeds", 3, "[1, T, C]"), ("negative_prompt_attention_mask", 2, "[1, T]")):
        tensor = tensors.get(key)
        if tensor is None:
            continue
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
    negative, negative_mask = tensors.get("negative_prompt_embeds"), tensors.get("negative_prompt_attention_mask")
    if negative is not None and (negative.shape != (1, tokens, channels) or negative_mask.shape != (1, tokens)):
        raise ValueError(f"{where}: negative_prompt_embeds {tuple(negative.shape)} / negative_prompt_attention_mask "
                         f"{tuple(negative_mask.shape)} do not match prompt_embeds {tuple(embeds.shape)}: expected "
                         f"[1, T, C] = {[1, tokens, channels]} and [1, T] = {[1, tokens]}")
    if expected != KEYS:
        _check_pooled(where, tensors, count)
    for key in (k for k in expected if k.endswith("embeds")):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(f"{where}: {key} holds NaN/Inf")
    for key in (k for k in expected if k.endswith("mask")):
        if not bool(((tensors[key] == 0) | (tensors[key] == 1)).all()):
            raise ValueError(f"{where}: {key} holds values other than 0 and 1")


def _check_pooled(where: str, tensors: dict[str, torch.Tensor], count: int) -> None:
    """Raise a ValueError naming the first problem of the pooled embeddings of ``count`` prompts."""
    pooled = tensors["pooled_prompt_embeds"]
    negative = tensors.get("negative_pooled_prompt_embeds", pooled[:1])  # Flux files have none
    for key, tensor in zip(POOLED_KEYS, (pooled, negative)):
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise ValueError(f"{where}: {key} is {tuple(tensor.shape)} {tensor.dtype}, expected a floating "
                             f"{'[N, P]' if key == POOLED_KEYS[0] else '[1, P]'}")
    if pooled.shape[0] != count or pooled.shape[1] == 0 or negative.shape != (1, pooled.shape[1]):
        raise ValueError(f"{where}: pooled_prompt_embeds {tuple(pooled.shape)} / negative_pooled_prompt_embeds "
                         f"{tuple(negative.shape)} do not match {count} prompts: expected [N, P] and [1, P], N = {count}")


def load_prompt_embeds(path: str | Path) -> dict[str, torch.Tensor]:
    """The four (pooled: six; Flux: three) checked tensors of a prompt-embeddings file: embeddings as float32
    (``[N, T, C]``, ``[1, T, C]``; ``[N, P]``, ``[1, P]``), masks as int64 (``[N, T]``, ``[1, T]``).

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
    return {key: tensors[key].float() if key.endswith("embeds") else tensors[key].long()
            for key in (*KEYS, *POOLED_KEYS) if key in tensors}


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
    ``negative_prompt_attention_mask [1, T]`` (pooled files: ``pooled_prompt_embeds [B, P]``,
    ``negative_pooled_prompt_embeds [1, P]`` too)."""
    return {key: prompts[key][index] if not key.startswith("negative") else prompts[key]
            for key in (*KEYS, *POOLED_KEYS) if key in prompts}


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex): what the trajectory cache keys a prompt file on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_prompts_fit(model: nn.Module, prompts: dict[str, torch.Tensor] | None, path: str | None = None) -> None:
    """Raise a ValueError when ``prompts`` (from :func:`load_prompt_embeds`, or None) do not fit
    ``model``: a text-conditioned model needs them, with the pooled embeddings exactly when its family
    is conditioned on them, and widths equal to its config's (``Family.text_channels``); a
    class-conditional one takes none."""
    family = family_of(model)
    text, pooled = isinstance(family.conditioning, TextPrompts), isinstance(family.conditioning, PooledTextPrompts)
    if prompts is None and text:
        raise ValueError(f"a {family.name} model is text-conditioned: give its calibration prompts with "
                         "--data.prompt_embeds FILE.safetensors (python -m vq4dit.prompts encode writes one) "
                         "or --data.prompts FILE.txt (encoded with the pipeline's text encoder)")
    if prompts is not None and not text:
        raise ValueError(f"--data.prompt_embeds {path} was given for a {family.name} model, which is conditioned on "
                         "class labels, not text: drop it")
    if prompts is None:
        return
    if pooled != (POOLED_KEYS[0] in prompts):
        wanted = "needs" if pooled else "takes no"
        raise ValueError(f"prompt embeddings {path}: a {family.name} model {wanted} pooled embeddings "
                         f"({', '.join(POOLED_KEYS)}); encode the prompts with this model's pipeline")
    negative, distilled = [k for k in prompts if k.startswith("negative")], isinstance(family.conditioning, DistilledTextPrompts)
    if distilled and negative:
        raise ValueError(f"prompt embeddings {path}: a {family.name} model is guidance-distilled, with no unconditional "
                         f"branch (the guidance scale is its input): its file holds no negative prompt; drop "
                         f"{', '.join(negative)}")
    if text and not distilled and not negative:
        raise ValueError(f"prompt embeddings {path}: a {family.name} model needs the negative prompt of its "
                         f"unconditional branch: {', '.join(k for k in family.conditioning.shared_keys if k.startswith('negative'))}")
    for key, field in family.text_channels.items():
        channels, expected = prompts[key].shape[-1], getattr(model.config, field)
        if channels != expected:
            raise ValueError(f"prompt embeddings {path}: {key} have {channels} channels, but the model's {field} "
                             f"is {expected}: were they encoded with this model's text encoder?")


def check_encodable(model: nn.Module) -> None:
    """Raise a ValueError when ``--data.prompts`` cannot encode ``model``'s prompts (a pooled family
    none of whose pipelines is in ``POOLED_PIPELINES``), before any encoder is loaded."""
    family = family_of(model)
    if isinstance(family.conditioning, PooledTextPrompts) and not set(family.pipelines) & set(POOLED_PIPELINES):
        raise ValueError(f"--data.prompts cannot encode the pooled embeddings a {family.name} model needs yet: write "
                         "an embeddings file from its pipeline's encode_prompt and give --data.prompt_embeds FILE")


__all__ = ["CLASSES_FIELD", "DISTILLED_KEYS", "KEYS", "POOLED_KEYS", "POOLED_PIPELINES", "check_encodable",
           "check_prompts_fit", "file_digest", "load_prompt_embeds", "prompt_classes",
           "prompt_condition"]
