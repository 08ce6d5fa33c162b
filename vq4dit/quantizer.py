"""Vector-quantization math: sub-vectors, k-means, candidate sets, soft/hard reconstruction.

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
RegularizerKind = Literal["paper", "official"]

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
# k-means
# ---------------------------------------------------------------------------------------------


def _sample_rows(num_rows: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct row indices (all rows when count >= num_rows), on the CPU."""
    if count >= num_rows:
        return torch.arange(num_rows)
    return torch.randperm(num_rows, generator=generator)[:count]


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on ``points [S, d]``: returns ``[k, d]``."""
    num_points = points.shape[0]
    # All random draws up front (CPU generator): the result does not depend on the device.
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64).to(points.device)
    centroids = torch.empty(k, points.shape[1], dtype=points.dtype, device=points.device)
    centroids[0] = points[min(int(uniforms[0] * num_points), num_points - 1)]
    closest_sq = (points - centroids[0]).pow(2).sum(dim=1)
    for j in range(1, k):
        cumulative = closest_sq.double().cumsum(0)
        # D^2 sampling; when every point coincides with a centroid the draw degrades to uniform
        # over the cumulative ties, and the duplicate is re-seeded by the Lloyd steps.
        target = uniforms[j] * cumulative[-1]
        choice = torch.searchsorted(cumulative, target.unsqueeze(0)).clamp_(max=num_points - 1)
        centroids[j] = points[choice[0]]
        torch.minimum(closest_sq, (points - centroids[j]).pow(2).sum(dim=1), out=closest_sq)
    return centroids


def _update_centroids(
    points: torch.Tensor, assign: torch.Tensor, sq_dist: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """Mean of each cluster; an empty cluster is re-seeded at a currently worst-fit point."""
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, assign, points)
    counts = torch.bincount(assign, minlength=k).to(points.dtype)
    new_centroids = centroids.clone()
    filled = counts > 0
    new_centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
    empty = (~filled).nonzero().squeeze(1)
    if empty.numel():
        worst = sq_dist.topk(min(empty.numel(), sq_dist.numel())).indices
        new_centroids[empty[: worst.numel()]] = points[worst]
    return new_centroids


def _lloyd_torch(points: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Plain Lloyd iterations with blocked distances (any device)."""
    for _ in range(iters):
        assign, sq_dist = nearest_codewords(points, centroids, 1)
        centroids = _update_centroids(points, assign[:, 0], sq_dist[:, 0], centroids)
    return centroids


