"""Calibration recipes: which quality levers a run uses unless a flag says otherwise.

``paper``: VQ4DiT as the paper and its official code run it (euclidean k-means codebooks, no
row scales, the block loss only). ``quality`` (the default): the levers that measured better on
the reference model (README, "Beyond the paper"): scale-normalised sub-vectors, activation-aware
codebooks (k-means under the teacher's input second moments), candidates assigned with error
feedback (GPTQ / GPTVQ with act-order), ratios that start at 0.9 on the feedback's codeword, and
per-layer codebook sizes allocated by measured sensitivity at the bits the uniform setting costs. An explicit
setting (``--model.row_scale false``) always wins over the recipe.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Recipe = Literal["quality", "paper"]

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"row_scale": False, "kmeans_metric": "euclidean", "output_weight": 0.0, "bit_allocation": False,
              "error_feedback": False, "ratio_init": "inverse_distance"},
    "quality": {"row_scale": True, "kmeans_metric": "activation", "output_weight": 0.0, "bit_allocation": True,
                "error_feedback": True, "ratio_init": "confident"},
}


def recipe_settings(recipe: str, **explicit: Any) -> dict[str, Any]:
    """The recipe's lever settings with every explicit (not None) value in their place."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {list(get_args(Recipe))}, got {recipe!r}")
    unknown = sorted(set(explicit) - set(RECIPES[recipe]))
    if unknown:
        raise ValueError(f"not a recipe setting: {unknown}")
    return {**RECIPES[recipe], **{key: value for key, value in explicit.items() if value is not None}}
