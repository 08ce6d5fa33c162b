"""What the default recipe costs against the paper's, phase by phase, and how well the predicted
bit-allocation ranking matches the measured one.

Cost table (``--models``): every row calibrates through ``train.py fit --config configs/demo.yaml``
(in this process, back to back) at regime-matched w2 (k=16, d=2) with ``--model.recipe paper``,
the default recipe, and the default plus bit allocation (opt-in), on the shipped reference DiT and on a
wider random-initialised DiT (192-wide, 8 blocks). Columns: wall seconds of teacher trajectories
(+ set-up), statistics, probe (gain forwards, prediction, solve, check), k-means, error feedback,
calibration steps, export (finalise + write), total, the ratio to the paper row, and on the
reference (trained) model FID/FP and class accuracy/FP of ``--samples`` images.

Ranking (``--ranking``): on the reference model, the predicted sensitivities (``tr(dW H dW^T)`` x
one gain per layer, :mod:`vq4dit.engine.probe`) against the measured ones (one model forward per
option, :func:`vq4dit.engine.allocation.measure_sensitivity`, nearest-codeword start): Spearman rank
correlation over all (layer, option) pairs and over the layers at the base k, the layers where both
allocations agree, and the held-out start output MSE of uniform / predicted / measured allocation.

    python -m benchmarks.recipe_cost --ranking
    python -m benchmarks.recipe_cost --prepare reference wide      # only the pre-calibration phases
    python -m benchmarks.recipe_cost --models reference wide --samples 200 --max-steps 2000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks.common import machine_line
from vq4dit import VQConfig

REGIME_W2 = ["--model.vq.bits=2", "--model.vq.codebook_size=16", "--model.vq.subvector_dim=2"]
ROWS = {"paper": ["--model.recipe=paper"], "default": [], "default+alloc": ["--model.allocation.enabled=true"]}
WIDE = {"num_attention_heads": 6, "attention_head_dim": 32, "in_channels": 4, "out_channels": 8, "num_layers": 8,
        "sample_size": 16, "patch_size": 2, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate", "norm_elementwise_affine": False, "norm_eps": 1e-6}
PHASES = ["trajectories", "statistics", "probe", "kmeans", "feedback", "calibration", "export"]


class PhaseClock(pl.Callback):
    """Timestamps of the fit on the trainer (``trainer.phase_clock``): train start / train end."""

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.phase_clock = {"train_start": time.perf_counter()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        trainer.phase_clock.setdefault("first_step", time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.phase_clock["train_end"] = time.perf_counter()


def wide_model(folder: Path) -> str:
    """A random-initialised 192-wide, 8-block DiT saved as a diffusers folder; returns its path."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(**WIDE).save_pretrained(folder)
    return str(folder)


