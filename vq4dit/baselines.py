"""Scalar baselines: round-to-nearest (RTN) fake quantization, per channel or per group."""

from __future__ import annotations

import torch


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest fake quantization: the scalar baseline.

    Per output channel (``group_size=None``) or per group of ``group_size`` consecutive inputs.
    Returns the de-quantized weight, same shape as ``weight [out, in]``.
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    if in_features % group:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    grouped = weight.float().reshape(out_features, in_features // group, group)
    low = grouped.amin(dim=2, keepdim=True)
    high = grouped.amax(dim=2, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp(min=1e-12)
    quantized = ((grouped - low) / scale).round().clamp(0, levels)
    return (quantized * scale + low).reshape(out_features, in_features).to(weight.dtype)
