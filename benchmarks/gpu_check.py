"""First GPU run: everything the CPU measurements and projections left open, in one command.

    python -m benchmarks.gpu_check                     # one CUDA GPU (H100/H200/A100): < 8 minutes
    python -m benchmarks.gpu_check --dry-run           # every code path on the CPU, tiny shapes, < 2 minutes

Measures on the first CUDA device (random-weight DiT-XL/2-256 preset; step times do not depend on
the weights), printing the time each section took and one table at the end, and writing it all as
JSON to ``--out`` (default outputs/gpu_check.json, written atomically):

1. the CUDA-only tests: tests/test_kernels.py with the Triton kernels compiled for the GPU
   (Triton interpreter off), the kernels against the PyTorch path, values and gradients;
2. the soft reconstruction of one DiT-XL/2 layer (adaLN 6912x1152, every row soft, n = 2),
   forward + backward, PyTorch path vs the Triton kernels, with their largest difference;
3. per bit width (w2, w3) and recipe (the default, then the paper's: ``benchmarks.recipe_configs``):
   the student build (``Calibrator.build``: the default's input statistics over 1024 random items +
   null copies from teacher forwards, the full ``E[x x^T]`` per layer, k-means, error feedback) with
   its phase seconds and peak memory, and one calibration step (the real ``vq4dit.engine.Calibrator`` step of
   benchmarks/throughput.py: teacher forward, student forward, block losses, ratio regulariser,
   backward, RMSprop, pruning callback) vs one plain FP fine-tuning step (same model, batch 8 =
   4 classes + 4 null labels, block-wise MSE, RMSprop), bf16-mixed (``torch.autocast`` bf16),
   while rows are soft (PyTorch path, then the Triton kernels) and once every layer is hard;
   peak GPU memory (``torch.cuda.max_memory_allocated``) of each;
4. k-means (torch backend on the GPU) of the four DiT-XL/2 layer shapes at w2 and w3;
5. trajectory sampling (fp32 teacher, batch 32, guidance 4): seconds per sampling step;
6. quantized inference of each recipe's student (``decode``, ``decode`` with the Triton decode, ``cached``) vs FP, bf16
   autocast, batch 1 and 8: time per forward, model bytes and the forward's extra peak memory.

Timing: ``torch.cuda.Event`` pairs around each call, after a warm-up call, median of the repeats.
Without CUDA (and without ``--dry-run``) it exits 2 with one line. ``--dry-run`` runs the same
functions on the CPU with the ``tiny`` preset, 1 step each, both recipes, the kernels under Triton's interpreter
(when triton is installed): the first GPU run should not die on a typo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import Timer, machine_line
from benchmarks.gpu_bench import DRY_PLAN, GPU_PLAN, SECTIONS, Bench, Plan, Row, device_description, log, model_mib, table

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ sections


def run_tests(plan: Plan, bench: Bench) -> list[Row]:
    """tests/test_kernels.py in a subprocess: on CUDA with compiled kernels, else the interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["TRITON_INTERPRET"] = "0" if bench.cuda else "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    with Timer() as t:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in result.stdout.splitlines() if l.strip()]
    summary = lines[-1].strip("= ") if lines else result.stderr.strip()[-200:]
    if result.returncode != 0:
        log("kernel tests failed:\n" + result.stdout[-4000:] + result.stderr[-2000:])
    where = "CUDA, compiled kernels" if bench.cuda else "CPU, Triton interpreter"
    return [Row("tests", "tests/test_kernels.py", where, 1e3 * t.seconds, None,
                f"{'ok' if result.returncode == 0 else 'FAILED'}: {summary}", {"returncode": result.returncode})]