def _lloyd_faiss(points: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """The same Lloyd iterations run by faiss (CPU, BLAS + fused argmin: ~4x faster here)."""
    import faiss  # optional fast path, see kmeans_backend()

    data = points.detach().cpu().float().numpy()
    km = faiss.Kmeans(
        data.shape[1], centroids.shape[0], niter=iters, seed=1234, max_points_per_centroid=1 << 30,
        min_points_per_centroid=1, verbose=False,
    )
    km.train(data, init_centroids=centroids.cpu().float().numpy())
    return torch.from_numpy(km.centroids.copy()).to(points.device)


def kmeans_backend(device: torch.device | str) -> str:
    """``faiss`` on CPU when faiss-cpu is installed (a dependency on Linux/macOS), else ``torch``."""
    if torch.device(device).type != "cpu":
        return "torch"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "torch"
    return "faiss"


@torch.no_grad()
def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    iters: int = 25,
    seed: int = 0,
    seed_points_per_cluster: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """k-means on ``points [N, d]``: returns the codebook ``[k, d]`` (float32, points' device).

    k-means++ seeding on a random subsample of ``seed_points_per_cluster * k`` points, then
    ``iters`` Lloyd iterations on all points. Distances are computed in blocks (memory
    ``O(block * k)``, never ``N x k x d``); empty clusters are re-seeded; deterministic for a
    given seed. ``backend``: ``torch`` (any device), ``faiss`` (CPU), ``auto`` (faiss on CPU when
    installed: same algorithm, measured faster, see benchmarks/kmeans.py).
    """
    if points.ndim != 2:
        raise ValueError(f"points must be [N, d], got shape {tuple(points.shape)}")
    num_points = points.shape[0]
    if num_clusters > num_points:
        raise ValueError(f"cannot make {num_clusters} clusters from {num_points} points")
    if backend == "auto":
        # faiss pays off on DiT-sized layers; tiny problems are faster without its set-up cost
        large = num_points * num_clusters >= 1 << 22
        backend = kmeans_backend(points.device) if large else "torch"
    if backend not in ("torch", "faiss"):
        raise ValueError(f"unknown k-means backend {backend!r}; expected auto, torch or faiss")
    points = points.float()
    generator = torch.Generator().manual_seed(seed)
    sample_size = min(num_points, seed_points_per_cluster * num_clusters)
    sample = points[_sample_rows(num_points, sample_size, generator).to(points.device)]
    # The seeding is k small sequential steps: one thread is fastest (no OpenMP hand-offs).
    threads = torch.get_num_threads()
    if points.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        centroids = _kmeans_plus_plus(sample, num_clusters, generator)
    finally:
        torch.set_num_threads(threads)
    if iters <= 0:
        return centroids
    if backend == "faiss":
        return _lloyd_faiss(points, centroids, iters)
    return _lloyd_torch(points, centroids, iters)


# ---------------------------------------------------------------------------------------------
# Candidate sets and reconstruction
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


# A row of this many bytes is gathered as one element of this dtype (row gathers of d=2-4 floats
# are ~1.5x faster that way on the CPU; benchmarks/throughput.py).
_WIDE_ROW_DTYPES = {4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table [k, d]`` rows at ``index [S]`` (int32/int64): ``[S, d]``, bit-identical to
    ``index_select``; rows are viewed as one wide element unless autograd needs the table."""
    wide = _WIDE_ROW_DTYPES.get(table.shape[1] * table.element_size())
    if wide is None or (torch.is_grad_enabled() and table.requires_grad):
        return table.index_select(0, index)
    words = table.detach().contiguous().view(-1).view(wide)  # [k]
    return words.index_select(0, index).view(table.dtype).view(-1, table.shape[1])


def _candidate_ratios_t(candidate_logits: torch.Tensor) -> torch.Tensor:
    """Ratios, transposed: ``[n, S]`` float32 (contiguous per candidate).

    A softmax over rows of width 2-4 runs ~25x slower on the CPU than over S contiguous columns,
    hence the transpose; for n = 2 the softmax is the sigmoid of the logit difference.
    """
    logits = candidate_logits.float()
    if logits.shape[1] == 2:
        difference = logits[:, 0] - logits[:, 1]
        return torch.sigmoid(torch.stack([difference, -difference]))
    return torch.softmax(logits.t().contiguous(), dim=0)


def candidate_ratios(candidate_logits: torch.Tensor) -> torch.Tensor:
    """Softmax of ``candidate_logits [S, n]`` over the candidates: ratios ``[S, n]`` (float32,
    a transposed view; see ``_candidate_ratios_t``)."""
    return _candidate_ratios_t(candidate_logits).t()


def _mix_candidates(codebook: torch.Tensor, index: torch.Tensor, ratios_t: torch.Tensor) -> torch.Tensor:
    """``sum_m ratios_t[m, s] * codebook[index[s, m]]``: ``[S, d]`` in the codebook's dtype.

    One ``[S, d]`` gather per candidate instead of an ``[S, n, d]`` tensor (``index [S, n]`` int32).
    """
    ratios_t = ratios_t.to(codebook.dtype)
    mixed = _gather_rows(codebook, index[:, 0]) * ratios_t[0].unsqueeze(1)
    for m in range(1, index.shape[1]):
        mixed.addcmul_(_gather_rows(codebook, index[:, m]), ratios_t[m].unsqueeze(1))
    return mixed


def soft_reconstruct(
    codebook: torch.Tensor, candidates: torch.Tensor, candidate_logits: torch.Tensor
) -> torch.Tensor:
    """Weighted average of candidate codewords (paper Eq. 7): ``[S, d]``.

    Args:
        codebook: ``[k, d]``.
        candidates: ``[S, n]`` codeword indices (any integer dtype).
        candidate_logits: ``[S, n]``; ratios = softmax over the candidates.
    """
    return _mix_candidates(codebook, candidates.int(), _candidate_ratios_t(candidate_logits))


class _VQWeight(torch.autograd.Function):
    """Dense sub-vectors ``[N, d]`` of a VQ layer: hard rows ``codebook[codes]``, soft rows the
    ratio-weighted candidates (Eq. 7), without keeping intermediates for the backward.

    Plain autograd (gather, softmax, einsum, index_copy) keeps, per layer until the backward, the
    gathered candidates ``[S, n, d]``, the ratios ``[S, n]`` and an int64 copy of ``soft_rows``:
    with n = 2, 48 bytes per sub-vector at w2 and 32 at w3, i.e. 8.0 / 10.7 GB on DiT-XL/2. This
    saves only references to the layer's own tensors and recomputes the cheap O(S n d) ratios and
    gathers in the backward.
    """

    @staticmethod
    def forward(ctx, codebook, candidate_logits, codes, soft_rows, candidates):
        # autocast off: the mix is exact float32 work (einsum would otherwise run in bf16)
        with torch.profiler.record_function("vq4dit::vq_weight"), torch.autocast(codebook.device.type, enabled=False):
            ctx.save_for_backward(codebook, candidate_logits, codes, soft_rows, candidates)
            num_soft = soft_rows.numel()
            if num_soft == 0:
                return _gather_rows(codebook, codes.int())
            mixed = _mix_candidates(codebook, candidates.int(), _candidate_ratios_t(candidate_logits))
            if num_soft == codes.numel():  # every row soft: soft_rows is 0..N-1 (kept ascending)
                return mixed
            flat = _gather_rows(codebook, codes.int())
            return flat.index_copy_(0, soft_rows.long(), mixed)

    @staticmethod
    def backward(ctx, grad_flat):
        codebook, candidate_logits, codes, soft_rows, candidates = ctx.saved_tensors
        with torch.profiler.record_function("vq4dit::vq_weight_backward"), \
                torch.autocast(codebook.device.type, enabled=False):
            grad_flat = grad_flat.to(codebook.dtype)
            num_soft, all_soft = soft_rows.numel(), soft_rows.numel() == codes.numel()
            grad_codebook = grad_logits = None
            if ctx.needs_input_grad[0]:
                grad_codebook = torch.zeros_like(codebook)
                if not all_soft:  # hard rows: each sub-vector's gradient goes to its code
                    grad_hard = grad_flat
                    if num_soft:
                        grad_hard = grad_flat.index_fill(0, soft_rows.long(), 0.0)
                    grad_codebook.index_add_(0, codes.int(), grad_hard)
            if num_soft:
                grad_soft = grad_flat if all_soft else grad_flat.index_select(0, soft_rows)  # [S, d]
                ratios_t = _candidate_ratios_t(candidate_logits)  # [n, S]
                index = candidates.int()
                if ctx.needs_input_grad[1]:
                    # d loss / d ratio_m = <grad, codeword_m>; then the softmax Jacobian
                    dratio = torch.stack([
                        torch.einsum("sd,sd->s", grad_soft, _gather_rows(codebook, index[:, m])).float()
                        for m in range(index.shape[1])
                    ])  # [n, S]
                    dlogits = ratios_t * (dratio - (ratios_t * dratio).sum(0, keepdim=True))
                    grad_logits = dlogits.t().contiguous().to(candidate_logits.dtype)
                if grad_codebook is not None:
                    for m in range(index.shape[1]):
                        grad_codebook.index_add_(0, index[:, m], grad_soft * ratios_t[m].unsqueeze(1).to(grad_soft.dtype))
        return grad_codebook, grad_logits, None, None, None


def vq_weight(
    codebook: torch.Tensor,
    codes: torch.Tensor,
    soft_rows: torch.Tensor,
    candidates: torch.Tensor,
    candidate_logits: torch.Tensor,
) -> torch.Tensor:
    """The dense sub-vectors ``[N, d]`` of a (partly) soft VQ layer, differentiable in the
    codebook and the ratio logits at O(1) extra memory until the backward.

    Args:
        codebook: ``[k, d]``.
        codes: ``[N]`` codes, used for the hard rows.
        soft_rows: ``[S]`` ascending indices of the soft sub-vectors (S = N: all soft).
        candidates: ``[S, n]`` codeword indices of the soft rows.
        candidate_logits: ``[S, n]`` ratio logits of the soft rows (-inf = pruned candidate).
    """
    return _VQWeight.apply(codebook, candidate_logits, codes, soft_rows, candidates)


def hard_reconstruct(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Codewords of the codes: ``codebook [k, d]``, ``codes [N]`` -> ``[N, d]``."""
    return codebook[codes.long()]


class _RatioPenalty(torch.autograd.Function):
    """The ratio regulariser with a closed-form backward: autograd would keep ``1 - r`` (or
    ``2r - 1``) next to ``r``, one more ``[S, n]`` float32 tensor per soft layer until the backward."""

    @staticmethod
    def forward(ctx, ratios, kind):
        ctx.save_for_backward(ratios)
        ctx.kind = kind
        if kind == "paper":
            return (1.0 - (2.0 * ratios - 1.0).abs()).mean()
        return ratios.shape[1] * (ratios * (1.0 - ratios)).mean()

    @staticmethod
    def backward(ctx, grad):
        (ratios,) = ctx.saved_tensors
        scale = grad / ratios.numel()
        if ctx.kind == "paper":  # d(1 - |2r - 1|)/dr = -2 sign(2r - 1)
            return torch.sign(2.0 * ratios - 1.0) * (-2.0 * scale), None
        return (1.0 - 2.0 * ratios) * (ratios.shape[1] * scale), None


def ratio_regularizer(ratios: torch.Tensor, kind: RegularizerKind = "paper") -> torch.Tensor:
    """Mean ratio penalty over ``ratios [S, n]``: 0 when one-hot, largest at 0.5.

    ``paper`` (Eq. 9): mean of ``1 - |2r - 1|``; ``official``: ``n * mean(r (1 - r))``.
    An empty input gives 0.
    """
    if ratios.numel() == 0:
        return ratios.new_zeros(())
    if kind not in ("paper", "official"):
        raise ValueError(f"unknown ratio regularizer {kind!r}; expected 'paper' or 'official'")
    return _RatioPenalty.apply(ratios, kind)


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
