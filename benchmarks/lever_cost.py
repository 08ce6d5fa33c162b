"""What the quality levers cost on DiT-XL/2's layer shapes: k-means, assignment, statistics.

For each distinct Linear shape of a DiT-XL/2 block (hidden 1152: adaLN 6912x1152, q/k/v/out
1152x1152, MLP in 4608x1152, MLP out 1152x4608) and one setting (k, d), on random weights and a
random positive-definite ``E[x x^T]`` (the cost does not depend on the values), times:

- ``k-means``: the codebook (``vq4dit.kmeans``, activation-weighted, the run's iterations);
- ``nearest``: candidate search of every sub-vector (the default assignment);
- ``feedback``: the error-feedback assignment (``--model.vq.error_feedback``);

and the memory of the statistics each needs per layer (E[x^2]: ``in`` floats; E[x x^T]:
``in^2`` floats). The last lines scale the per-shape times to the 28 blocks of DiT-XL/2.

    python -m benchmarks.lever_cost                         # k=16 d=2, the CPU, 1 thread
    python -m benchmarks.lever_cost --codebook-size 64 --shapes 1152x1152
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_line, markdown_table, timed
from vq4dit.codewords import nearest_codewords, to_subvectors
from vq4dit.error_feedback import error_feedback_assign
from vq4dit.kmeans import kmeans

# out x in, and how many of that shape one DiT-XL/2 block has
XL_SHAPES = {"6912x1152": 1, "1152x1152": 4, "4608x1152": 1, "1152x4608": 1}


def measure(shape: str, k: int, d: int, n: int, iters: int, device: str) -> dict:
    out_features, in_features = map(int, shape.split("x"))
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(device)
    x = torch.randn(4 * in_features, in_features, generator=generator).to(device)
    hessian = x.t() @ x / x.shape[0]
    points = to_subvectors(weight, d)
    weights = hessian.diagonal().view(1, -1).expand(out_features, -1).reshape(-1, d)
    kmeans_s, codebook = timed(lambda: kmeans(points, k, iters, 0, weights=weights))
    nearest_s, _ = timed(lambda: nearest_codewords(points, codebook, n, weights))
    feedback_s, _ = timed(lambda: error_feedback_assign(weight, codebook, hessian, n))
    return {"shape": shape, "kmeans_s": kmeans_s, "nearest_s": nearest_s, "feedback_s": feedback_s,
            "diag_mb": in_features * 4 / 2**20, "full_mb": in_features**2 * 4 / 2**20}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebook-size", type=int, default=16)
    parser.add_argument("--subvector-dim", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--kmeans-iters", type=int, default=25)
    parser.add_argument("--shapes", nargs="*", default=list(XL_SHAPES), help="OUTxIN shapes (default: DiT-XL/2's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(s, args.codebook_size, args.subvector_dim, args.candidates, args.kmeans_iters, args.device)
            for s in args.shapes]
    print(f"lever cost on DiT-XL/2 layer shapes; k={args.codebook_size}, d={args.subvector_dim}, "
          f"n={args.candidates}, {args.kmeans_iters} Lloyd iterations")
    print(machine_line(f"on {args.device}") + "\n")
    print(markdown_table(
        ["layer shape", "per block", "k-means s", "nearest s", "feedback s", "E[x^2] MB", "E[x x^T] MB"],
        [[r["shape"], XL_SHAPES.get(r["shape"], "-"), f"{r['kmeans_s']:.2f}", f"{r['nearest_s']:.2f}",
          f"{r['feedback_s']:.2f}", f"{r['diag_mb']:.3f}", f"{r['full_mb']:.1f}"] for r in rows]))
    if all(s in {r["shape"] for r in rows} for s in XL_SHAPES):
        per = {r["shape"]: r for r in rows}
        total = lambda key: 28 * sum(per[s][key] * count for s, count in XL_SHAPES.items())  # noqa: E731
        print(f"\nDiT-XL/2 (28 blocks): k-means {total('kmeans_s') / 60:.1f} min, nearest {total('nearest_s') / 60:.1f} min, "
              f"feedback {total('feedback_s') / 60:.1f} min; E[x x^T] of every layer {total('full_mb') / 1024:.2f} GB "
              f"(E[x^2]: {total('diag_mb'):.1f} MB)")
    return rows


if __name__ == "__main__":
    main()