def run_kernel(plan: Plan, bench: Bench) -> list[Row]:
    """One layer's soft reconstruction, forward + backward (codebook and logits), torch vs Triton."""
    import torch

    from vq4dit import kernels
    from vq4dit.soft import vq_weight
    from vq4dit.vq_config import VQConfig

    rows = []
    out_features, in_features = plan.kernel_shape
    for bits in plan.bits:
        config = VQConfig.from_bits(bits)
        k, d = config.codebook_size, config.subvector_dim
        num = out_features * in_features // d
        g = torch.Generator().manual_seed(0)
        codebook = torch.randn(k, d, generator=g).to(bench.device).requires_grad_(True)
        codes = torch.randint(0, k, (num,), generator=g).to(torch.uint8).to(bench.device)
        soft_rows = torch.arange(num, dtype=torch.int32, device=bench.device)
        candidates = torch.randint(0, k, (num, 2), generator=g).to(torch.uint8).to(bench.device)
        logits = torch.randn(num, 2, generator=g).to(bench.device).requires_grad_(True)
        upstream = torch.randn(num, d, generator=g).to(bench.device)
        results, times = {}, {}
        for name in ("torch", "triton"):
            if name == "triton" and not kernels.triton_available():
                continue
            kernels.set_backend(name)

            def step():
                codebook.grad = logits.grad = None
                (vq_weight(codebook, codes, soft_rows, candidates, logits) * upstream).sum().backward()

            times[name] = bench.median(step, plan.repeats * 3, plan.warmup)
            step()
            results[name] = (vq_weight(codebook, codes, soft_rows, candidates, logits).detach(),
                             codebook.grad.clone(), logits.grad.clone())
        kernels.set_backend("torch")
        setting = f"w{bits} {out_features}x{in_features}, all soft, n=2"
        rows.append(Row("kernel", "soft reconstruction fwd+bwd (torch)", setting, 1e3 * times["torch"]))
        if "triton" in results:
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(results["torch"], results["triton"]))
            rows.append(Row("kernel", "soft reconstruction fwd+bwd (triton)", setting, 1e3 * times["triton"], None,
                            f"{times['torch'] / times['triton']:.2f}x vs torch; max |diff| {diff:.1e}",
                            {"speedup": times["torch"] / times["triton"], "max_abs_diff": diff}))
        else:
            rows.append(Row("kernel", "soft reconstruction (triton)", setting, None, None, "skipped: triton not installed"))
    return rows


def run_calibration(plan: Plan, bench: Bench, bits: int, recipe: str, state: dict) -> list[Row]:
    """Student build of ``recipe`` (its statistics, k-means, feedback), calibration step (soft: torch,
    triton; hard) vs FP fine-tuning step (measured once per ``bits``), bf16-mixed, batch 8."""
    import torch

    from benchmarks.recipe_configs import LABELS, STATISTICS_ITEMS, build_engine, full_moment_bytes, preparation_note
    from benchmarks.throughput import CalibrationStep, FineTuneStep, make_batch
    from callbacks import CandidatePruning
    from vq4dit import kernels
    from vq4dit.models import load_dit

    device = bench.device
    torch.manual_seed(0)
    teacher = load_dit(plan.preset).to(device)
    batch = tuple(t.to(device) for t in make_batch(teacher))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731  (bf16-mixed)
    setting = f"{plan.preset} w{bits}, batch {batch[0].shape[0]}, bf16-mixed"
    rows = []

    if ("fp", bits) not in state:  # the same for every recipe
        fp = FineTuneStep(teacher, batch, "rmsprop", autocast)
        teacher.cpu()  # the FP step's peak: its own model, gradients, optimizer state, activations
        bench.free()
        bench.reset_peak()
        state["fp", bits] = bench.median(lambda: fp(batch), plan.repeats, plan.warmup)
        rows.append(Row("calibration", "FP fine-tuning step (RMSprop)", setting, 1e3 * state["fp", bits], bench.peak_mib()))
        fp = None  # free its model and optimizer state before the student is built
        bench.free()
        teacher.to(device)
    fp_s = state["fp", bits]

    setting = f"{plan.preset} w{bits} {LABELS[recipe]} recipe, batch {batch[0].shape[0]}, bf16-mixed"
    items = plan.statistics_items or STATISTICS_ITEMS
    bench.reset_peak()
    built = Timer()
    engine = build_engine(teacher, recipe, bits, items, num_candidates=2, kmeans_iters=plan.calibration_kmeans_iters)
    bench.sync()
    moments = full_moment_bytes(engine)
    log(f"  w{bits} {LABELS[recipe]}: student built in {built.elapsed:.1f} s ({preparation_note(engine)})")
    rows.append(Row("calibration", "student build (statistics, k-means, feedback)", setting, 1e3 * built.elapsed,
                    bench.peak_mib(), f"{preparation_note(engine)}; E[x x^T] {moments / 2**20:.0f} MiB; "
                    + (f"statistics over {items} items + null copies; " if "statistics" in engine.phase_seconds else "")
                    + f"{plan.calibration_kmeans_iters} Lloyd iterations",
                    {"recipe": recipe, "phase_seconds": dict(engine.phase_seconds), "full_moments_mib": moments / 2**20}))
    calibration = CalibrationStep(engine, CandidatePruning(every_n_steps=1), autocast)
    backends = ["torch"] + (["triton"] if kernels.triton_available() else [])

    def soft_fraction() -> float:
        layers = engine.layers.values()
        return sum(l.num_soft for l in layers) / max(sum(l.num_subvectors for l in layers), 1)

    times, peaks = {b: [] for b in backends}, {b: 0.0 for b in backends}
    for repeat in range(plan.warmup + plan.repeats):
        for name in backends:  # alternating: both see the same calibration state
            kernels.set_backend(name)
            bench.reset_peak()
            seconds = bench.once(lambda: calibration(batch))
            if repeat >= plan.warmup:
                times[name].append(seconds)
                peaks[name] = max(peaks[name], bench.peak_mib() or 0.0)
    kernels.set_backend("torch")
    soft_after = soft_fraction()
    for name in backends:
        seconds = statistics.median(times[name])
        extra = {"recipe": recipe, "ratio_vs_fp": seconds / fp_s, "soft_fraction_after": soft_after}
        note = f"{seconds / fp_s:.2f}x FP step; {soft_after:.0%} rows soft"
        if name == "triton":
            torch_s = statistics.median(times["torch"])
            extra["speedup_vs_torch"] = torch_s / seconds
            note += f"; {torch_s / seconds:.2f}x vs torch path"
        rows.append(Row("calibration", f"calibration step, soft rows ({name})", setting, 1e3 * seconds,
                        peaks[name] if bench.cuda else None, note, extra))

    engine.finalize_()  # every layer hard: the codebook-only phase
    calibration.optimizer = engine.make_optimizer()
    bench.free()
    bench.reset_peak()
    hard_s = bench.median(lambda: calibration(batch), plan.repeats, plan.warmup)
    rows.append(Row("calibration", "calibration step, all hard (torch)", setting, 1e3 * hard_s, bench.peak_mib(),
                    f"{hard_s / fp_s:.2f}x FP step", {"recipe": recipe, "ratio_vs_fp": hard_s / fp_s}))
    state[bits, recipe] = (teacher, engine)  # the hard student serves the inference section
    calibration = None  # free the optimizer state
    return rows


