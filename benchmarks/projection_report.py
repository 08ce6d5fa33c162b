"""The report of ``benchmarks/projection.py``: its caveats and its tables (one step per run, the
aten ops where a run's projected time goes)."""

from __future__ import annotations

from benchmarks.common import markdown_table
from benchmarks.roofline import SCENARIOS, Counts, Hardware

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
    "Recipes: the default rows build the student as a fit does (vq4dit.recipes.apply_recipe, Calibrator.build with "
    "calibration items): row scales, activation-aware k-means, error feedback, confident ratios. Its statistics "
    "(fp32 teacher forwards with a hook per Linear, E[x x^T] per error-feedback layer) are counted on one engine "
    "batch and scaled by the engine's batch count; its error feedback is counted on one hidden x hidden layer and "
    "its FLOPs and bytes scaled by out * in^2 per layer (the GPTQ-style update; the in^3 factorisation is scaled the "
    "same way), its kernels and syncs by in (one loop step per column group).",
)


def assumptions(hardware: Hardware, teacher_dtype: str | None, items: int) -> str:
    """The printed assumptions: the projected device, the roofline, what is counted, optimizer, precision."""
    return "\n".join([
        f"projected device: {hardware.name}: bf16 dense {hardware.bf16_flops / 1e12:.0f} TFLOP/s, fp32 matmul "
        f"{hardware.fp32_flops / 1e12:.0f} TFLOP/s (no TF32: PyTorch default), fp32 convolution as TF32 "
        f"{hardware.tf32_flops / 1e12:.0f} TFLOP/s (cuDNN default), HBM3 {hardware.hbm_bytes_per_s / 1e12:.2f} TB/s",
        "per op: max(FLOPs / (peak * mm_eff), bytes / (HBM * mem_eff)) + kernels * launch;  "
        + ";  ".join(f"{s.name}: mm_eff {s.mm_efficiency}, mem_eff {s.mem_efficiency}, launch {s.launch_s * 1e6:.0f} us"
                     for s in SCENARIOS),
        f"host floor: kernels * {hardware.cpu_dispatch_s * 1e6:.0f} us (eager PyTorch issues every kernel from "
        "Python; no CUDA graphs). projected = max(GPU roofline, host floor): low = optimistic, high = pessimistic",
        "counted: every aten op of the step under TorchDispatchMode; FLOPs from torch.utils.flop_counter formulas "
        "(mm, addmm, bmm, baddbmm, convolution, SDPA; 0 for all other ops); bytes = tensor inputs + outputs once "
        "(broadcast dims once, out= buffers written only, copy_/fill_ targets not read); views, allocations: "
        "0 bytes, 0 kernels; each other op 1 kernel, CUDA foreach ops by multi_tensor_apply's launch rule "
        f"({hardware.mta_max_blocks} chunks of {hardware.mta_chunk_elements} elements, tensor table by depth)",
        "optimizer: RMSprop with foreach=True (PyTorch's default for CUDA parameters), state created before the "
        "measured step; host syncs: .item()/bool()/nonzero/boolean-mask indexing (each drains the GPU queue)",
        f"precision: CPU autocast bf16 (Lightning bf16-mixed); teacher_dtype {teacher_dtype} (config); trajectories "
        "and statistics: float32 teacher without autocast (datamodule setup and configure_model run outside the "
        f"precision plugin); batch {2 * items} = {items} classes + {items} null labels",
    ])


def step_table(rows: list[tuple[str, Counts, dict[int, Counts]]], target: int, hardware: Hardware) -> str:
    """Table 1: per ``(label, fitted counts, measured counts per block count)`` the counts, the roofline
    terms and the projected milliseconds of one run, beside the CPU wall time measured here."""
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
    """The ``top`` aten ops of ``counts`` by optimistic projected time, with their share."""
    total = sum(v[3] for v in counts.ops.values()) or 1.0
    ranked = sorted(counts.ops.items(), key=lambda kv: -kv[1][3])[:top]
    return markdown_table(["aten op", "kernels", "GFLOP", "GB moved", "optimistic ms", "share"], [
        [name, f"{kernels:,.0f}", f"{flops / 1e9:.0f}", f"{moved / 1e9:.2f}", f"{seconds * 1e3:.2f}", f"{seconds / total:.1%}"]
        for name, (kernels, flops, moved, seconds) in ranked])
