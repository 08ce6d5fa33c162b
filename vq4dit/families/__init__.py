"""Model families: one small description per supported transformer class (:class:`Family`).

:func:`family_of` picks a model's family by its class; the engine calls models, finds blocks and
selects default layers only through it. Adding a model class is one module here plus tests.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Family, FilterFn, ModelInputs, UnsupportedModelError, capture_blocks
from .conditioning import (
    Batch, ClassLabels, Conditioning, DistilledTextPrompts, PooledTextPrompts, TextPrompts, batch_size, batch_to, conditioning_of,
)
from .dit import DIT
from .flux import FLUX
from .pixart import PIXART
from .sd3 import SD3

FAMILIES: tuple[Family, ...] = (DIT, PIXART, SD3, FLUX)


def family_of(model: nn.Module) -> Family:
    """The family of ``model``'s class.

    Raises:
        UnsupportedModelError: (a ``TypeError`` and ``ValueError``) no family describes the class;
            the message names the supported ones.
    """
    for family in FAMILIES:
        if isinstance(model, family.model_class):
            return family
    supported = ", ".join(f"{f.model_class.__name__} ({f.name})" for f in FAMILIES)
    raise UnsupportedModelError(f"vq4dit does not support {type(model).__name__} models; supported: {supported}")


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` in forward order (its family's block lists)."""
    return family_of(model).blocks(model)


def call_model(model: nn.Module, batch: Batch, device: torch.device | str | None = None) -> torch.Tensor:
    """``model``'s output ``[B, C_out, H, W]`` on one model batch, called as its family calls it."""
    return family_of(model).forward(model, batch, device)


__all__ = [
    "Batch", "ClassLabels", "Conditioning", "DIT", "DistilledTextPrompts", "FAMILIES", "FLUX", "Family", "FilterFn", "ModelInputs", "PIXART",
    "PooledTextPrompts", "SD3", "TextPrompts", "UnsupportedModelError", "batch_size", "batch_to", "block_modules", "call_model",
    "capture_blocks", "conditioning_of", "family_of",
]
