"""Sub-vector math: cutting weights into sub-vectors, nearest codewords, initial candidate ratios.

Pure tensor functions (k-means lives in ``vq4dit.kmeans``, the differentiable soft reconstruction
and the ratio regulariser in ``vq4dit.soft``). Nothing here knows about modules, Lightning or DiTs.
"""

from __future__ import annotations

import math

import torch

from .vq_config import RatioInit

# Distances are computed on at most this many sub-vectors x codewords at once (float32 entries):
# 2**22 entries = 16 MiB, which keeps the [chunk, k] block in cache and memory bounded.
_DISTANCE_BLOCK_ENTRIES = 1 << 22

# A row of this many bytes can be viewed as one element of this dtype: gathering N wide elements
# is 1.5-5x faster on the CPU than a row gather of d=2-4 floats (benchmarks/throughput.py,
# benchmarks/inference.py). Used by the soft reconstruction and the hard decode alike.
WIDE_ROW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}




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


def weighted_features(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[w p^2, w p, w]`` ``[N, 3d]`` of ``points [N, d]`` with ``weights [N, d]``: its product with
    :func:`codeword_features` is the weighted squared distance (one matmul, one pass over ``[N, k]``)."""
    weights, points = weights.float(), points.float()
    scaled = weights * points
    return torch.cat([scaled * points, scaled, weights], dim=1)


def codeword_features(codebook: torch.Tensor) -> torch.Tensor:
    """``[1, -2 c, c^2]`` ``[k, 3d]`` of ``codebook [k, d]`` (see :func:`weighted_features`)."""
    codebook = codebook.float()
    return torch.cat([torch.ones_like(codebook), -2.0 * codebook, codebook.pow(2)], dim=1)


def _squared_distances(points: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor):
    """``||p - c||^2`` for a block of points: ``[rows, k]`` (clamped at 0 against round-off)."""
    # ||p||^2 - 2 p.c + ||c||^2, with the ||p||^2 term added last (it does not change the argmin).
    distances = torch.addmm(codebook_sq.unsqueeze(0), points, codebook.t(), beta=1.0, alpha=-2.0)
    distances += points.pow(2).sum(dim=1, keepdim=True)
    return distances.clamp_(min=0.0)


@torch.no_grad()
def nearest_codewords(
    points: torch.Tensor, codebook: torch.Tensor, num_nearest: int = 1, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_nearest`` nearest codewords of every point, nearest first.

    Computed in blocks of rows, so memory stays ``O(block * k)``, never ``N x k x d``.

    Args:
        points: ``[N, d]`` sub-vectors.
        codebook: ``[k, d]`` codewords.
        num_nearest: how many neighbours to return (``n``).
        weights: optional ``[N, d]`` per-dimension importance of every point (the activation
            metric: distances ``sum_j w_j (p_j - c_j)^2``).

    Returns:
        ``(indices [N, n] int64, squared_distances [N, n] float32)``.
    """
    points = points.float()
    codebook = codebook.float()
    codebook_sq = codebook.pow(2).sum(dim=1)
    num_points = points.shape[0]
    indices = torch.empty(num_points, num_nearest, dtype=torch.int64, device=points.device)
    distances = torch.empty(num_points, num_nearest, dtype=torch.float32, device=points.device)
    features = None if weights is None else codeword_features(codebook)
    step = _block_rows(codebook.shape[0])
    for start in range(0, num_points, step):
        if features is None:
            block = _squared_distances(points[start : start + step], codebook, codebook_sq)
        else:  # sum_j w_j (p_j - c_j)^2 as one product; the winners are clamped at 0 below
            block = weighted_features(points[start : start + step], weights[start : start + step]) @ features.t()
        if num_nearest == 1:
            best_dist, best_idx = block.min(dim=1, keepdim=True)
        else:
            best_dist, best_idx = block.topk(num_nearest, dim=1, largest=False, sorted=True)
        indices[start : start + step] = best_idx
        distances[start : start + step] = best_dist if features is None else best_dist.clamp_(min=0.0)
    return indices, distances


def init_candidate_logits(sq_distances: torch.Tensor, mode: RatioInit = "inverse_distance"):
    """Ratio logits ``[N, n]`` whose softmax gives the initial candidate ratios.

    ``inverse_distance``: ratio_m proportional to 1 / (||w - c_m|| + eps), i.e. the nearest
    candidate weighs most (official code); ``uniform``: 1/n each (one reading of the paper);
    ``confident``: 0.9 on the nearest, 0.1 shared by the others (the start stays near the
    nearest-codeword weight, e.g. an error-feedback assignment, while every candidate stays open).
    """
    if mode == "uniform":
        return torch.zeros_like(sq_distances, dtype=torch.float32)
    if mode == "confident":
        n = sq_distances.shape[1]
        logits = torch.full_like(sq_distances, math.log(0.1 / max(n - 1, 1)), dtype=torch.float32)
        logits[:, 0] = math.log(0.9)
        return logits
    if mode != "inverse_distance":
        raise ValueError(f"unknown ratio init {mode!r}")
    distances = sq_distances.float().clamp(min=0).sqrt()
    return -torch.log(distances + 1e-5)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||W - W_hat||^2 / ||W||^2``: the relative MSE used in benchmarks and tests."""
    weight = weight.float()
    return float((weight - approximation.float()).pow(2).sum() / weight.pow(2).sum().clamp(min=1e-30))
