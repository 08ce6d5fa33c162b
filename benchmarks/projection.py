"""Projected H100 wall time of DiT-XL/2-256 calibration: a roofline model of MEASURED op counts.

There is no GPU here, so nothing this script prints about an H100 is a measurement: it is a
projection, computed from quantities measured on this CPU, with every assumption printed.

Measured: the real calibration step of ``benchmarks/throughput.py`` (``vq4dit.engine.Calibrator``:
teacher forward under no_grad, student forward with soft reconstruction, block losses, ratio
regulariser, backward, RMSprop step, ``CandidatePruning``) run on the CPU under
``torch.autocast("cpu", bfloat16)`` (as Lightning's ``bf16-mixed``) inside :class:`OpCounter`, a
``TorchDispatchMode`` that records every aten op: FLOPs (``torch.utils.flop_counter``'s formulas;
0 for ops it has none for), bytes moved (tensor inputs + tensor outputs: what an unfused eager
kernel reads and writes once; views and allocations: 0 bytes, no kernel) and kernel launches.
Runs on random-init 1- and 2-block DiT-XL/2-256 models give ``cost(L) = outside + L * per_block``,
extrapolated to the 28 blocks of DiT-XL/2. Phases: "all soft" (the first step, every sub-vector
soft: the most expensive) and "all hard" (every VQ layer finalised: the codebook-only phase).

Projected: every op on one H100 SXM by a roofline,
``max(FLOPs / (peak * mm_eff), bytes / (HBM * mem_eff)) + launch`` per kernel, at an optimistic
and a pessimistic setting, plus the CPU-side floor of eager PyTorch (``kernels * 10 us``).
Trajectory generation (fp32 teacher, ``generate_items`` batching) and the k-means initialisation
(torch backend, from one measured layer) are projected the same way (both run on the trainer's
device); their measured CPU times are printed for comparison.

    python -m benchmarks.projection                      # w2 and w3 (2-4 min here, 1 thread)
    python -m benchmarks.projection --bits 2 --no-trajectory-batch
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.roofline import (
    H100, PROJECTION_BANNER, SCENARIOS, XL_PRESET, Counts, Hardware, combine, count_ops, fit_blocks, fmt_s,
)
from benchmarks.throughput import ITEMS, CalibrationStep, FineTuneStep, make_batch, xl_block_folder
from callbacks import CandidatePruning
from vq4dit.codewords import to_subvectors
from vq4dit.engine import CalibrationConfig, Calibrator
from vq4dit.kmeans import kmeans, kmeans_backend
from vq4dit.layers import VQLinear
from vq4dit.lightning import CalibrationModule
from vq4dit.models import default_linear_filter, load_dit, preset_config
from vq4dit.sampling import guided_output
from vq4dit.trajectories import generate_items
from vq4dit.vq_config import VQConfig

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the measured runs


def read_config(*paths: Path) -> dict:
    """The effective LightningCLI config of a calibration run from its ``--config`` files (later ones
    override earlier ones; ``model``, ``data``, ``trainer`` sections, every default filled in)."""
    from train import effective_config

    return effective_config(*paths)


def callback_args(config: dict, class_path: str) -> dict:
    """``init_args`` of the configured callback ``class_path`` ({} if absent)."""
    for callback in config.get("trainer", {}).get("callbacks") or []:
        if callback.get("class_path") == class_path:
            return dict(callback.get("init_args", {}))
    return {}


def default_arg(function: Callable, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def bf16_autocast() -> contextlib.AbstractContextManager:
    """CPU autocast to bfloat16: what Lightning's ``bf16-mixed`` does around the forward."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def steady_optimizer(optimizer: torch.optim.Optimizer, foreach: bool = True) -> torch.optim.Optimizer:
    """Make ``optimizer`` steady-state: ``foreach`` kernels (what PyTorch picks by default for CUDA
    parameters) and its state created by a no-op step (zero gradients, lr 0), so a measured step
    holds no first-step state initialisation. Parameters and their values are unchanged."""
    lrs = []
    for group in optimizer.param_groups:
        group["foreach"] = foreach
        lrs.append(group["lr"])
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def trajectory_inputs(teacher, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``samples`` random latents ``[samples, C, H, W]``, timesteps ``[samples]`` and labels."""
    generator = torch.Generator().manual_seed(seed)
    c = teacher.config
    x = torch.randn(samples, c.in_channels, c.sample_size, c.sample_size, generator=generator)
    t = torch.randint(0, 1000, (samples,), generator=generator)
    y = torch.randint(0, c.num_embeds_ada_norm, (samples,), generator=generator)
    return x, t, y


def measure_calibration(source: str, bits: int, config: dict, kmeans_iters: int, fp_rows: bool,
                        trajectory_samples: list[int]) -> dict[str, Counts]:
    """Counts of the runs of one model (``source``) at ``bits``: calibration step all soft and all
    hard, validation step (hard); with ``fp_rows`` also the teacher forwards and an FP step."""
    model_cfg, data_cfg = config["model"], config["data"]
    if data_cfg.get("batch_size", ITEMS) != ITEMS:
        raise ValueError(f"throughput.make_batch builds {ITEMS} items; the config has batch_size {data_cfg['batch_size']}")
    torch.manual_seed(0)
    teacher = load_dit(source)
    batch = make_batch(teacher)
    rows: dict[str, Counts] = {}
    if fp_rows:  # the float32 teacher, before Calibrator.build casts it (as in a fit: setup comes first)
        guidance, channels = data_cfg.get("guidance_scale", 4.0), data_cfg.get("guided_channels")
        for samples in trajectory_samples:
            x, t, y = trajectory_inputs(teacher, samples)
            with torch.no_grad():
                rows[f"traj{samples}"] = count_ops(lambda: guided_output(teacher, x, t, y, guidance, channels))
        fp = FineTuneStep(teacher, batch, "rmsprop", bf16_autocast)
        steady_optimizer(fp.optimizer)
        rows["fp_step"] = count_ops(lambda: fp(batch))
        del fp
        gc.collect()
    vq_config = VQConfig.from_bits(bits, num_candidates=model_cfg.get("num_candidates", 2), kmeans_iters=kmeans_iters)
    calibration = CalibrationConfig(teacher_dtype=model_cfg.get("teacher_dtype", "float32"))
    # the batch holds its null labels already (guidance 1: the engine adds none)
    engine = Calibrator.build(teacher, vq_config, calibration, guidance_scale=1.0, progress=False)
    if fp_rows:
        x, t, y = batch

        def teacher_forward() -> None:
            with torch.no_grad(), bf16_autocast():
                engine.teacher(x, timestep=t, class_labels=y)

        rows["teacher"] = count_ops(teacher_forward)
    pruning = CandidatePruning(**callback_args(config, "callbacks.CandidatePruning"))
    step = CalibrationStep(engine, pruning, bf16_autocast)
    steady_optimizer(step.optimizer)
    rows[f"w{bits}_soft"] = count_ops(lambda: step(batch))
    engine.finalize_()  # every VQ layer hard (argmax of its candidates): the codebook-only phase
    step.optimizer = steady_optimizer(engine.make_optimizer())
    rows[f"w{bits}_hard"] = count_ops(lambda: step(batch))

    def validation() -> None:  # the module's validation_step under Lightning's inference_mode + autocast
        with torch.inference_mode(), bf16_autocast():
            block_mse, _ = engine.block_losses(batch)
            block_mse.mean()  # the logged val/block_mse

    rows[f"w{bits}_val"] = count_ops(validation)
    return rows


def quantized_layer_shapes(preset: str = XL_PRESET) -> list[tuple[int, int]]:
    """``(out, in)`` of every Linear the default filter quantizes in ``preset`` (built on meta)."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        model = DiTTransformer2DModel(**preset_config(preset))
    return [(m.out_features, m.in_features) for name, m in model.named_modules() if default_linear_filter(m, name)]


def measure_kmeans(bits: int, num_candidates: int, hidden: int, lloyd_iters: int) -> dict[str, Counts]:
    """k-means initialisation of one ``hidden x hidden`` layer with the torch backend (what a CUDA
    run uses): ``seeding`` (k-means++ only), ``layer0`` (``VQLinear.from_linear`` without Lloyd
    iterations: seeding + nearest candidates + ratio init) and ``layerN`` (with ``lloyd_iters``)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(hidden, hidden)
    config = VQConfig.from_bits(bits, num_candidates=num_candidates)
    points = to_subvectors(linear.weight.detach(), config.subvector_dim)
    with mock.patch(f"{kmeans.__module__}.kmeans_backend", return_value="torch"), torch.no_grad():
        return {
            "seeding": count_ops(lambda: kmeans(points, config.codebook_size, 0, backend="torch")),
            "layer0": count_ops(lambda: VQLinear.from_linear(linear, config.with_overrides(kmeans_iters=0))),
            "layerN": count_ops(lambda: VQLinear.from_linear(linear, config.with_overrides(kmeans_iters=lloyd_iters))),
        }


def host_kmeans_seconds(bits: int, num_candidates: int, hidden: int, iters: int) -> float:
    """CPU wall seconds of ``VQLinear.from_linear`` on one ``hidden x hidden`` layer with the default
    backend (faiss when installed) and ``iters`` Lloyd iterations: what ``configure_model`` runs
    today, before Lightning moves the model to the GPU."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(hidden, hidden)
    config = VQConfig.from_bits(bits, num_candidates=num_candidates, kmeans_iters=iters)
    with Timer() as t:
        VQLinear.from_linear(linear, config)
    return t.seconds


def project_kmeans(parts: dict[str, Counts], hidden: int, lloyd_iters: int, target_iters: int,
                   shapes: list[tuple[int, int]]) -> Counts:
    """All layers ``shapes``: per layer the seeding (fixed-size subsample) plus the sub-vector
    proportional part (nearest candidates + ``target_iters`` Lloyd iterations), scaled from
    the measured ``hidden x hidden`` layer by its sub-vector count."""
    seeding, layer0, layer_n = parts["seeding"], parts["layer0"], parts["layerN"]
    per_iter = combine([(1.0 / lloyd_iters, layer_n), (-1.0 / lloyd_iters, layer0)])
    proportional = combine([(1.0, layer0), (-1.0, seeding), (float(target_iters), per_iter)])
    scale = sum(o * i for o, i in shapes) / (hidden * hidden)
    return combine([(float(len(shapes)), seeding), (scale, proportional)])


def kmeans_backend_name() -> str:
    """The k-means backend ``auto`` picks for a large CPU problem here."""
    return kmeans_backend("cpu")


CAVEATS = (
    "Where the work runs. Lightning calls the datamodule's setup (trajectory generation) and configure_model "
    "(k-means, student) before it moves the module to the GPU; CalibrationDataModule.setup therefore moves the "
    "teacher to the trainer's device first, so trajectories, k-means (torch backend) and the student are built on "
    "the GPU, and k-means places its CPU-generator draws explicitly (configure_model runs inside "
    "`with torch.device('cuda')`). Both are tested on the CPU with a stand-in device (tests/test_data.py, "
    "tests/test_memory.py), not yet run on a GPU.",
    "Trajectories in fp32: PyTorch's default float32 matmul precision ('highest') keeps them off the tensor cores "
    "(67 TFLOP/s); torch.set_float32_matmul_precision('high') (TF32) or a bf16 teacher would cut the compute part of that row up to ~7x (TF32) or more (bf16).",
    "Host syncs (.item(), bool(), nonzero, boolean-mask indexing) drain the GPU queue: hundreds per soft step, "
    "nearly all in CandidatePruning (the per-layer .any() checks, boolean masks and nonzero of harden_rows_ / "
    "prune_candidates_), ~3 in Calibrator.step_loss (soft-layer mask, ratio-loss gating). Host and GPU time then partly "
    "add up: a soft step may sit nearer roofline + host floor than their max.",
    "One kernel per aten op: sort/topk/nonzero/SDPA backward launch several on CUDA, some tiny ops none; the host "
    "floor (10 us/op) is conservative for the backward (issued by the C++ autograd engine, not Python).",
    "Bytes assume every tensor comes from HBM (no L2 reuse; H100 L2 = 50 MB) and each kernel reads its inputs "
    "once. The soft reconstruction's einsum('sd,sd->s') runs as bmm of millions of 1 x d x 1 matrices; counted "
    "here as memory-bound, it may run well below HBM bandwidth on cuBLAS.",
    "CPU autocast is not CUDA autocast: the CUDA fp32 list (layer_norm, softmax, mse_loss, ...) differs, and SDPA "
    "runs the CPU flash kernel here (its FLOPs use the CUDA flash formula). Where inputs are fp32 already this "
    "changes nothing.",
    "Calibration schedule: 222 / 211 soft steps, the 325-step stop rule and the soft/hard split are the reference "
    "model's (README); DiT-XL/2's may differ. Values of the random-init models do not change FLOPs; they do change "
    "how many rows the pruning hardens in the measured soft step (its bytes and kernels).",
    "Memory (whether w3's soft phase fits in 80 GB) is not checked here: benchmarks/memory.py.",
)


# ------------------------------------------------------------------------------------- report



def step_table(rows: list[tuple[str, Counts, dict[int, Counts]]], target: int, hardware: Hardware) -> str:
    opt, pes = SCENARIOS
    head = (f"| run (fit to L={target}) | TFLOP | of which fp32 | GB moved | kernels | host syncs "
            f"| compute / memory / launch ms ({opt.name}) | GPU roofline ms {opt.name} | GPU roofline ms {pes.name} "
            f"| host floor ms | **projected H100 ms** | CPU wall s, L=" + " / ".join(str(l) for l in sorted(rows[0][2]))
            + " (measured) | CPU GFLOP/s (measured) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, c, measured in rows:
        walls = " / ".join(f"{measured[l].wall_s:.2f}" for l in sorted(measured))
        gflops = " / ".join(f"{measured[l].flops / max(measured[l].wall_s, 1e-9) / 1e9:.0f}" for l in sorted(measured))
        low, high = c.projected_s(opt, hardware), c.projected_s(pes, hardware)
        lines.append(
            f"| {label} | {c.flops / 1e12:.2f} | {c.flops_fp32 / 1e12:.2f} | {c.bytes / 1e9:.1f} | {c.kernels:,.0f} "
            f"| {c.syncs:,.0f} | {c.compute_s[opt.name] * 1e3:.1f} / {c.memory_s[opt.name] * 1e3:.1f} / "
            f"{c.launch_s[opt.name] * 1e3:.1f} | {c.roofline_s(opt) * 1e3:.1f} | {c.roofline_s(pes) * 1e3:.1f} "
            f"| {c.floor_s(hardware) * 1e3:.1f} | **{low * 1e3:.0f} - {high * 1e3:.0f}** | {walls} | {gflops} |"
        )
    return "\n".join(lines)


def top_ops(counts: Counts, top: int) -> str:
    total = sum(v[3] for v in counts.ops.values()) or 1.0
    ranked = sorted(counts.ops.items(), key=lambda kv: -kv[1][3])[:top]
    return markdown_table(["aten op", "kernels", "GFLOP", "GB moved", "optimistic ms", "share"], [
        [name, f"{kernels:,.0f}", f"{flops / 1e9:.0f}", f"{moved / 1e9:.2f}", f"{seconds * 1e3:.2f}", f"{seconds / total:.1%}"]
        for name, (kernels, flops, moved, seconds) in ranked])


def parse_soft_steps(values: list[str]) -> dict[int, int]:
    out = {}
    for item in values:
        bits, steps = item.split(":")
        out[int(bits)] = int(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--layers", type=int, nargs=2, default=[1, 2], help="block counts of the two measured models")
    parser.add_argument("--target-layers", type=int, default=preset_config(XL_PRESET)["num_layers"])
    parser.add_argument("--config", nargs="+", default=["configs/dit_xl2.yaml"],
                        help="the calibration run's --config files (the bit-width comes from --bits)")
    parser.add_argument("--kmeans-iters", type=int, default=1,
                        help="Lloyd iterations when building the measured students (values do not change op counts)")
    parser.add_argument("--kmeans-measure-iters", type=int, default=2,
                        help="Lloyd iterations measured on one layer (scaled linearly to the configured count)")
    parser.add_argument("--stop-steps", type=int, default=325,
                        help="steps of the default stop rule on the reference model (README, Steps to quality)")
    parser.add_argument("--soft-steps", nargs="+", default=["2:222", "3:211"],
                        help="bits:steps until all layers were hard on the reference model")
    parser.add_argument("--no-trajectory-batch", action="store_true",
                        help="skip the trajectory forward at generate_items' batch (the slowest CPU run)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.suppress(ImportError):  # the students' k-means runs faiss on the CPU
        import faiss

        faiss.omp_set_num_threads(args.threads)
    hardware = H100
    started = Timer()
    soft_steps = parse_soft_steps(args.soft_steps)
    configs = dict.fromkeys(args.bits, read_config(*(ROOT / path for path in args.config)))
    first = configs[args.bits[0]]
    samples_per_call = default_arg(generate_items, "samples_per_call")
    trajectory_samples = [ITEMS] + ([] if args.no_trajectory_batch else [samples_per_call])

    measured: dict[str, dict[int, Counts]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            folder = xl_block_folder(f"{tmp}/xl{layers}", num_layers=layers)
            for bits in args.bits:
                rows = measure_calibration(folder, bits, configs[bits], args.kmeans_iters, bits == args.bits[0],
                                           trajectory_samples)
                for key, counts in rows.items():
                    measured.setdefault(key, {})[layers] = counts
                print(f"measured: L={layers} w{bits} ({started.elapsed:.0f} s)", file=sys.stderr, flush=True)
                gc.collect()
    hidden = preset_config(XL_PRESET)["num_attention_heads"] * preset_config(XL_PRESET)["attention_head_dim"]
    shapes = quantized_layer_shapes()
    target_iters = first["model"].get("kmeans_iters", default_arg(CalibrationModule, "kmeans_iters"))
    kmeans_parts, host_kmeans = {}, {}
    for bits in args.bits:
        kmeans_parts[bits] = measure_kmeans(bits, configs[bits]["model"].get("num_candidates", 2), hidden,
                                            args.kmeans_measure_iters)
        host_kmeans[bits] = host_kmeans_seconds(bits, configs[bits]["model"].get("num_candidates", 2), hidden, target_iters)
        print(f"measured: k-means w{bits} ({started.elapsed:.0f} s)", file=sys.stderr, flush=True)
    fitted = {key: fit_blocks(by_layers, args.target_layers) for key, by_layers in measured.items()}
    kmeans_total = {bits: project_kmeans(kmeans_parts[bits], hidden, args.kmeans_measure_iters, target_iters, shapes)
                    for bits in args.bits}

    # ---------------------------------------------------------------------------- assumptions
    opt, pes = SCENARIOS
    data = first["data"]
    classes, steps = data["classes_per_trajectory"], data["num_steps"]
    print(f"\n{PROJECTION_BANNER}\n")
    print(f"{machine_line(label='measured on')}; runs: random-init {XL_PRESET} with L = "
          f"{' and '.join(map(str, args.layers))} blocks, fitted cost(L) = outside + L * per_block, shown at "
          f"L = {args.target_layers}")
    print(f"projected device: {hardware.name}: bf16 dense {hardware.bf16_flops / 1e12:.0f} TFLOP/s, fp32 matmul "
          f"{hardware.fp32_flops / 1e12:.0f} TFLOP/s (no TF32: PyTorch default), fp32 convolution as TF32 "
          f"{hardware.tf32_flops / 1e12:.0f} TFLOP/s (cuDNN default), HBM3 {hardware.hbm_bytes_per_s / 1e12:.2f} TB/s")
    print("per op: max(FLOPs / (peak * mm_eff), bytes / (HBM * mem_eff)) + kernels * launch;  "
          + ";  ".join(f"{s.name}: mm_eff {s.mm_efficiency}, mem_eff {s.mem_efficiency}, launch {s.launch_s * 1e6:.0f} us"
                       for s in SCENARIOS))
    print(f"host floor: kernels * {hardware.cpu_dispatch_s * 1e6:.0f} us (eager PyTorch issues every kernel from "
          "Python; no CUDA graphs). projected = max(GPU roofline, host floor): low = optimistic, high = pessimistic")
    print("counted: every aten op of the step under TorchDispatchMode; FLOPs from torch.utils.flop_counter formulas "
          "(mm, addmm, bmm, baddbmm, convolution, SDPA; 0 for all other ops); bytes = tensor inputs + outputs once "
          "(broadcast dims once, out= buffers written only, copy_/fill_ targets not read); views, allocations: "
          "0 bytes, 0 kernels; each other op 1 kernel, CUDA foreach ops by multi_tensor_apply's launch rule "
          f"({hardware.mta_max_blocks} chunks of {hardware.mta_chunk_elements} elements, tensor table by depth)")
    print("optimizer: RMSprop with foreach=True (PyTorch's default for CUDA parameters), state created before the "
          "measured step; host syncs: .item()/bool()/nonzero/boolean-mask indexing (each drains the GPU queue)")
    print(f"precision: CPU autocast bf16 (Lightning bf16-mixed); teacher_dtype {first['model'].get('teacher_dtype')} "
          f"(config); trajectories: float32 teacher without autocast (datamodule setup runs before configure_model "
          f"and outside the precision plugin); batch {2 * ITEMS} = {ITEMS} classes + {ITEMS} null labels")

    # ---------------------------------------------------------------------------- table 1
    labels = {
        **{f"w{b}_soft": f"calibration step w{b} (k={VQConfig.from_bits(b).codebook_size}, d="
                         f"{VQConfig.from_bits(b).subvector_dim}, n={configs[b]['model'].get('num_candidates', 2)}), all soft" for b in args.bits},
        **{f"w{b}_hard": f"calibration step w{b}, all hard (codebook-only)" for b in args.bits},
        **{f"w{b}_val": f"validation step w{b}, hard student (inference_mode)" for b in args.bits},
        "teacher": f"teacher forward alone, batch {2 * ITEMS} (calibration: bf16 teacher, autocast)",
        "fp_step": f"FP fine-tuning step, batch {2 * ITEMS} (bf16-mixed, RMSprop, all params)",
        f"traj{ITEMS}": f"trajectory sampling step, {ITEMS} samples = batch {2 * ITEMS} (fp32, CFG)",
        f"traj{samples_per_call}": f"trajectory sampling step, {samples_per_call} samples = batch "
                                   f"{2 * samples_per_call} (fp32, CFG; generate_items' batching)",
    }
    order = [k for b in args.bits for k in (f"w{b}_soft", f"w{b}_hard")] + ["fp_step", "teacher"] + \
        [f"traj{s}" for s in trajectory_samples] + [f"w{b}_val" for b in args.bits]
    print(f"\n### Table 1: projected time of one step on one H100 SXM (DiT-XL/2-256, {args.target_layers} blocks)\n")
    print(step_table([(labels[k], fitted[k], measured[k]) for k in order if k in fitted], args.target_layers, hardware))
    print(f"\nCPU columns: measured here under the counting mode (1 thread, shared 2-core machine), at L = "
          f"{' / '.join(map(str, args.layers))} blocks; not projected.")
    for b in args.bits:
        k = kmeans_total[b]
        print(f"k-means init w{b} (all {len(shapes)} core Linears, {sum(o * i for o, i in shapes):,} weights, "
              f"{target_iters} Lloyd iterations, torch backend): {k.flops / 1e12:.2f} TFLOP, {k.bytes / 1e9:.0f} GB, "
              f"{k.kernels:,.0f} kernels, {k.syncs:,.0f} syncs -> projected {fmt_s(k.projected_s(opt))} - "
              f"{fmt_s(k.projected_s(pes))} (measured: one {hidden}x{hidden} layer, seeding + {args.kmeans_measure_iters} "
              f"Lloyd iterations, CPU {kmeans_parts[b]['layerN'].wall_s:.1f} s; Lloyd cost scaled linearly in "
              f"iterations and sub-vectors, seeding per layer)")

    # ---------------------------------------------------------------------------- table 2
    spc = samples_per_call
    train_samples = data["num_trajectories"] * classes
    val_samples = data.get("val_trajectories", 0) * classes
    calls = math.ceil(train_samples / spc) + math.ceil(val_samples / spc)
    traj_key = f"traj{spc}" if f"traj{spc}" in fitted else f"traj{ITEMS}"
    if traj_key == f"traj{spc}":
        trajectory_forwards, traj_text = calls * steps, (
            f"{calls} generate_items calls ({train_samples} + {val_samples} val samples, {spc} per call, partial calls "
            f"counted full) x {steps} steps at batch {2 * spc}")
    else:
        trajectory_forwards = (data["num_trajectories"] + data.get("val_trajectories", 0)) * steps
        traj_text = f"{data['num_trajectories']} + {data.get('val_trajectories', 0)} val trajectories x {steps} steps at batch {2 * ITEMS}"
    traj = fitted[traj_key]
    alt = fitted[f"traj{ITEMS}"]
    alt_forwards = (data["num_trajectories"] + data.get("val_trajectories", 0)) * steps
    epoch_steps = data["num_trajectories"] * classes * steps // data["batch_size"]
    max_steps = callback_args(first, "callbacks.CalibrationStop").get("max_steps", 50000)
    print(f"\n### Table 2: projected total calibration time on one H100 SXM (DiT-XL/2-256, "
          f"{data['num_trajectories']} trajectories x {classes} classes x {steps} steps)\n")
    print(f"trajectories: {traj_text}: {fmt_s(trajectory_forwards * traj.projected_s(opt))} - "
          f"{fmt_s(trajectory_forwards * traj.projected_s(pes))} (one trajectory per batch-{2 * ITEMS} forward instead: "
          f"{alt_forwards} x batch {2 * ITEMS}: {fmt_s(alt_forwards * alt.projected_s(opt))} - "
          f"{fmt_s(alt_forwards * alt.projected_s(pes))})")
    print(f"schedule: soft-phase cost for the first {', '.join(f'{soft_steps[b]} (w{b})' for b in args.bits if b in soft_steps)} "
          f"steps (steps until all layers were hard on the reference model, README), hard cost afterwards; "
          f"conservative: soft cost for every step. Step counts: {args.stop_steps} = default stop rule on the reference "
          f"model; {epoch_steps} = one epoch of this config; {max_steps} = CalibrationStop max_steps (official budget)\n")
    rows = []
    for b in args.bits:
        km, soft, hard = kmeans_total[b], fitted[f"w{b}_soft"], fitted[f"w{b}_hard"]
        for n_steps in (args.stop_steps, epoch_steps, max_steps):
            for schedule in ("soft, then hard", "all soft (conservative)"):
                n_soft = min(n_steps, soft_steps.get(b, n_steps)) if schedule == "soft, then hard" else n_steps
                cost = {s.name: n_soft * soft.projected_s(s) + (n_steps - n_soft) * hard.projected_s(s) for s in SCENARIOS}
                fixed = {s.name: km.projected_s(s) + trajectory_forwards * traj.projected_s(s) for s in SCENARIOS}
                rows.append([
                    b, f"{n_steps:,}", schedule, f"{fmt_s(km.projected_s(opt))} - {fmt_s(km.projected_s(pes))}",
                    f"{fmt_s(trajectory_forwards * traj.projected_s(opt))} - {fmt_s(trajectory_forwards * traj.projected_s(pes))}",
                    f"{fmt_s(cost[opt.name])} - {fmt_s(cost[pes.name])}",
                    f"**{fmt_s(fixed[opt.name] + cost[opt.name])} - {fmt_s(fixed[pes.name] + cost[pes.name])}**"])
    print(markdown_table(["bits", "steps", "schedule", "k-means init", "trajectories", "optimisation steps",
                          "**total (low - high)**"], rows))
    val_batches = data.get("val_trajectories", 0) * classes * steps // data["batch_size"]
    for b in args.bits:
        v = fitted[f"w{b}_val"]
        print(f"not in the totals, w{b}: validation, one pass = {val_batches} batches x validation step = "
              f"{fmt_s(val_batches * v.projected_s(opt))} - {fmt_s(val_batches * v.projected_s(pes))} "
              f"(Lightning: a 2-batch sanity check, then one pass per epoch; {max_steps // max(epoch_steps, 1)} epochs "
              f"at {max_steps} steps)")
    print("not in the totals: model loading and transfer to the GPU, SampleImages (every 2000 steps), checkpoints, "
          "export, Lightning's per-step loop and logging")
    weights = sum(o * i for o, i in shapes)
    print(f"\nFor comparison, the same work on this CPU (a CPU-only fit), {torch.get_num_threads()} thread(s), "
          f"measured and extrapolated (not projected):")
    print(f"  trajectories: {trajectory_forwards} sampling steps x {fmt_s(traj.wall_s)} (CPU wall of one step at L = "
          f"{args.target_layers}, fitted from the measured L = {'/'.join(map(str, args.layers))} runs) = "
          f"{fmt_s(trajectory_forwards * traj.wall_s)}")
    for b in args.bits:
        per_layer = host_kmeans[b]
        print(f"  k-means w{b} ({'faiss' if kmeans_backend_name() == 'faiss' else 'torch'}, {target_iters} iterations): "
              f"{per_layer:.1f} s for one {hidden}x{hidden} layer x {weights / hidden ** 2:.0f} "
              f"(weights ratio) = {fmt_s(per_layer * weights / hidden ** 2)}")
    print("\nCaveats")
    for number, text in enumerate(CAVEATS, 1):
        print(f"  {number}. {text}")

    key = f"w{args.bits[0]}_soft"
    print(f"\n### Where the projected time goes: {labels[key]}, L = {args.target_layers}, optimistic, top {args.top} aten ops\n")
    print(top_ops(fitted[key], args.top))
    print(f"\nscript wall time: {started.elapsed:.0f} s")


if __name__ == "__main__":
    main()
