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

Recipes (``--recipes``, default both): every run is built as ``train.py fit --model.recipe R`` builds
it (``vq4dit.recipes.apply_recipe`` over the config's settings). The default recipe's rows also count
its input statistics (``gather_statistics`` on one engine batch, scaled to the engine's batches; the
full ``E[x x^T]`` of every error-feedback layer) and its error feedback in the k-means initialisation.

    python -m benchmarks.projection                      # w2 and w3, both recipes (5-8 min here, 1 thread)
    python -m benchmarks.projection --bits 2 --recipes quality --no-trajectory-batch
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

import torch

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.projection_kmeans import host_kmeans_seconds, kmeans_backend_name, measure_kmeans, project_kmeans
from benchmarks.projection_report import CAVEATS, assumptions, step_table, top_ops
from benchmarks.recipe_configs import LABELS, RECIPES, STATISTICS_ITEMS, needs_statistics, random_items, recipe_settings
from benchmarks.roofline import H100, PROJECTION_BANNER, SCENARIOS, XL_PRESET, Counts, count_ops, fit_blocks, fmt_s
from benchmarks.throughput import ITEMS, CalibrationStep, FineTuneStep, make_batch, xl_block_folder
from callbacks import CandidatePruning
from vq4dit.engine import CalibrationConfig, Calibrator
from vq4dit.engine.probe import Phases, gather_statistics
from vq4dit.engine.statistics import strided_items
from vq4dit.models import default_linear_filter, load_dit, preset_config
from vq4dit.quantize import select_layers
from vq4dit.recipes import Recipe
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
    items = random_items(teacher, samples, seed, null_copies=False)
    return items["x"], items["t"], items["y"]


def run_settings(config: dict, recipe: Recipe, bits: int, kmeans_iters: int) -> tuple[VQConfig, CalibrationConfig]:
    """The resolved ``(vq, calibration)`` of the run ``config`` (nested ``model.vq`` / ``model.calibration``)
    under ``recipe`` at ``bits``: the fields the config sets, the recipe's for the others; ``kmeans_iters``
    for the measured students (values do not change op counts) and the preset's k and d for ``bits``."""
    model = config["model"]
    vq = {k: v for k, v in (model.get("vq") or {}).items()
          if v is not None and k not in ("bits", "codebook_size", "subvector_dim")}
    calibration = {k: v for k, v in (model.get("calibration") or {}).items() if v is not None}
    return recipe_settings(recipe, bits, calibration, **{**vq, "kmeans_iters": kmeans_iters})


def tag(bits: int, recipe: Recipe) -> str:
    """Row key prefix: ``w2`` (default recipe), ``w2-paper``."""
    return f"w{bits}" if recipe == "quality" else f"w{bits}-{LABELS[recipe]}"


def measure_statistics(teacher, vq_config: VQConfig, guidance: float) -> Counts:
    """The default's input statistics (``gather_statistics``, as ``Calibrator.build`` runs it: fp32
    teacher, no autocast) over one engine batch: 8 random items + their null-label copies."""
    selected = select_layers(teacher, vq_config)
    items = random_items(teacher, 8, null_copies=False)
    phases = Phases(0, progress=False)
    return count_ops(lambda: gather_statistics(teacher, selected, items, guidance, False, phases))


def measure_calibration(source: str, bits: int, config: dict, kmeans_iters: int, fp_rows: bool,
                        trajectory_samples: list[int], recipe: Recipe = "quality") -> dict[str, Counts]:
    """Counts of the runs of one model (``source``) at ``bits`` under ``recipe``: calibration step all
    soft and all hard, validation step (hard), the input statistics where the recipe needs them; with
    ``fp_rows`` also the teacher forwards and an FP step. Keys start with :func:`tag`."""
    data_cfg, key = config["data"], tag(bits, recipe)
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
    vq_config, calibration = run_settings(config, recipe, bits, kmeans_iters)
    items = None
    if needs_statistics(vq_config):
        rows[f"{key}_stats"] = measure_statistics(teacher, vq_config, data_cfg.get("guidance_scale", 4.0))
        items = random_items(teacher, 4)
    # the batch holds its null labels already (guidance 1: the engine adds none)
    engine = Calibrator.build(teacher, vq_config, calibration, guidance_scale=1.0, progress=False, items=items)
    if fp_rows:
        x, t, y = batch

        def teacher_forward() -> None:
            with torch.no_grad(), bf16_autocast():
                engine.teacher(x, timestep=t, class_labels=y)

        rows["teacher"] = count_ops(teacher_forward)
    pruning = CandidatePruning(**callback_args(config, "callbacks.CandidatePruning"))
    step = CalibrationStep(engine, pruning, bf16_autocast)
    steady_optimizer(step.optimizer)
    rows[f"{key}_soft"] = count_ops(lambda: step(batch))
    engine.finalize_()  # every VQ layer hard (argmax of its candidates): the codebook-only phase
    step.optimizer = steady_optimizer(engine.make_optimizer())
    rows[f"{key}_hard"] = count_ops(lambda: step(batch))

    def validation() -> None:  # the module's validation_step under Lightning's inference_mode + autocast
        with torch.inference_mode(), bf16_autocast():
            block_mse, _ = engine.block_losses(batch)
            block_mse.mean()  # the logged val/block_mse

    rows[f"{key}_val"] = count_ops(validation)
    return rows


def quantized_layer_shapes(preset: str = XL_PRESET) -> list[tuple[int, int]]:
    """``(out, in)`` of every Linear the default filter quantizes in ``preset`` (built on meta)."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        model = DiTTransformer2DModel(**preset_config(preset))
    return [(m.out_features, m.in_features) for name, m in model.named_modules() if default_linear_filter(m, name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="calibration recipes, one row each (quality: the default)")
    parser.add_argument("--layers", type=int, nargs=2, default=[1, 2], help="block counts of the two measured models")
    parser.add_argument("--target-layers", type=int, default=preset_config(XL_PRESET)["num_layers"])
    parser.add_argument("--config", nargs="+", default=["configs/dit_xl2.yaml"],
                        help="the calibration run's --config files (the bit-width comes from --bits, the recipe from --recipes)")
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
    hardware, started = H100, Timer()
    soft_steps = dict(tuple(map(int, item.split(":"))) for item in args.soft_steps)
    config = read_config(*(ROOT / path for path in args.config))
    runs = [(bits, recipe) for bits in args.bits for recipe in args.recipes]
    samples_per_call = default_arg(generate_items, "samples_per_call")
    trajectory_samples = [ITEMS] + ([] if args.no_trajectory_batch else [samples_per_call])

    measured: dict[str, dict[int, Counts]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            folder = xl_block_folder(f"{tmp}/xl{layers}", num_layers=layers)
            for bits, recipe in runs:
                rows = measure_calibration(folder, bits, config, args.kmeans_iters, (bits, recipe) == runs[0],
                                           trajectory_samples, recipe)
                for key, counts in rows.items():
                    measured.setdefault(key, {})[layers] = counts
                print(f"measured: L={layers} {tag(bits, recipe)} ({started.elapsed:.0f} s)", file=sys.stderr, flush=True)
                gc.collect()
    hidden = preset_config(XL_PRESET)["num_attention_heads"] * preset_config(XL_PRESET)["attention_head_dim"]
    shapes = quantized_layer_shapes()
    target_iters = (config["model"].get("vq") or {}).get("kmeans_iters") or VQConfig().kmeans_iters
    settings = {run: run_settings(config, run[1], run[0], target_iters)[0] for run in runs}
    kmeans_parts, host_kmeans = {}, {}
    for run in runs:
        kmeans_parts[run] = measure_kmeans(settings[run], hidden, args.kmeans_measure_iters)
        host_kmeans[run] = host_kmeans_seconds(settings[run], hidden, target_iters)
        print(f"measured: k-means {tag(*run)} ({started.elapsed:.0f} s)", file=sys.stderr, flush=True)
    fitted = {key: fit_blocks(by_layers, args.target_layers) for key, by_layers in measured.items()}
    kmeans_total = {run: project_kmeans(kmeans_parts[run], hidden, args.kmeans_measure_iters, target_iters, shapes)
                    for run in runs}

    opt, pes = SCENARIOS
    data = config["data"]
    classes, steps = data["classes_per_trajectory"], data["num_steps"]
    print(f"\n{PROJECTION_BANNER}\n")
    print(f"{machine_line(label='measured on')}; runs: random-init {XL_PRESET} with L = "
          f"{' and '.join(map(str, args.layers))} blocks, fitted cost(L) = outside + L * per_block, shown at "
          f"L = {args.target_layers}")
    print(assumptions(hardware, (config["model"].get("calibration") or {}).get("teacher_dtype"), ITEMS))

    # ---------------------------------------------------------------------------- table 1
    labels = {"teacher": f"teacher forward alone, batch {2 * ITEMS} (calibration: bf16 teacher, autocast)",
              "fp_step": f"FP fine-tuning step, batch {2 * ITEMS} (bf16-mixed, RMSprop, all params)",
              f"traj{ITEMS}": f"trajectory sampling step, {ITEMS} samples = batch {2 * ITEMS} (fp32, CFG)",
              f"traj{samples_per_call}": f"trajectory sampling step, {samples_per_call} samples = batch "
                                         f"{2 * samples_per_call} (fp32, CFG; generate_items' batching)"}
    for (b, r), vq in settings.items():
        name = f"{tag(b, r)} ({LABELS[r]} recipe)"
        labels.update({
            f"{tag(b, r)}_soft": f"calibration step {name}, k={vq.codebook_size}, d={vq.subvector_dim}, "
                                 f"n={vq.num_candidates}, all soft",
            f"{tag(b, r)}_hard": f"calibration step {name}, all hard (codebook-only)",
            f"{tag(b, r)}_val": f"validation step {name}, hard student (inference_mode)",
            f"{tag(b, r)}_stats": f"input statistics {name}: one engine batch of 8 items + 8 null (fp32 teacher)"})
    order = [f"{tag(*run)}_{kind}" for run in runs for kind in ("soft", "hard")] + ["fp_step", "teacher"] + \
        [f"traj{s}" for s in trajectory_samples] + [f"{tag(*run)}_{kind}" for run in runs for kind in ("val", "stats")]
    print(f"\n### Table 1: projected time of one step on one H100 SXM (DiT-XL/2-256, {args.target_layers} blocks)\n")
    print(step_table([(labels[k], fitted[k], measured[k]) for k in order if k in fitted], args.target_layers, hardware))
    print(f"\nCPU columns: measured here under the counting mode (1 thread, shared 2-core machine), at L = "
          f"{' / '.join(map(str, args.layers))} blocks; not projected.")
    for run in runs:
        k = kmeans_total[run]
        print(f"k-means init {tag(*run)} (all {len(shapes)} core Linears, {sum(o * i for o, i in shapes):,} weights, "
              f"{target_iters} Lloyd iterations, torch backend{', error feedback' if settings[run].error_feedback else ''})"
              f": {k.flops / 1e12:.2f} TFLOP, {k.bytes / 1e9:.0f} GB, {k.kernels:,.0f} kernels, {k.syncs:,.0f} syncs -> "
              f"projected {fmt_s(k.projected_s(opt))} - {fmt_s(k.projected_s(pes))} (measured: one {hidden}x{hidden} "
              f"layer, seeding + {args.kmeans_measure_iters} Lloyd iterations, CPU {kmeans_parts[run]['layerN'].wall_s:.1f} s; "
              f"Lloyd cost scaled linearly in iterations and sub-vectors, seeding per layer)")

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
    traj, alt = fitted[traj_key], fitted[f"traj{ITEMS}"]
    alt_forwards = (data["num_trajectories"] + data.get("val_trajectories", 0)) * steps
    epoch_steps = data["num_trajectories"] * classes * steps // data["batch_size"]
    stat_batches = len(strided_items(train_samples * steps, STATISTICS_ITEMS).split(8))
    max_steps = callback_args(config, "callbacks.CalibrationStop").get("max_steps", 50000)
    print(f"\n### Table 2: projected total calibration time on one H100 SXM (DiT-XL/2-256, "
          f"{data['num_trajectories']} trajectories x {classes} classes x {steps} steps)\n")
    print(f"trajectories: {traj_text}: {fmt_s(trajectory_forwards * traj.projected_s(opt))} - "
          f"{fmt_s(trajectory_forwards * traj.projected_s(pes))} (one trajectory per batch-{2 * ITEMS} forward instead: "
          f"{alt_forwards} x batch {2 * ITEMS}: {fmt_s(alt_forwards * alt.projected_s(opt))} - "
          f"{fmt_s(alt_forwards * alt.projected_s(pes))})")
    print(f"statistics (default recipe): {stat_batches} engine batches (the first {STATISTICS_ITEMS} items, 8 + 8 null "
          f"each) x the measured batch; the full E[x x^T] of the error-feedback layers: "
          f"{sum(i * i * 4 for _, i in shapes) / 1e9:.2f} GB fp32 on the GPU during the build (freed after it)")
    print(f"schedule: soft-phase cost for the first {', '.join(f'{soft_steps[b]} (w{b})' for b in args.bits if b in soft_steps)} "
          f"steps (steps until all layers were hard on the reference model, README, paper recipe), hard cost afterwards; "
          f"conservative: soft cost for every step. Step counts: {args.stop_steps} = default stop rule on the reference "
          f"model; {epoch_steps} = one epoch of this config; {max_steps} = CalibrationStop max_steps (official budget)\n")
    rows = []
    for b, r in runs:
        km, soft, hard = kmeans_total[b, r], fitted[f"{tag(b, r)}_soft"], fitted[f"{tag(b, r)}_hard"]
        stats = fitted.get(f"{tag(b, r)}_stats", Counts())
        prep = {s.name: km.projected_s(s) + stat_batches * stats.projected_s(s) if stats.kernels else km.projected_s(s)
                for s in SCENARIOS}
        for n_steps in (args.stop_steps, epoch_steps, max_steps):
            for schedule in ("soft, then hard", "all soft (conservative)"):
                n_soft = min(n_steps, soft_steps.get(b, n_steps)) if schedule == "soft, then hard" else n_steps
                cost = {s.name: n_soft * soft.projected_s(s) + (n_steps - n_soft) * hard.projected_s(s) for s in SCENARIOS}
                fixed = {s.name: prep[s.name] + trajectory_forwards * traj.projected_s(s) for s in SCENARIOS}
                rows.append([
                    b, LABELS[r], f"{n_steps:,}", schedule,
                    f"{fmt_s(stat_batches * stats.projected_s(opt))} - {fmt_s(stat_batches * stats.projected_s(pes))}"
                    if stats.kernels else "-",
                    f"{fmt_s(km.projected_s(opt))} - {fmt_s(km.projected_s(pes))}",
                    f"{fmt_s(trajectory_forwards * traj.projected_s(opt))} - {fmt_s(trajectory_forwards * traj.projected_s(pes))}",
                    f"{fmt_s(cost[opt.name])} - {fmt_s(cost[pes.name])}",
                    f"**{fmt_s(fixed[opt.name] + cost[opt.name])} - {fmt_s(fixed[pes.name] + cost[pes.name])}**"])
    print(markdown_table(["bits", "recipe", "steps", "schedule", "statistics", "k-means init (+ feedback)",
                          "trajectories", "optimisation steps", "**total (low - high)**"], rows))
    val_batches = data.get("val_trajectories", 0) * classes * steps // data["batch_size"]
    for run in runs:
        v = fitted[f"{tag(*run)}_val"]
        print(f"not in the totals, {tag(*run)}: validation, one pass = {val_batches} batches x validation step = "
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
    for run in runs:
        per_layer = host_kmeans[run]
        print(f"  k-means {tag(*run)} ({'faiss' if kmeans_backend_name() == 'faiss' else 'torch'}, {target_iters} "
              f"iterations{', error feedback' if settings[run].error_feedback else ''}): {per_layer:.1f} s for one "
              f"{hidden}x{hidden} layer x {weights / hidden ** 2:.0f} (weights ratio) = {fmt_s(per_layer * weights / hidden ** 2)}")
    print("\nCaveats")
    for number, text in enumerate(CAVEATS, 1):
        print(f"  {number}. {text}")

    key = f"{tag(*runs[0])}_soft"
    print(f"\n### Where the projected time goes: {labels[key]}, L = {args.target_layers}, optimistic, top {args.top} aten ops\n")
    print(top_ops(fitted[key], args.top))
    print(f"\nscript wall time: {started.elapsed:.0f} s")


if __name__ == "__main__":
    main()
