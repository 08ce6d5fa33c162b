"""Typed settings of vector-quantized layers: :class:`VQConfig` and the paper presets.

Notation (paper): a Linear weight ``W`` is ``out x in``; every row is cut into ``in / d``
contiguous sub-vectors of length ``d``; one codebook of ``k`` codewords per layer; each sub-vector
keeps ``n`` candidate codewords mixed by softmax ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from .typed_settings import recipe_field

RatioInit = Literal["inverse_distance", "uniform", "confident"]
KMeansMetric = Literal["euclidean", "activation"]
CodebookUnits = Literal["scaled", "weight"]


_PRESETS = {
    # The official code's settings: 8-bit code per 4 weights, 6-bit code per 2 weights.
    "w2": (256, 4),
    "w3": (64, 2),
}


@dataclass(frozen=True, kw_only=True)
class VQConfig:
    """Settings of one vector-quantized layer (or the default for all layers).

    Fields marked "None: the recipe decides" are None on the command line until the recipe (``vq4dit.recipes``) fills
    them; in Python their default is the paper's value.

    Args:
        bits: the paper preset, 2 (k=256, d=4) or 3 (k=64, d=2), giving codebook_size and
            subvector_dim where they are not set.
        codebook_size: number of codewords ``k`` (a power of two; a code takes log2(k) bits; None:
            the preset's).
        subvector_dim: sub-vector length ``d``; must divide the layer's ``in_features`` (None: the
            preset's).
        num_candidates: candidate codewords ``n`` kept per sub-vector at the start (1 = plain VQ,
            codebook-only calibration); pruning lowers a layer's count later
            (``VQLinear.active_candidates``).
        ratio_init: (None: the recipe decides) ``inverse_distance`` (ratios proportional to 1/distance, official code),
            ``uniform`` (1/n) or ``confident`` (0.9 on the nearest candidate).
        kmeans_iters: Lloyd iterations on all sub-vectors after the subsampled warm start.
        kmeans_seed: seed of the k-means++ seeding and subsampling (results are deterministic).
        row_scale: (None: the recipe decides) a scale per output row (stored as FP16, 16 / in_features bits per
            weight): the rows are divided by their RMS before k-means, so one codebook serves rows
            of very different magnitude (the adaLN modulation rows differ ~60x); the scales are
            calibrated with the codebook (AQLM's scale-normalised codes).
        codebook_units: with ``row_scale``, the units the codebook is stored (and calibrated) in:
            ``scaled`` (the scaled rows', about 1) or ``weight`` (the weight's own units, the scales
            divided by the power of two nearest their geometric mean). The layer is bit-identical;
            ``weight`` makes ``lr_codebook`` move a codeword as far in weight space as it does without
            row scales (``scaled`` moves it 10-50x less: the codebooks hardly train). Opt-in: measured
            better on some suite cells, worse on others (docs/quality.md).
        kmeans_metric: (None: the recipe decides) ``euclidean`` or ``activation``: k-means and the candidate search
            weigh every input dimension j by the layer's input second moment E[x_j^2] on the
            calibration trajectories (the diagonal of the output-error metric, as GPTVQ / VPTQ
            use the Hessian diagonal), so codewords fit where the inputs are large.
        error_feedback: (None: the recipe decides) assign the candidates one column group at a time and compensate
            each group's output error on the columns not assigned yet (GPTQ / GPTVQ), under the
            layer's input second moments E[x x^T] from the calibration trajectories.
    """

    bits: int = 2
    codebook_size: int | None = None
    subvector_dim: int | None = None
    num_candidates: int = 2
    ratio_init: RatioInit | None = recipe_field("inverse_distance")
    kmeans_iters: int = 25
    kmeans_seed: int = 0
    row_scale: bool | None = recipe_field(False)
    codebook_units: CodebookUnits = "scaled"
    kmeans_metric: KMeansMetric | None = recipe_field("euclidean")
    error_feedback: bool | None = recipe_field(False)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3):
            raise ValueError(
                f"bits must be 2 or 3 (the paper presets), got {self.bits!r}; "
                "codebook_size and subvector_dim override the preset for other settings"
            )
        preset_k, preset_d = _PRESETS[f"w{self.bits}"]
        if self.codebook_size is None:
            object.__setattr__(self, "codebook_size", preset_k)
        if self.subvector_dim is None:
            object.__setattr__(self, "subvector_dim", preset_d)
        k, d, n = self.codebook_size, self.subvector_dim, self.num_candidates
        if not isinstance(k, int) or k < 2 or k & (k - 1):
            raise ValueError(f"codebook_size must be a power of two >= 2, got {k!r}")
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"subvector_dim must be a positive integer, got {d!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_candidates must be >= 1, got {n!r}")
        if n > k:
            raise ValueError(f"num_candidates ({n}) cannot exceed codebook_size ({k})")
        if self.ratio_init not in ("inverse_distance", "uniform", "confident", None):
            raise ValueError(
                f"ratio_init must be 'inverse_distance', 'uniform' or 'confident', got {self.ratio_init!r}"
            )
        if self.kmeans_metric not in ("euclidean", "activation", None):
            raise ValueError(f"kmeans_metric must be 'euclidean' or 'activation', got {self.kmeans_metric!r}")
        if self.codebook_units not in ("scaled", "weight"):
            raise ValueError(f"codebook_units must be 'scaled' or 'weight', got {self.codebook_units!r}")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "VQConfig":
        """``w2`` = (k=256, d=4), ``w3`` = (k=64, d=2), as in the official VQ4DiT code."""
        if name not in _PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(bits=int(name[1:]), **overrides)

    @classmethod
    def from_bits(cls, bits: int, **overrides) -> "VQConfig":
        """The paper preset for 2 or 3 bits per weight."""
        return cls(bits=bits, **overrides)

    def with_overrides(self, **changes) -> "VQConfig":
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    @property
    def code_bits(self) -> int:
        """Bits of one stored code: log2(k)."""
        return int(math.log2(self.codebook_size))

    @property
    def nominal_bits_per_weight(self) -> float:
        """log2(k) / d: the code cost per weight, codebook overhead excluded."""
        return self.code_bits / self.subvector_dim

    def stored_bits_per_weight(self, out_features: int, in_features: int) -> float:
        """All-in bits per weight of an ``out x in`` layer: log2(k)/d codes, the FP32 codebook
        amortised over the layer, and the FP16 row scales when ``row_scale``."""
        bits = self.nominal_bits_per_weight + self.codebook_size * self.subvector_dim * 32 / (out_features * in_features)
        return bits + (16 / in_features if self.row_scale else 0.0)

    def validate_for(self, out_features: int, in_features: int, name: str = "layer") -> None:
        """Raise ``ValueError`` if this config cannot quantize an ``out x in`` weight."""
        d, k = self.subvector_dim, self.codebook_size
        if in_features % d:
            raise ValueError(
                f"{name}: subvector_dim={d} does not divide in_features={in_features}"
            )
        num_subvectors = out_features * in_features // d
        if k > num_subvectors:
            raise ValueError(
                f"{name}: codebook_size={k} exceeds the number of sub-vectors "
                f"({num_subvectors} = {out_features}x{in_features}/{d})"
            )
