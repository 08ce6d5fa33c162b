"""Calibration recipes: the values of the settings a user left unset (None: "the recipe decides").

``paper``: VQ4DiT as the paper and its official code run it: every recipe field keeps the default
declared with it (euclidean k-means codebooks, no row scales, the block loss only, uniform bits).
``quality`` (the default): the levers that measured better on the reference model (README, "Beyond
the paper"): scale-normalised sub-vectors, activation-aware codebooks (k-means under the teacher's
input second moments), candidates assigned with error feedback (GPTQ / GPTVQ with act-order),
and ratios that start at 0.9 on the feedback's codeword. An explicit setting
(``--model.vq.row_scale false``) always wins over the recipe.

Bit allocation (``--model.allocation.enabled true``) is in neither recipe: the earlier, measured
probe made the RGB reference worse than uniform bits (issue 17: 1.88x vs 1.23x FP FID at k=16,
d=2); the redesigned probe is better on the digits reference at k=16 (1.33x vs 1.62x) and within
noise or better on the RGB one, but worse on digits at the paper preset (1.60x vs 1.39x). A lever joins the default only when it is
not worse on every reference model (``python -m benchmarks.recipe_rule``, docs/quality.md; row
scales meet that rule neither in nor out, and stay in: removing them loses more).

The recipe fields are the dataclass fields declared with :func:`vq4dit.typed_settings.recipe_field`;
``tests/test_settings.py`` checks that every recipe leaves none of them unset.
"""

from __future__ import annotations

from typing import Literal, get_args

from .engine.config import BitAllocation, CalibrationConfig
from .typed_settings import fill, fill_defaults
from .vq_config import VQConfig

Recipe = Literal["quality", "paper"]


def apply_recipe(
    recipe: Recipe, *, vq: VQConfig, calibration: CalibrationConfig, allocation: BitAllocation
) -> tuple[VQConfig, CalibrationConfig, BitAllocation]:
    """``(vq, calibration, allocation)`` with every recipe field left None set by ``recipe``
    (explicit values are kept)."""
    if recipe not in get_args(Recipe):
        raise ValueError(f"recipe must be one of {list(get_args(Recipe))}, got {recipe!r}")
    if recipe == "quality":
        vq = fill(vq, row_scale=True, kmeans_metric="activation", error_feedback=True, ratio_init="confident")
    return fill_defaults(vq), fill_defaults(calibration), fill_defaults(allocation)
