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
    from vq4dit.engine.probe import layer_output_error
    from vq4dit.layers import InputMoments

    torch.manual_seed(0)
    config = VQConfig.from_bits(bits, num_candidates=2, row_scale=True, kmeans_metric="activation", error_feedback=True,
                                ratio_init="confident")
    span, blocks = AllocationConfig().span, preset_config(XL_PRESET)["num_layers"]
    full, draft, base_full, moved_max, measured_wall, option_count = [], [], [], [], 0.0, 0

    def at(iters: int, configs: list, linear, hessian):  # the ops of building ``configs`` together
        def build():
            layers = VQLinear.from_linear_options(linear, [c.with_overrides(kmeans_iters=iters) for c in configs],
                                                  "probe", InputMoments.from_full(hessian))
            for layer in layers:
                layer_output_error(linear, layer, hessian)
        with torch.no_grad():
            return count_ops(build)

    def scaled(configs: list, linear, hessian, iters: float):  # ops at ``iters`` Lloyd iterations
        at_n, at_0 = at(lloyd_iters, configs, linear, hessian), at(0, configs, linear, hessian)
        per_iter = combine([(1.0 / lloyd_iters, at_n), (-1.0 / lloyd_iters, at_0)])
        return combine([(1.0, at_0), (iters, per_iter)]), per_iter, at_n.wall_s, at_0

    for out_f, in_f in XL_BLOCK_SHAPES.values():
        linear = torch.nn.Linear(in_f, out_f)
        inputs = torch.randn(2048, in_f) * torch.rand(in_f).add(0.1)
        hessian = inputs.t() @ inputs / inputs.shape[0]
        options = allocation_options(config, out_f, in_f, span)
        others = [option for option in options if option != config]
        option_count += len(options)
        together, per_iter_all, wall, _ = scaled(options, linear, hessian, float(target_iters))
        alone, per_iter_base, wall_base, base_at_0 = scaled([config], linear, hessian, float(target_iters))
        largest, _, wall_largest, _ = scaled([max(others, key=lambda o: o.codebook_size)], linear, hessian,
                                          float(target_iters))
        full.append(together)
        base_full.append(alone)
        moved_max.append(largest)
        # drafts: the base in full, the others and a draft of the base (for the ratio) at draft_iters
        per_iter_others = combine([(1.0, per_iter_all), (-1.0, per_iter_base)])
        draft.append(combine([(1.0, together), (-float(target_iters), per_iter_others),
                              (float(draft_iters), per_iter_others), (1.0, base_at_0),
                              (float(draft_iters), per_iter_base)]))
        measured_wall += wall + wall_base + wall_largest
    opt, pes = SCENARIOS
    span_s = lambda c: f"{fmt_s(c.projected_s(opt))} - {fmt_s(c.projected_s(pes))}"  # noqa: E731
    full_block, base_block = combine([(1.0, c) for c in full]), combine([(1.0, c) for c in base_full])
    draft_block, moved_block = combine([(1.0, c) for c in draft]), combine([(1.0, c) for c in moved_max])
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_dit(xl_block_folder(f"{tmp}/xl1", num_layers=1)).eval()
        x, t, y = trajectory_inputs(teacher, measure_items)
        with torch.no_grad():
            forward = count_ops(lambda: teacher(torch.cat([x, x]), timestep=torch.cat([t, t]),
                                                class_labels=torch.cat([y, torch.full_like(y, 1000)])))
    per_model_item = blocks / measure_items  # a 1-block forward ~ one block of the 28
    forwards = combine([((blocks + 1 + 8) * gain_items * per_model_item, forward),
                        (3 * check_items * per_model_item, forward)])
    extra_full = combine([(float(blocks), full_block), (-float(blocks), base_block), (1.0, forwards)])
    extra_draft = combine([(float(blocks), draft_block), (-float(blocks), base_block), (1.0, forwards)])
    extra_draft_moved = combine([(1.0, extra_draft), (float(blocks), moved_block)])
    return "\n".join([
        f"### Projected bit-allocation probe, DiT-XL/2 w{bits} (k={config.codebook_size}, d={config.subvector_dim}), "
        f"span {span}: {blocks} blocks x {option_count} options, {blocks + 1} model forwards of {2 * gain_items} items "
        f"(block-local gains) + 3 of {2 * check_items} (check), fp32",
        f"- one XL block, every option in full, each layer's options built together (k-means {target_iters} Lloyd "
        f"iterations, one error-feedback pass, prediction): "
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