def run_kmeans(plan: Plan, bench: Bench) -> list[Row]:
    import torch

    from vq4dit.codewords import to_subvectors
    from vq4dit.kmeans import kmeans
    from vq4dit.vq_config import VQConfig

    rows = []
    for bits in plan.bits:
        config = VQConfig.from_bits(bits)
        for out_features, in_features in plan.kmeans_shapes:
            weight = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02).to(bench.device)
            points = to_subvectors(weight, config.subvector_dim)
            seconds = bench.once(lambda: kmeans(points, config.codebook_size, plan.kmeans_iters, backend="torch"))
            rows.append(Row("kmeans", "k-means (torch backend)",
                            f"w{bits} {out_features}x{in_features}: {points.shape[0]} points, k={config.codebook_size}, "
                            f"{plan.kmeans_iters} iters", 1e3 * seconds))
    return rows


def run_sampling(plan: Plan, bench: Bench, teacher) -> list[Row]:
    import torch

    from vq4dit.sampling import SamplerConfig, sample

    labels = torch.arange(plan.sample_batch) % 1000
    config = SamplerConfig(num_steps=plan.sample_steps, guidance_scale=4.0)
    seeds = list(range(plan.sample_batch))
    bench.reset_peak()
    seconds = bench.once(lambda: sample(teacher, labels, seeds, config))
    return [Row("sampling", "trajectory sampling, per step", f"fp32 teacher, batch {plan.sample_batch} (+{plan.sample_batch} null), "
                f"{plan.sample_steps} DDPM steps", 1e3 * seconds / plan.sample_steps, bench.peak_mib())]


