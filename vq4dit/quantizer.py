"""Vector-quantization math: configuration, sub-vectors, nearest codewords, candidate sets, RTN.

k-means lives in ``vq4dit.kmeans``, the differentiable soft reconstruction and the ratio
regulariser in ``vq4dit.soft``.

Pure tensor functions plus the typed :class:`VQConfig`. Nothing here knows about modules,
Lightning or DiTs. Notation (paper): a Linear weight ``W`` is ``out x in``; every row is cut
into ``in / d`` contiguous sub-vectors of length ``d``; one codebook of ``k`` codewords per layer;
each sub-vector keeps ``n`` candidate codewords mixed by softmax ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

RatioInit = Literal["inverse_distance", "uniform"]

# Distances are computed on at most this many sub-vectors x codewords at once (float32 entries):
# 2**22 entries = 16 MiB, which keeps the [chunk, k] block in cache and memory bounded.
_DISTANCE_BLOCK_ENTRIES = 1 << 22

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

_PRESETS = {
    # The official code's settings: 8-bit code per 4 weights, 6-bit code per 2 weights.
    "w2": (256, 4),
    "w3": (64, 2),
}


@dataclass
class VQConfig:
    """Settings of one vector-quantized layer (or the default for all layers).

    Args:
        codebook_size: number of codewords ``k`` (a power of two; a code takes log2(k) bits).
        subvector_dim: sub-vector length ``d``; must divide the layer's ``in_features``.
        num_candidates: candidate codewords ``n`` kept per sub-vector (1 = plain VQ).
        ratio_init: ``inverse_distance`` (ratios proportional to 1/distance, official code) or
            ``uniform`` (1/n).
        kmeans_iters: Lloyd iterations on all sub-vectors after the subsampled warm start.
        kmeans_seed: seed of the k-means++ seeding and subsampling (results are deterministic).
    """

    codebook_size: int = 256
    subvector_dim: int = 4
    num_candidates: int = 2
    ratio_init: RatioInit = "inverse_distance"
    kmeans_iters: int = 25
    kmeans_seed: int = 0

    def __post_init__(self) -> None:
        k, d, n = self.codebook_size, self.subvector_dim, self.num_candidates
        if not isinstance(k, int) or k < 2 or k & (k - 1):
            raise ValueError(f"codebook_size must be a power of two >= 2, got {k!r}")
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"subvector_dim must be a positive integer, got {d!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_candidates must be >= 1, got {n!r}")
        if n > k:
            raise ValueError(f"num_candidates ({n}) cannot exceed codebook_size ({k})")
        if self.ratio_init not in ("inverse_distance", "uniform"):
            raise ValueError(
                f"ratio_init must be 'inverse_distance' or 'uniform', got {self.ratio_init!r}"
            )
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "VQConfig":
        """``w2`` = (k=256, d=4), ``w3`` = (k=64, d=2), as in the official VQ4DiT code."""
        if name not in _PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; expected one of {sorted(_PRESETS)}")
        k, d = _PRESETS[name]
        return cls(codebook_size=k, subvector_dim=d, **overrides)

    @classmethod
    def from_bits(cls, bits: int, **overrides) -> "VQConfig":
        """The paper preset for 2 or 3 bits per weight."""
        if bits not in (2, 3):
            raise ValueError(f"bits must be 2 or 3 (the paper presets), got {bits!r}")
        return cls.preset(f"w{bits}", **overrides)

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


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def index_dtype(num_values: int) -> torch.dtype:
    """Smallest integer dtype that stores indices ``0 .. num_values-1``."""
    if num_values <= 256:
        return torch.uint8
    if num_values <= 2**15:
        return torch.int16
    if num_values <= 2**31:
        return torch.int32
    return torch.int64


def to_subvectors(weight: torch.Tensor, subvector_dim: int) -> torch.Tensor:
    """Cut ``weight [out, in]`` into row-contiguous pieces: ``[out * in / d, d]``."""
    out_features, in_features = weight.shape
    if in_features % subvector_dim:
        raise ValueError(f"subvector_dim={subvector_dim} does not divide in_features={in_features}")
    return weight.reshape(-1, subvector_dim)


def _block_rows(num_codewords: int) -> int:
    return max(1024, _DISTANCE_BLOCK_ENTRIES // max(num_codewords, 1))


def _squared_distances(points: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor):
    """``||p - c||^2`` for a block of points: ``[rows, k]`` (clamped at 0 against round-off)."""
    # ||p||^2 - 2 p.c + ||c||^2, with the ||p||^2 term added last (it does not change the argmin).
    distances = torch.addmm(codebook_sq.unsqueeze(0), points, codebook.t(), beta=1.0, alpha=-2.0)
    distances += points.pow(2).sum(dim=1, keepdim=True)
    return distances.clamp_(min=0.0)


@torch.no_grad()
def nearest_codewords(
    points: torch.Tensor, codebook: torch.Tensor, num_nearest: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_nearest`` nearest codewords of every point, nearest first.

    Computed in blocks of rows, so memory stays ``O(block * k)``, never ``N x k x d``.

    Args:
        points: ``[N, d]`` sub-vectors.
        codebook: ``[k, d]`` codewords.
        num_nearest: how many neighbours to return (``n``).

    Returns:
        ``(indices [N, n] int64, squared_distances [N, n] float32)``.
    """
    points = points.float()
    codebook = codebook.float()
    codebook_sq = codebook.pow(2).sum(dim=1)
    num_points = points.shape[0]
    indices = torch.empty(num_points, num_nearest, dtype=torch.int64, device=points.device)
    distances = torch.empty(num_points, num_nearest, dtype=torch.float32, device=points.device)
    step = _block_rows(codebook.shape[0])
    for start in range(0, num_points, step):
        block = _squared_distances(points[start : start + step], codebook, codebook_sq)
        if num_nearest == 1:
            best_dist, best_idx = block.min(dim=1, keepdim=True)
        else:
            best_dist, best_idx = block.topk(num_nearest, dim=1, largest=False, sorted=True)
        indices[start : start + step] = best_idx
        distances[start : start + step] = best_dist
    return indices, distances


# ---------------------------------------------------------------------------------------------
# Candidate sets
# ---------------------------------------------------------------------------------------------


def init_candidate_logits(sq_distances: torch.Tensor, mode: RatioInit = "inverse_distance"):
    """Ratio logits ``[N, n]`` whose softmax gives the initial candidate ratios.

    ``inverse_distance``: ratio_m proportional to 1 / (||w - c_m|| + eps), i.e. the nearest
    candidate weighs most (official code); ``uniform``: 1/n each (one reading of the paper).
    """
    if mode == "uniform":
        return torch.zeros_like(sq_distances, dtype=torch.float32)
    if mode != "inverse_distance":
        raise ValueError(f"unknown ratio init {mode!r}")
    distances = sq_distances.float().clamp(min=0).sqrt()
    return -torch.log(distances + 1e-5)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||W - W_hat||^2 / ||W||^2``: the relative MSE used in benchmarks and tests."""
    weight = weight.float()
    return float((weight - approximation.float()).pow(2).sum() / weight.pow(2).sum().clamp(min=1e-30))


def mse(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """Plain mean squared error."""
    return float(F.mse_loss(approximation.float(), weight.float()))


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
