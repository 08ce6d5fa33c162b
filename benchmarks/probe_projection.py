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


def probe_projection(bits: int, lloyd_iters: int, target_iters: int, gain_items: int, check_items: int,
                     draft_iters: int, measure_items: int = 2) -> str:
    """Projected H100 seconds of the bit-allocation probe (default recipe's levers) on DiT-XL/2.

    Measured here on one XL block: every option (k/2, k, 2k) of its 7 layers built with the default's
    levers (row scales, activation-aware k-means, error feedback) plus the predicted error, counted at
    0 and ``lloyd_iters`` Lloyd iterations and scaled linearly to ``target_iters`` (full builds) or
    ``draft_iters`` (``--model.allocation.probe_kmeans_iters``); and one 1-block XL forward over
    ``measure_items`` items x 2 (null labels). The probe's forwards: one recording forward plus one
    per block (block-local gains; the 8 block forwards per block add ~8 model forwards) over
    ``2 x gain_items`` items, and 3 over ``2 x check_items`` (the check), all in fp32.
    "Beyond the run": what the probe adds to a run without allocation, which builds the base ``k`` anyway."""
    from vq4dit.engine.allocation import AllocationConfig, allocation_options
    from vq4dit.engine.probe import Phases, build_options, layer_output_error
    from vq4dit.layers import InputMoments

    torch.manual_seed(0)
    config = VQConfig.from_bits(bits, num_candidates=2, row_scale=True, kmeans_metric="activation", error_feedback=True,
                                ratio_init="confident")
    probe_config = AllocationConfig()
    span, blocks = probe_config.span, preset_config(XL_PRESET)["num_layers"]
    parts: dict[str, list] = {"base": [], "others": [], "drafts": [], "moved": []}
    measured_wall, option_count, phases = 0.0, 0, Phases(0, progress=False)

    def at(iters: int, configs: list, linear, hessian, alone: bool):  # the ops of building ``configs`` as the probe does
        def build():
            moments, configs_at = InputMoments.from_full(hessian), [c.with_overrides(kmeans_iters=iters) for c in configs]
            layers = [VQLinear.from_linear(linear, configs_at[0], "probe", moments)] if alone else \
                build_options(linear, "probe", configs_at, moments, probe_config, phases)
            for layer in layers:
                layer_output_error(linear, layer, hessian)
        with torch.no_grad():
            return count_ops(build)

    def scaled(configs: list, linear, hessian, iters: float, alone: bool = False):  # ops at ``iters`` Lloyd iterations
        at_n, at_0 = at(lloyd_iters, configs, linear, hessian, alone), at(0, configs, linear, hessian, alone)
        per_iter = combine([(1.0 / lloyd_iters, at_n), (-1.0 / lloyd_iters, at_0)])
        return combine([(1.0, at_0), (iters, per_iter)]), at_n.wall_s

    for out_f, in_f in XL_BLOCK_SHAPES.values():
        linear = torch.nn.Linear(in_f, out_f)
        inputs = torch.randn(2048, in_f) * torch.rand(in_f).add(0.1)
        hessian = inputs.t() @ inputs / inputs.shape[0]
        options = allocation_options(config, out_f, in_f, span)
        others = [option for option in options if option != config]
        option_count += len(options)
        for part, configs, iters, alone in (("base", [config], target_iters, True), ("others", others, target_iters, False),
                                            ("drafts", options, draft_iters, False),
                                            ("moved", [max(others, key=lambda o: o.codebook_size)], target_iters, False)):
            counts, wall = scaled(configs, linear, hessian, float(iters), alone)
            parts[part].append(counts)
            measured_wall += wall
    opt, pes = SCENARIOS
    span_s = lambda c: f"{fmt_s(c.projected_s(opt))} - {fmt_s(c.projected_s(pes))}"  # noqa: E731
    base_block, others_block, draft_block, moved_block = (combine([(1.0, c) for c in parts[p]])
                                                          for p in ("base", "others", "drafts", "moved"))
    full_block = combine([(1.0, base_block), (1.0, others_block)])
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_dit(xl_block_folder(f"{tmp}/xl1", num_layers=1)).eval()
        x, t, y = trajectory_inputs(teacher, measure_items)
        with torch.no_grad():
            forward = count_ops(lambda: teacher(torch.cat([x, x]), timestep=torch.cat([t, t]),
                                                class_labels=torch.cat([y, torch.full_like(y, 1000)])))
    per_model_item = blocks / measure_items  # a 1-block forward ~ one block of the 28
    forwards = combine([((blocks + 1 + 8) * gain_items * per_model_item, forward),
                        (3 * check_items * per_model_item, forward)])
    extra_full = combine([(float(blocks), others_block), (1.0, forwards)])
    extra_draft = combine([(float(blocks), draft_block), (1.0, forwards)])
    extra_draft_moved = combine([(1.0, extra_draft), (float(blocks), moved_block)])
    return "\n".join([
        f"### Projected bit-allocation probe, DiT-XL/2 w{bits} (k={config.codebook_size}, d={config.subvector_dim}), "
        f"span {span}: {blocks} blocks x {option_count} options, {blocks + 1} model forwards of {2 * gain_items} items "
        f"(block-local gains) + 3 of {2 * check_items} (check), fp32",
        f"- one XL block, every option in full (the base k as without allocation; k/2 and 2k together: "
        f"k-means {target_iters} Lloyd iterations on {probe_config.probe_points_per_codeword} sub-vectors per codeword, "
        f"one error-feedback pass; prediction): "
        f"projected H100 {span_s(full_block)} (CPU {measured_wall:.1f} s "
        f"measured at {lloyd_iters} iteration(s)); the base k alone {span_s(base_block)}",
        f"- one XL block, drafts at {draft_iters} Lloyd iterations (probe_kmeans_iters {draft_iters}): {span_s(draft_block)}",
        f"- forwards (gains + check): {forwards.flops / 1e15:.2f} PFLOP, projected {span_s(forwards)} "
        f"(one 1-block XL forward over {2 * measure_items} items: CPU {forward.wall_s:.1f} s)",
        f"- **probe beyond the run, every option in full (the default): {span_s(extra_full)}** (goal <= 60 s)",
        f"- probe beyond the run with probe_kmeans_iters {draft_iters}: {span_s(extra_draft)}, plus the full builds of "
        f"the layers that move, up to {span_s(extra_draft_moved)} if every layer moves",
    ])


def main(argv: list[str] | None = None) -> None:
    from vq4dit.engine.allocation import AllocationConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--kmeans-measure-iters", type=int, default=2,
                        help="Lloyd iterations measured (scaled linearly to the probe's count)")
    parser.add_argument("--draft-iters", type=int, default=2, help="probe_kmeans_iters of the drafted row")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(PROJECTION_BANNER)
    print(machine_line())
    defaults = AllocationConfig()
    print(probe_projection(args.bits, args.kmeans_measure_iters, VQConfig().kmeans_iters, defaults.gain_items,
                           defaults.check_items, args.draft_iters))


if __name__ == "__main__":
    main()
