"""k-means benchmark on DiT-XL/2 layer shapes: our k-means vs faiss (all points) vs RTN.

Prints one markdown table: time and relative weight MSE (||W - W_hat||^2 / ||W||^2) of
vq4dit.kmeans (k-means++ seeding on a subsample + Lloyd on all points; backend auto = faiss on
CPU) and of faiss.Kmeans trained on all points from its own random init (25 iterations, the faiss
default), plus round-to-nearest per-channel at 2 and 3 bits for scale.

    python -m benchmarks.kmeans             # all rows (about 3 minutes on 2 cores)
    python -m benchmarks.kmeans --quick     # 1152x1152 only
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_line, markdown_row, markdown_table, timed
from vq4dit.kmeans import kmeans, kmeans_backend
from vq4dit.vq_config import VQConfig
from vq4dit.baselines import round_to_nearest
from vq4dit.codewords import nearest_codewords, relative_error, to_subvectors

SHAPES = [(1152, 1152), (6912, 1152), (4608, 1152), (1152, 4608)]


def make_weight(shape, kind: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    if kind == "uniform":  # nn.Linear's default init
        bound = in_features**-0.5
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    # heavy-tailed: 0.02 * Student-t with 3 degrees of freedom
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn(3, *shape, generator=generator).pow(2).sum(0)
    return 0.02 * normal / (chi2 / 3).sqrt()


def vq_error(points, codebook) -> float:
    idx, _ = nearest_codewords(points, codebook, 1)
    return relative_error(points, codebook[idx[:, 0]])


def faiss_all(points, k: int):
    import faiss

    km = faiss.Kmeans(points.shape[1], k, niter=25, seed=1, max_points_per_centroid=1 << 30)
    km.train(points.numpy())
    return torch.from_numpy(km.centroids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 1152x1152 shape")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    args = parser.parse_args()
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks.kmeans compares against faiss: pip install faiss-cpu")

    shapes = SHAPES[:1] if args.quick else SHAPES
    print(machine_line(f"our backend: {kmeans_backend('cpu')}") + "\n")
    print(markdown_table(["shape", "weights", "preset", "ours s", "ours rel-MSE", "faiss-all s", "faiss-all rel-MSE",
                          "RTN-2b rel-MSE", "RTN-3b rel-MSE"]))
    for shape in shapes:
        for kind in ("uniform", "student-t3"):
            weight = make_weight(shape, kind, seed=0)
            rtn = [relative_error(weight, round_to_nearest(weight, b)) for b in (2, 3)]
            for preset in ("w2", "w3"):
                config = VQConfig.preset(preset)
                points = to_subvectors(weight, config.subvector_dim).contiguous()
                k = config.codebook_size
                ours_t, ours_cb = timed(lambda: kmeans(points, k, config.kmeans_iters, config.kmeans_seed), args.repeats)
                faiss_t, faiss_cb = timed(lambda: faiss_all(points, k), args.repeats)
                print(markdown_row([f"{shape[0]}x{shape[1]}", kind, f"{preset} (k={k}, d={config.subvector_dim})",
                                    f"{ours_t:.2f}", f"{vq_error(points, ours_cb):.5f}", f"{faiss_t:.2f}",
                                    f"{vq_error(points, faiss_cb):.5f}", f"{rtn[0]:.5f}", f"{rtn[1]:.5f}"]), flush=True)


if __name__ == "__main__":
    main()
