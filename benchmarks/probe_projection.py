"""Projected H100 seconds of the bit-allocation probe on DiT-XL/2, from one XL block measured here.

A projection, not a measurement (no GPU): every op of one XL block's probe is counted on the CPU
(``benchmarks.roofline``) and projected on one H100 SXM; the CPU wall time is printed beside it.

    python -m benchmarks.probe_projection --bits 2       # a few minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.common import machine_line
from benchmarks.projection import trajectory_inputs
from benchmarks.roofline import PROJECTION_BANNER, SCENARIOS, XL_PRESET, combine, count_ops, fmt_s
from benchmarks.throughput import xl_block_folder
from vq4dit.layers import VQLinear
from vq4dit.models import load_dit, preset_config
from vq4dit.vq_config import VQConfig

XL_BLOCK_SHAPES = {"norm1.linear": (6912, 1152), "attn1.to_q": (1152, 1152), "attn1.to_k": (1152, 1152),
                   "attn1.to_v": (1152, 1152), "attn1.to_out.0": (1152, 1152), "ff.net.0.proj": (4608, 1152),
                   "ff.net.2": (1152, 4608)}


def probe_projection(bits: int, lloyd_iters: int, target_iters: int, gain_items: int, measure_items: int) -> str:
    """Projected H100 seconds of the default recipe's bit-allocation probe on DiT-XL/2 (28 blocks), from
    one XL block measured here: every option (k/2, k, 2k) of its 7 layers built with the default's levers
    (row scales, activation-aware k-means with ``lloyd_iters`` Lloyd iterations scaled linearly to
    ``target_iters``, error feedback) plus the predicted error, and the gain forwards: one fp32 model
    forward over ``2 x gain_items`` items per layer (196), counted from one XL block forward over
    ``measure_items`` items x 2 and scaled by items and 28 blocks."""
    from vq4dit.engine.allocation import AllocationConfig, allocation_options
    from vq4dit.layers import InputMoments
    from vq4dit.engine.probe import layer_output_error

    torch.manual_seed(0)
    config = VQConfig.from_bits(bits, num_candidates=2, row_scale=True, kmeans_metric="activation", error_feedback=True,
                                ratio_init="confident")
    span, blocks = AllocationConfig().span, preset_config(XL_PRESET)["num_layers"]
    builds, builds0 = [], []
    for out_f, in_f in XL_BLOCK_SHAPES.values():
        linear = torch.nn.Linear(in_f, out_f)
        inputs = torch.randn(2048, in_f) * torch.rand(in_f).add(0.1)
        hessian = inputs.t() @ inputs / inputs.shape[0]
        for option in allocation_options(config, out_f, in_f, span):
            def build(iters, option=option, linear=linear, hessian=hessian):
                layer = VQLinear.from_linear(linear, option.with_overrides(kmeans_iters=iters), "probe", InputMoments.from_full(hessian))
                layer_output_error(linear, layer, hessian)
            with torch.no_grad():
                builds.append(count_ops(lambda: build(lloyd_iters)))
                builds0.append(count_ops(lambda: build(0)))
    built_n, built_0 = combine([(1.0, c) for c in builds]), combine([(1.0, c) for c in builds0])
    per_iter = combine([(1.0 / lloyd_iters, built_n), (-1.0 / lloyd_iters, built_0)])
    block_builds = combine([(1.0, built_0), (float(target_iters), per_iter)])
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_dit(xl_block_folder(f"{tmp}/xl1", num_layers=1)).eval()
        x, t, y = trajectory_inputs(teacher, measure_items)
        with torch.no_grad():
            forward = count_ops(lambda: teacher(torch.cat([x, x]), timestep=torch.cat([t, t]),
                                                class_labels=torch.cat([y, torch.full_like(y, 1000)])))
    layers = len(XL_BLOCK_SHAPES) * blocks
    gains = combine([(layers * blocks * gain_items / measure_items, forward)])  # 1-block model ~ one block
    total = combine([(float(blocks), block_builds), (1.0, gains)])
    opt, pes = SCENARIOS
    return "\n".join([
        f"### Projected bit-allocation probe, DiT-XL/2 w{bits} (k={config.codebook_size}, d={config.subvector_dim}), "
        f"span {span}: {blocks} blocks x {len(builds)} options, {layers} gain forwards of {2 * gain_items} items (fp32)",
        f"- one XL block's option builds (k-means {target_iters} Lloyd iterations, feedback, prediction): CPU "
        f"{built_n.wall_s:.1f} s measured at {lloyd_iters} iteration(s); projected H100 "
        f"{fmt_s(block_builds.projected_s(opt))} - {fmt_s(block_builds.projected_s(pes))} per block",
        f"- gain forwards: {gains.flops / 1e15:.2f} PFLOP, projected {fmt_s(gains.projected_s(opt))} - "
        f"{fmt_s(gains.projected_s(pes))} (one 1-block XL forward over {2 * measure_items} items: CPU {forward.wall_s:.1f} s)",
        f"- probe total projected on one H100: {fmt_s(total.projected_s(opt))} - {fmt_s(total.projected_s(pes))} "
        f"(goal <= 60 s)",
    ])



def main(argv: list[str] | None = None) -> None:
    from vq4dit.engine.allocation import AllocationConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--kmeans-measure-iters", type=int, default=2,
                        help="Lloyd iterations measured (scaled linearly to the probe's count)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(PROJECTION_BANNER)
    print(machine_line())
    print(probe_projection(args.bits, args.kmeans_measure_iters, VQConfig().kmeans_iters, AllocationConfig().gain_items, 2))


if __name__ == "__main__":
    main()
