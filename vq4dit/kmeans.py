"""k-means codebook initialisation: k-means++ seeding on a subsample, then Lloyd iterations on
all sub-vectors (torch on any device, or faiss on the CPU: the same algorithm, faster there)."""

from __future__ import annotations

import torch

from .codewords import codeword_features, nearest_codewords, weighted_features


def _sample_rows(num_rows: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct row indices (all rows when count >= num_rows), on the CPU."""
    if count >= num_rows:
        return torch.arange(num_rows, device="cpu")
    return torch.randperm(num_rows, generator=generator, device="cpu")[:count]


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on ``points [S, d]`` (distances weighted by ``weights
    [S, d]`` when given): returns ``[k, d]``."""
    num_points = points.shape[0]
    # All random draws up front (CPU generator): the result does not depend on the device.
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64, device="cpu").to(points.device)
    first = min(int(uniforms[0] * num_points), num_points - 1)
    if weights is None:
        centroids = torch.empty(k, points.shape[1], dtype=points.dtype, device=points.device)
        centroids[0] = points[first]
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
    # weighted: the distance to point c is one product features . [1, -2c, c^2], so a step is a few
    # kernels (the seeding is k sequential steps: launch-bound on a GPU)
    features, as_codewords = weighted_features(points, weights), codeword_features(points)  # [S, 3d] each
    closest_sq = (features @ as_codewords[first]).clamp_(min=0.0).double()
    choices = torch.empty(k, dtype=torch.int64, device=points.device)
    choices[0] = first
    for j in range(1, k):
        cumulative = closest_sq.cumsum(0)
        target = uniforms[j] * cumulative[-1]
        choice = torch.searchsorted(cumulative, target.unsqueeze(0)).clamp_(max=num_points - 1)
        choices[j] = choice[0]
        torch.minimum(closest_sq, (features @ as_codewords[choice[0]]).clamp_(min=0.0), out=closest_sq)
    return points[choices]


def _update_centroids(
    points: torch.Tensor, assign: torch.Tensor, sq_dist: torch.Tensor, centroids: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of each cluster (per dimension weighted by ``weights [N, d]`` when given); an empty
    cluster is re-seeded at a currently worst-fit point."""
    k = centroids.shape[0]
    new_centroids = centroids.clone()
    if weights is None:
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        filled = counts > 0
        new_centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
    else:
        sums = torch.zeros_like(centroids).index_add_(0, assign, weights * points)
        mass = torch.zeros_like(centroids).index_add_(0, assign, weights)  # [k, d]
        filled = torch.bincount(assign, minlength=k) > 0
        new_centroids[filled] = sums[filled] / mass[filled].clamp(min=torch.finfo(mass.dtype).tiny)
    empty = (~filled).nonzero().squeeze(1)
    if empty.numel():
        worst = sq_dist.topk(min(empty.numel(), sq_dist.numel())).indices
        new_centroids[empty[: worst.numel()]] = points[worst]
    return new_centroids


def _lloyd_torch(points: torch.Tensor, centroids: torch.Tensor, iters: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd iterations with blocked distances (any device), weighted by ``weights [N, d]``."""
    for _ in range(iters):
        assign, sq_dist = nearest_codewords(points, centroids, 1, weights)
        centroids = _update_centroids(points, assign[:, 0], sq_dist[:, 0], centroids, weights)
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
    weights: torch.Tensor | None = None,
    lloyd_points_per_cluster: int | None = None,
) -> torch.Tensor:
    """k-means on ``points [N, d]``: returns the codebook ``[k, d]`` (float32, points' device).

    k-means++ seeding on a random subsample of ``seed_points_per_cluster * k`` points, then
    ``iters`` Lloyd iterations on all points. Distances are computed in blocks (memory
    ``O(block * k)``, never ``N x k x d``); empty clusters are re-seeded; deterministic for a
    given seed. ``backend``: ``torch`` (any device), ``faiss`` (CPU), ``auto`` (faiss on CPU when
    installed: same algorithm, measured faster, see benchmarks/kmeans.py). ``weights [N, d]``:
    per-dimension importance of every point (the activation metric; torch backend): distances
    ``sum_j w_j (p_j - c_j)^2`` and per-dimension weighted means. ``lloyd_points_per_cluster``:
    the Lloyd iterations run on a random subsample of this many points per cluster (faiss's
    default cap is 256; None: on all points).
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
    if weights is not None:
        if weights.shape != points.shape:
            raise ValueError(f"weights must have the points' shape {tuple(points.shape)}, got {tuple(weights.shape)}")
        backend = "torch"  # faiss has no weighted k-means
        weights = weights.float()
    if backend not in ("torch", "faiss"):
        raise ValueError(f"unknown k-means backend {backend!r}; expected auto, torch or faiss")
    points = points.float()
    generator = torch.Generator().manual_seed(seed)
    sample_size = min(num_points, seed_points_per_cluster * num_clusters)
    rows = _sample_rows(num_points, sample_size, generator).to(points.device)
    sample, sample_weights = points[rows], None if weights is None else weights[rows]
    # The seeding is k small sequential steps: one thread is fastest (no OpenMP hand-offs).
    threads = torch.get_num_threads()
    if points.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        centroids = _kmeans_plus_plus(sample, num_clusters, generator, sample_weights)
    finally:
        torch.set_num_threads(threads)
    if iters <= 0:
        return centroids
    if lloyd_points_per_cluster is not None and num_points > lloyd_points_per_cluster * num_clusters:
        rows = _sample_rows(num_points, lloyd_points_per_cluster * num_clusters, generator).to(points.device)
        points, weights = points[rows], None if weights is None else weights[rows]
    if backend == "faiss":
        return _lloyd_faiss(points, centroids, iters)
    return _lloyd_torch(points, centroids, iters, weights)
