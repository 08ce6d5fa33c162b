"""Image grids without torchvision: model outputs -> uint8 pictures, grids, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_images(samples: torch.Tensor) -> torch.Tensor:
    """Model-space samples ``[B, C, H, W]`` -> displayable ``[B, 3, H, W]`` floats in [0, 1].

    1 or 3 channels are pixels in [-1, 1]; other channel counts (latents without a VAE) show
    their first 3 channels, each min-max normalised, which is only a rough picture.
    """
    samples = samples.detach().float().cpu()
    channels = samples.shape[1]
    if channels == 1:
        return ((samples.repeat(1, 3, 1, 1) + 1) / 2).clamp(0, 1)
    if channels == 3:
        return ((samples + 1) / 2).clamp(0, 1)
    first = samples[:, :3] if channels > 3 else torch.cat([samples, samples[:, :1].repeat(1, 3 - channels, 1, 1)], 1)
    low = first.amin(dim=(0, 2, 3), keepdim=True)
    high = first.amax(dim=(0, 2, 3), keepdim=True)
    return (first - low) / (high - low).clamp(min=1e-8)


def make_grid(rows: list[torch.Tensor], padding: int = 2, scale: int = 1) -> torch.Tensor:
    """Stack rows of ``[B, 3, H, W]`` images (same B, H, W) into one ``[3, H', W']`` grid."""
    if not rows:
        raise ValueError("make_grid needs at least one row")
    count, _, height, width = rows[0].shape
    if scale > 1:
        rows = [r.repeat_interleave(scale, 2).repeat_interleave(scale, 3) for r in rows]
        height, width = height * scale, width * scale
    grid = torch.ones(3, len(rows) * (height + padding) + padding, count * (width + padding) + padding)
    for r, row in enumerate(rows):
        for c in range(count):
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            grid[:, top : top + height, left : left + width] = row[c]
    return grid


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a ``[3, H, W]`` grid in [0, 1] as PNG (Pillow), atomically."""
    from PIL import Image

    from .atomic import atomic_path

    path = Path(path)
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:  # never a half-written PNG; a full disk is one WriteError line
        Image.fromarray(array).save(tmp, format="PNG")
    return path
