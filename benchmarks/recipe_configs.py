"""What the scale benchmarks run per row: the default recipe (``quality``) and the paper's, resolved by
the library's own path (:func:`vq4dit.recipes.apply_recipe` on the command line's unset settings, as
``train.py fit --model.recipe ...`` resolves them), and the engine built as a fit builds it, with the
input statistics the default needs gathered from real teacher forwards on calibration items.

The items are random latents, timesteps and labels (the values change neither FLOPs nor memory) with
their null-label copies, as the engine feeds a guided run's items to the statistics; the engine takes at
most ``STATISTICS_ITEMS`` items (``vq4dit.engine.statistics_batches``), which a benchmark may lower to
fit a CPU.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from vq4dit.engine import CalibrationConfig, Calibrator, statistics_batches, with_null_labels
from vq4dit.engine.config import BitAllocation
from vq4dit.recipes import Recipe, apply_recipe
from vq4dit.typed_settings import unset
from vq4dit.vq_config import VQConfig

RECIPES: tuple[Recipe, ...] = ("quality", "paper")
LABELS = {"quality": "default", "paper": "paper"}  # how a row names its recipe
STATISTICS_ITEMS: int = inspect.signature(statistics_batches).parameters["max_items"].default


def recipe_settings(recipe: Recipe, bits: int, calibration: dict | None = None,
                    **vq_fields: object) -> tuple[VQConfig, CalibrationConfig]:
    """``(vq, calibration)`` of ``recipe`` at ``bits``: ``vq_fields`` and ``calibration`` set as on the
    command line (``--model.vq.X``, ``--model.calibration.X``), every other recipe field the recipe's."""
    vq = dataclasses.replace(unset(VQConfig), bits=bits, **vq_fields)
    config = dataclasses.replace(unset(CalibrationConfig), **(calibration or {}))
    vq, config, _ = apply_recipe(recipe, vq=vq, calibration=config, allocation=unset(BitAllocation))
    return vq, config


def needs_statistics(vq: VQConfig) -> bool:
    """Whether the engine gathers input second moments for ``vq`` (activation-aware k-means: ``E[x^2]``;
    error feedback: the full ``E[x x^T]`` per layer)."""
    return vq.kmeans_metric == "activation" or bool(vq.error_feedback)


def random_items(model: nn.Module, count: int, seed: int = 0, null_copies: bool = True) -> dict[str, torch.Tensor]:
    """``count`` random calibration items plus their null-label copies (``2 count`` in all; ``count``
    without ``null_copies``): ``{"x": [2count, C, H, W], "t": [2count], "y": [2count]}`` on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(count, c.in_channels, c.sample_size, c.sample_size, generator=generator)
    t = torch.randint(0, 1000, (count,), generator=generator)
    y = torch.randint(0, c.num_embeds_ada_norm, (count,), generator=generator)
    if null_copies:
        x, t, y = with_null_labels(x, t, y)
    return {"x": x, "t": t, "y": y}


def build_engine(teacher: nn.Module, recipe: Recipe, bits: int, items: int, calibration: dict | None = None,
                 **vq_fields: object) -> Calibrator:
    """``Calibrator.build`` of ``recipe`` at ``bits`` (guidance 1: the benchmark batches hold their
    null labels), with ``items`` random items (+ null copies) for the statistics when the recipe needs
    them; ``engine.phase_seconds`` has the statistics, k-means and feedback seconds."""
    vq, config = recipe_settings(recipe, bits, calibration, **vq_fields)
    data = random_items(teacher, items) if needs_statistics(vq) else None
    return Calibrator.build(teacher, vq, config, guidance_scale=1.0, progress=False, items=data)


def full_moment_bytes(engine: Calibrator) -> int:
    """Bytes of the float32 ``E[x x^T]`` the build held for its error-feedback layers (freed after it)."""
    return sum(layer.in_features ** 2 * 4 for layer in engine.layers.values() if layer.config.error_feedback)


def preparation_note(engine: Calibrator) -> str:
    """``statistics 1.2 s, kmeans 3.4 s, feedback 0.5 s`` (the phases the build ran)."""
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in engine.phase_seconds.items() if seconds)