def calibrate(model_args: list[str], row: str, max_steps: int) -> dict:
    """One ``train.py fit`` row: the student, its phase seconds and total."""
    from train import cli_main

    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", "configs/demo.yaml", f"--trainer.default_root_dir={tmp}", "--trainer.logger=false",
                "--trainer.enable_checkpointing=false", f"--model.export.dir={tmp}/packed",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--trainer.callbacks=[{class_path: callbacks.CandidatePruning}, {class_path: callbacks.CalibrationStop, "
                f"init_args: {{max_steps: {max_steps}}}}}, {{class_path: benchmarks.recipe_cost.PhaseClock}}]",
                *model_args, *REGIME_W2, *ROWS[row]]
        start = time.perf_counter()
        cli = cli_main(args)
        end = time.perf_counter()
    clock, prepared = cli.trainer.phase_clock, dict(cli.model.engine.phase_seconds)
    seconds = {name: prepared.get(name, 0.0) for name in ("statistics", "kmeans", "feedback")}
    seconds["probe"] = prepared.get("probe", 0.0) + prepared.get("check", 0.0)
    seconds["trajectories"] = clock["train_start"] - start - sum(prepared.values())
    seconds["calibration"] = clock["train_end"] - clock["train_start"]
    seconds["export"] = end - clock["train_end"]
    return {"row": row, "seconds": seconds, "total": end - start, "steps": cli.trainer.global_step,
            "student": cli.model.student.eval(), "check": cli.model.engine.allocation_check}


def quality(students: dict[str, torch.nn.Module], samples: int) -> dict[str, dict[str, float]]:
    """FID/FP and accuracy/FP of each student on the reference model's evaluation (same seeds as FP)."""
    from vq4dit.evaluation import build_metrics, evaluation_plan, generate_images, load_real_images
    from vq4dit.reference import load_reference_classifier, load_reference_model
    from vq4dit.sampling import SamplerConfig

    labels, seeds = evaluation_plan(samples, 10, 0)
    sampler = SamplerConfig(sampler="ddpm", num_steps=25, guidance_scale=1.5, clip_denoised=True)
    classifier, real = load_reference_classifier(), load_real_images("digits")

    def score(model):
        metrics = build_metrics("classifier", classifier, real, samples)
        metrics.update(generate_images(model, labels, seeds, sampler, batch_size=250), labels, None)
        return {k: float(v) for k, v in metrics.compute().items()}

    fp = score(load_reference_model())
    return {row: {"fid_fp": s["fid"] / fp["fid"], "acc_fp": s["class_accuracy"] / fp["class_accuracy"]}
            for row, s in ((row, score(student)) for row, student in students.items())}


def _spread(values: list[float], digits: int = 2) -> str:
    """``mean`` or ``mean (min-max)`` of ``values``."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def cost_table(models: list[str], samples: int, max_steps: int, seeds: list[int] = (0,)) -> str:
    """Every row of every model once per calibration seed (``--seed_everything``, ``--data.seed``),
    back to back; each cell the mean over seeds, FID/FP and acc/FP with their range (the noise bar)."""
    lines = ["| model | row | " + " | ".join(PHASES) + " | total s | x paper | steps | FID/FP | acc/FP |",
             "|---|---|" + "---|" * (len(PHASES) + 5)]
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            model_args = ["--model.model=reference"] if model == "reference" else \
                [f"--model.model={wide_model(Path(tmp) / 'wide')}", "--data.num_classes=10"]
            runs: dict[str, list[dict]] = {row: [] for row in ROWS}
            for seed in seeds:
                seeded = [*model_args, f"--seed_everything={seed}", f"--data.seed={seed}"]
                results = [calibrate(seeded, row, max_steps) for row in ROWS]
                scores = quality({r["row"]: r["student"] for r in results}, samples) \
                    if model == "reference" and samples else {}
                for r in results:
                    r.update(scores.get(r["row"], {}), student=None)
                    runs[r["row"]].append(r)
                    if r["check"]:
                        print(f"[recipe_cost] {model} {r['row']} seed {seed} allocation check: {r['check']}",
                              file=sys.stderr, flush=True)
            paper = sum(r["total"] for r in runs["paper"]) / len(seeds)
            for row, done in runs.items():
                mean = lambda key: sum(r[key] for r in done) / len(done)  # noqa: E731
                quality_cells = [_spread([r[key] for r in done], digits) if key in done[0] else "-"
                                 for key, digits in (("fid_fp", 2), ("acc_fp", 3))]
                lines.append(f"| {model} | {row} | " + " | ".join(
                    f"{sum(r['seconds'][p] for r in done) / len(done):.1f}" for p in PHASES)
                    + f" | {mean('total'):.1f} | {mean('total') / paper:.2f} | {mean('steps'):.0f} | "
                    + " | ".join(quality_cells) + " |")
            print("\n".join(lines), file=sys.stderr, flush=True)
    return "\n".join(lines)


def preparation_table(models: list[str], trajectories: int) -> str:
    """Only ``Calibrator.build`` (statistics, probe, k-means, feedback) per row, on the same teacher
    trajectories: the pre-calibration cost each recipe adds (the rest of a fit is alike in both)."""
    from vq4dit.engine import Calibrator
    from vq4dit.models import load_dit
    from vq4dit.recipes import apply_recipe
    from vq4dit.typed_settings import unset
    from vq4dit.engine.config import BitAllocation, CalibrationConfig
    from vq4dit.sampling import SamplerConfig
    from vq4dit.trajectories import TrajectoryPlan, generate_items

    lines = ["| model | row | statistics | probe | kmeans | feedback | build total s | allocation check |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            teacher = load_dit("reference" if model == "reference" else wide_model(Path(tmp) / "wide")).eval()
            plan = TrajectoryPlan(0, 4, 10, SamplerConfig(sampler="ddpm", num_steps=25, guidance_scale=4.0))
            items = generate_items(teacher, list(range(trajectories)), plan, progress=False)
            for row in ROWS:
                asked = VQConfig(**{**vars(unset(VQConfig)), "codebook_size": 16, "subvector_dim": 2})
                config = apply_recipe("paper" if row == "paper" else "quality", vq=asked,
                                      calibration=unset(CalibrationConfig), allocation=unset(BitAllocation))[0]
                start = time.perf_counter()
                engine = Calibrator.build(teacher, config, items=items, guidance_scale=4.0, progress=False,
                                          bit_allocation=row == "default+alloc")
                total, seconds = time.perf_counter() - start, engine.phase_seconds
                check = engine.allocation_check or {}
                verdict = "" if not check else (f"{check['allocated_mse']:.2e} vs uniform {check['uniform_mse']:.2e}: "
                                                + ("kept" if check["kept"] else "fell back"))
                lines.append(f"| {model} | {row} | " + " | ".join(
                    f"{seconds.get(p, 0.0) + (seconds.get('check', 0.0) if p == 'probe' else 0.0):.1f}"
                    for p in ("statistics", "probe", "kmeans", "feedback")) + f" | {total:.1f} | {verdict} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (no ties expected)."""
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def ranking(num_trajectories: int, measured_items: int) -> str:
    """Predicted against measured sensitivities on the reference model (regime-matched w2, default levers)."""
    from vq4dit.engine.allocation import AllocationConfig, AllocationResult, measure_sensitivity, solve_allocation
    from vq4dit.engine.probe import Phases, check_allocation, gather_statistics, probe_allocation
    from vq4dit.engine.statistics import statistics_batches
    from vq4dit.quantize import select_layers
    from vq4dit.reference import load_reference_model
    from vq4dit.sampling import SamplerConfig
    from vq4dit.trajectories import TrajectoryPlan, generate_items

    teacher = load_reference_model().eval().requires_grad_(False)
    plan = TrajectoryPlan(0, 4, 10, SamplerConfig(sampler="ddpm", num_steps=25, guidance_scale=4.0))
    items = generate_items(teacher, list(range(num_trajectories)), plan, progress=False)
    config = VQConfig(codebook_size=16, subvector_dim=2, num_candidates=2, row_scale=True, kmeans_metric="activation",
                      error_feedback=True, ratio_init="confident")
    selected = select_layers(teacher, config)
    phases = Phases(0, progress=False)
    hessians = gather_statistics(teacher, selected, items, 4.0, True, phases)
    start = time.perf_counter()
    predicted, built = probe_allocation(teacher, selected, hessians, items, 4.0, None, AllocationConfig(), phases)
    predicted_s = time.perf_counter() - start
    batches = statistics_batches(items, 4.0, batch_size=32, max_items=measured_items)
    start = time.perf_counter()
    measured = measure_sensitivity(teacher, selected, batches, hessians, span=1, progress=False)
    measured_s = time.perf_counter() - start
    all_p = [s for layer in predicted.layers for s in layer.scores]
    all_m = [s for layer in measured for s in layer.scores]
    base_p = [layer.scores[layer.base] for layer in predicted.layers]
    base_m = [m.scores[p.base] for p, m in zip(predicted.layers, measured)]
    other = AllocationResult(predicted.budget, measured)
    other.choice = solve_allocation(measured, predicted.budget)
    chosen_p = {layer.name: layer.configs[i].codebook_size for layer in predicted.layers
                for i in [predicted.choice[layer.name]]}
    chosen_m = {layer.name: layer.configs[i].codebook_size for layer in measured for i in [other.choice[layer.name]]}
    for layer, p in zip(measured, predicted.layers):
        layer.base = p.base
    # the measured allocation's start, with the run's levers (the probe's layers), on the check's items
    held_out = statistics_batches({k: v[1::2] for k, v in items.items()}, 4.0, batch_size=32, max_items=64)
    check_allocation(teacher, other, built, held_out)
    lines = [
        f"ranking on the reference DiT, regime-w2 default levers, {len(selected)} layers x 3 options "
        f"(k 8/16/32), {items['t'].numel()} calibration items; measured on {measured_items} items",
        f"- Spearman over all (layer, option) scores: {spearman(all_p, all_m):.3f}",
        f"- Spearman over layers at base k: {spearman(base_p, base_m):.3f}",
        f"- allocations agree on {sum(chosen_p[n] == chosen_m[n] for n in chosen_p)} of {len(chosen_p)} layers",
        f"- predicted: {predicted.notes[-1]}",
        f"- measured: {other.notes[-1]}",
        f"- probe seconds: predicted {predicted_s:.1f} (incl. k-means/feedback of every option), "
        f"measured forwards {measured_s:.1f} (k-means again inside)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], choices=["reference", "wide"])
    parser.add_argument("--samples", type=int, default=200, help="evaluation images on the reference (0: no quality)")
    parser.add_argument("--max-steps", type=int, default=2000, help="calibration step budget (the demo's 2000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="calibration seeds: every row runs with each; FID/FP and acc/FP show their range")
    parser.add_argument("--ranking", action="store_true")
    parser.add_argument("--prepare", nargs="*", default=[], choices=["reference", "wide"],
                        help="only Calibrator.build per row (the pre-calibration phases), on these models")
    parser.add_argument("--trajectories", type=int, default=4, help="ranking: calibration trajectories (x4 x25 items)")
    parser.add_argument("--measured-items", type=int, default=128, help="ranking: items per measured option")
    args = parser.parse_args(argv)
    print(f"# recipe_cost, {machine_line()}")
    if args.ranking:
        print(ranking(args.trajectories, args.measured_items), flush=True)
    if args.prepare:
        print(preparation_table(args.prepare, args.trajectories))
    if args.models:
        print(cost_table(args.models, args.samples, args.max_steps, args.seeds))


if __name__ == "__main__":
    main()
