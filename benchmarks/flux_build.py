"""FLUX.1-dev's student build at real size: the statistics passes, projected on an H100.

The build of the default recipe (error feedback: every quantized Linear's full ``E[x x^T]``) runs the float32
teacher over ``statistics_items`` calibration items (``--model.calibration.statistics_items``, default 1,024) with
hooks that accumulate ``x^T x`` (2 x tokens x in² FLOP per layer and item: FLUX.1's ``ff.net.2`` (12,288 in) and
single ``proj_out`` (15,360 in) dominate). Measured here by op counting (``benchmarks/roofline.py``): ONE real
double block and ONE real single block (1-block models, random weights, float32 as the build runs them, no
autocast) at 1024 px on 1 item: the statistics pass (``gather_statistics``) and a plain no-grad forward. Projected
per build: the statistics matmuls once per item and block, plus the teacher's block forwards: 57 per item in one
pass (and with block windows chained through recorded inputs, ``window_inputs`` memory / disk), ``sum over blocks
of the windows reaching it`` per item with windows recomputing from the model's input (477 at K = 4). Each
1-block model's embedders count per block: an upper bound. k-means and error feedback are not in this table
(``benchmarks/flux_scale.py``'s "k-means init + feedback" row).

PROJECTIONS, NOT MEASUREMENTS: no GPU was used.

    python -m benchmarks.flux_build                      # K = 4, 1,024 / 256 / 128 items (~5 min, 1 thread)
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.flux_scale import FLUX_DEV, GUIDANCE, SIDE, TEXT_TOKENS, flux_items, one_block_double, one_block_single
from benchmarks.roofline import PROJECTION_BANNER, SCENARIOS, Counts, count_ops
from vq4dit import VQConfig
from vq4dit.engine.probe import Phases, gather_statistics
from vq4dit.families import FLUX
from vq4dit.quantize import select_layers

STATISTICS = VQConfig(codebook_size=256, subvector_dim=4, error_feedback=True, kmeans_metric="activation",
                      row_scale=True)  # what the statistics depend on: the default recipe's full E[x x^T]


def measure(build) -> tuple[Counts, Counts, int]:
    """(statistics pass, plain forward, block input bytes in float32) of one 1-block model on 1 item."""
    torch.manual_seed(0)
    model = build(FLUX_DEV).eval().requires_grad_(False)
    items = flux_items(FLUX_DEV, 1, TEXT_TOKENS)
    batch = FLUX.conditioning.guided(FLUX.conditioning.batch(items, torch.arange(1)), GUIDANCE)
    selected = select_layers(model, STATISTICS)
    statistics = count_ops(lambda: gather_statistics(model, selected, items, GUIDANCE, False, Phases(0, False)))
    with torch.no_grad():
        forward = count_ops(lambda: FLUX.forward(model, batch))
    tokens, width = (SIDE // 2) ** 2 + TEXT_TOKENS, FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    return statistics, forward, tokens * width * 4  # the image and text streams, float32


def block_passes(blocks: int, size: int) -> list[int]:
    """Per block, the statistics passes that run it with windows of ``size`` recomputing from the model's
    input: pass ``w`` stops after window ``w``'s last block, so block ``b`` runs in the passes ``w >= b // size``."""
    windows = -(-blocks // size)
    return [windows - b // size for b in range(blocks)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-blocks", type=int, default=4)
    parser.add_argument("--items", nargs="+", type=int, default=[1024, 256, 128])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with Timer() as wall:
        (s_double, f_double, boundary), (s_single, f_single, _) = measure(one_block_double), measure(one_block_single)
    doubles, singles = FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"]
    kinds = [(f_double, s_double)] * doubles + [(f_single, s_single)] * singles
    passes = block_passes(len(kinds), args.window_blocks)
    rows = []
    for items in args.items:
        cells = {"statistics matmuls (once per item and block)": [], "teacher forwards, one pass / chained windows": [],
                 f"teacher forwards, windows of {args.window_blocks} recomputing": []}
        for scenario in SCENARIOS:
            forward = [f.projected_s(scenario) for f, _ in kinds]
            hooks = [max(s.projected_s(scenario) - f.projected_s(scenario), 0.0) for f, s in kinds]
            cells["statistics matmuls (once per item and block)"].append(items * sum(hooks))
            cells["teacher forwards, one pass / chained windows"].append(items * sum(forward))
            cells[f"teacher forwards, windows of {args.window_blocks} recomputing"].append(
                items * sum(p * f for p, f in zip(passes, forward)))
        minutes = {k: tuple(v / 60 for v in values) for k, values in cells.items()}
        statistics, once, windowed = minutes.values()
        span = lambda pair: f"{pair[0]:.1f} - {pair[1]:.1f}"  # noqa: E731  (optimistic - pessimistic)
        rows.append([f"{items:,}", span(statistics), span(once), span(windowed),
                     span((statistics[0] + once[0], statistics[1] + once[1])),
                     span((statistics[0] + windowed[0], statistics[1] + windowed[1])),
                     f"{items * boundary / 2**30:.1f}"])
    flops = {kind: (s.flops - f.flops, f.flops) for kind, s, f in (("double", s_double, f_double), ("single", s_single, f_single))}
    print(PROJECTION_BANNER)
    print(machine_line(label="op counts measured on"), f"({wall.seconds:.0f} s)")
    print("`python -m benchmarks.flux_build " + f"--window-blocks {args.window_blocks} --items {' '.join(map(str, args.items))}`")
    print("per item, float32: " + "; ".join(f"{kind} block: statistics matmuls {h / 1e12:.2f} TFLOP, forward {f / 1e12:.2f} TFLOP"
                                            for kind, (h, f) in flops.items()) + "\n")
    print(markdown_table(["statistics items", "statistics matmuls, H100 min", "teacher forwards once (one pass, or "
                          "chained windows), H100 min", f"teacher forwards, windows of {args.window_blocks} "
                          "recomputing, H100 min", "build statistics, chained windows (or one pass), H100 min",
                          f"build statistics, windows of {args.window_blocks} recomputing, H100 min",
                          "recorded block inputs, float32, GiB (chained windows)"], rows))


if __name__ == "__main__":
    main()