def run_inference(plan: Plan, bench: Bench, teacher, student, bits: int, recipe: str) -> list[Row]:
    """FP vs quantized forwards (the student of ``recipe``) under bf16 autocast: ms per forward, model
    MiB + the forward's extra peak."""
    import torch

    from benchmarks.recipe_configs import LABELS
    from benchmarks.throughput import make_batch
    from vq4dit import kernels
    from vq4dit.quantize import set_inference_mode_

    rows = []
    for batch_size in plan.inference_batches:
        x, t, y = (v.to(bench.device) for v in make_batch(teacher))
        reps = -(-batch_size // x.shape[0])
        x, t, y = (v.repeat(reps, *([1] * (v.dim() - 1)))[:batch_size] for v in (x, t, y))
        cases = [("FP", teacher, "torch", None), (f"w{bits} decode", student, "torch", "decode")]
        if kernels.triton_available():
            cases.append((f"w{bits} decode (triton)", student, "triton", "decode"))
        cases.append((f"w{bits} cached", student, "torch", "cached"))
        fp_ms = None
        for name, model, backend, mode in cases:
            kernels.set_backend(backend)
            if mode is not None:
                set_inference_mode_(model, mode)

            def forward(model=model):
                with torch.inference_mode(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
                    model(x, timestep=t, class_labels=y)

            bench.once(forward)  # warm-up (and the cached weights)
            bench.free()
            base = bench.allocated_mib()
            bench.reset_peak()
            ms = 1e3 * bench.median(forward, plan.inference_repeats, 0)
            peak = bench.peak_mib()
            extra_mib = None if peak is None else peak - base
            fp_ms = ms if fp_ms is None else fp_ms
            if mode == "cached":  # the decoded dense weights, kept on the device
                resident = model_mib(model) + sum(
                    l.cached_weight.numel() * l.cached_weight.element_size()
                    for l in model.modules() if getattr(l, "cached_weight", None) is not None) / 2**20
            else:
                resident = model_mib(model)
            rows.append(Row("inference", f"forward {name}", f"batch {batch_size}, bf16 autocast, {LABELS[recipe]} recipe", ms,
                            None if extra_mib is None else resident + extra_mib,
                            f"{ms / fp_ms:.2f}x FP; model {resident:.0f} MiB"
                            + ("" if extra_mib is None else f" + forward {extra_mib:.0f} MiB"),
                            {"recipe": recipe, "model_mib": resident, "forward_extra_mib": extra_mib,
                             "ratio_vs_fp": ms / fp_ms}))
        kernels.set_backend("torch")
        set_inference_mode_(student, "decode")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every code path on the CPU with tiny shapes")
    parser.add_argument("--out", default="outputs/gpu_check.json", help="JSON report (written atomically)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); "
              "run on a GPU machine, or --dry-run to check the code paths on the CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before vq4dit.kernels defines its kernels
        os.environ["TRITON_INTERPRET"] = "1"
    from vq4dit.atomic import atomic_write_text

    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    bench = Bench(torch.device("cpu") if args.dry_run else torch.device("cuda"))
    info = device_description(bench)
    log(f"device: {info['device']}, torch {info['torch']}, triton {info['triton']}, plan {plan.preset}")
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    clock = Timer()

    def section(name: str, fn, *fn_args):
        began = Timer()
        log(f"{name} ...")
        try:
            rows.extend(fn(*fn_args))
        except Exception as err:  # one broken section must not cost the others their GPU time
            log(f"{name} FAILED:\n{traceback.format_exc()}")
            rows.append(Row(name, "ERROR", "", note=f"{type(err).__name__}: {err}"[:300], extra={"error": True}))
        finally:
            seconds[name] = seconds.get(name, 0.0) + began.elapsed
            log(f"{name}: {began.elapsed:.1f} s (total {clock.elapsed:.1f} s)")

    chosen = set(args.sections)
    if "tests" in chosen:
        section("tests", run_tests, plan, bench)
    if "kernel" in chosen:
        section("kernel", run_kernel, plan, bench)
    state: dict = {}
    needs_models = chosen & {"calibration", "sampling", "inference"}
    for index, (bits, recipe) in enumerate((b, r) for b in plan.bits for r in plan.recipes):
        if needs_models:
            section("calibration", run_calibration, plan, bench, bits, recipe, state)
        teacher, engine = state.pop((bits, recipe), (None, None))
        if teacher is None:
            continue
        if "sampling" in chosen and index == 0:
            section("sampling", run_sampling, plan, bench, teacher)
        if "inference" in chosen:
            section("inference", run_inference, plan, bench, teacher, engine.student, bits, recipe)
        del teacher, engine
        bench.free()
    if "kmeans" in chosen:
        section("kmeans", run_kmeans, plan, bench)
    rows = sorted((r for r in rows if r.section in chosen or r.extra.get("error")), key=lambda r: SECTIONS.index(r.section))

    total = clock.elapsed
    print(f"\ngpu_check{' --dry-run (CPU, tiny shapes: no GPU numbers)' if args.dry_run else ''}: "
          f"{info['device']}, triton {info['triton']}, {total:.0f} s")
    print(machine_line() + "\n")
    print(table(rows))
    report = {"info": info, "dry_run": args.dry_run, "plan": asdict(plan), "section_seconds": seconds,
              "total_seconds": total, "rows": [asdict(r) for r in rows]}
    path = atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {path}")
    failed = any(r.extra.get("error") or (r.section == "tests" and r.extra.get("returncode")) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
