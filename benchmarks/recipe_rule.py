"""The recipe rule (issue 17): every reference model x setting x {paper, default, default minus each lever}.

A lever belongs in the default recipe only if, on every suite model and in every setting, the
default is not worse with it than without it beyond the calibration noise (and better on average).
This benchmark prints the one table that decides it: FID/FP, class accuracy/FP, MSE to FP,
FID to the FP samples, all-in bits/weight and calibration time per run, with the FP model's
seed-to-seed noise and the default recipe's calibration-seed noise as rows of their own.

    python -m benchmarks.recipe_rule                                   # the docs/quality.md table (hours)
    python -m benchmarks.recipe_rule --models digits --settings regime-w2 --recipes paper default
    python -m benchmarks.recipe_rule --models rgb --seeds 0 1 2 --json outputs/recipe_rule_rgb.json
    python -m benchmarks.recipe_rule --models rgb --recipes paper default --seeds 0 --grid docs/suite_samples_
    python -m benchmarks.recipe_rule --models pixart --settings regime-w2 w3 --recipes paper default --seeds 0 1 2
    python -m benchmarks.recipe_rule --models mmdit --settings regime-w2 w3 --recipes paper default fp-modulation --seeds 0

Rows (``--recipes``): ``paper`` (``--model.recipe paper``), ``default`` (the default recipe),
``no-rowscale`` / ``no-aware`` / ``no-feedback`` / ``no-confident`` (the default with that one lever off),
``+alloc`` (the default plus bit allocation, opt-in), ``+units`` (the default with the codebook in
the weight's units, opt-in), ``+lr3x`` / ``+lr10x`` (the default with 3x / 10x ``lr_codebook``:
a codebook step between the default's and ``+units``'), ``scales-3e-5`` / ``frozen-scales`` (the
default with ``lr_row_scale`` 3e-5 / 0: the row scales' own step), ``stats-100`` / ``stats-25`` (the default with
the build's statistics from 100 / 25 of the reference's 800 calibration items, where the default
takes all: 12 % / 3 %, against the 29 % the shorter FLUX.1-dev schedule's 128 of 448 items take), ``best-check`` (the default with
a validation check every 25 steps: the best measured state is exported when the end is worse; each
run also scores the default's export of the same calibration as a paired ``default`` row), ``fp-modulation`` (the default with an MMDiT's modulation Linears
``norm1.linear`` / ``norm1_context.linear`` kept FP: the SD3 family's ``quantize_modulation`` option
off; SD3 models only). The default runs with every ``--seeds`` value
(calibration seed: k-means, trajectories); other rows with the first seed. Every run calibrates
through ``train.py fit`` with the model's config, the same stop rule (``--max_steps`` cap) and no
sample grids or checkpoints, then samples the same labels and noise as FP.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import pytorch_lightning as pl
import torch

from benchmarks.common import Timer, bits_per_weight, fit, fit_args, machine_line, markdown_table
from callbacks.calibration_report import judged_metric
from vq4dit.evaluation import build_metrics, evaluation_plan, generate_images
from vq4dit.prompts import load_prompt_embeds, prompt_classes
from vq4dit.sampling import SamplerConfig

SETTINGS = {  # k and d explicitly: the RGB config names its own
    "paper-w2": ["--model.vq.codebook_size=256", "--model.vq.subvector_dim=4"],
    "regime-w2": ["--model.vq.codebook_size=16", "--model.vq.subvector_dim=2"],
    "w3": ["--model.vq.codebook_size=64", "--model.vq.subvector_dim=2"],
}
RECIPES = {
    "paper": ["--model.recipe=paper"],
    "default": [],
    "no-rowscale": ["--model.vq.row_scale=false"],
    "no-aware": ["--model.vq.kmeans_metric=euclidean"],
    "no-feedback": ["--model.vq.error_feedback=false"],
    "no-confident": ["--model.vq.ratio_init=inverse_distance"],
    "+alloc": ["--model.allocation.enabled=true"],
    "+units": ["--model.vq.codebook_units=weight"],
    "+lr3x": ["--model.calibration.lr_codebook=3e-4"],
    "+lr10x": ["--model.calibration.lr_codebook=1e-3"],
    "frozen-scales": ["--model.calibration.lr_row_scale=0"],
    "scales-3e-5": ["--model.calibration.lr_row_scale=3e-5"],
    "stats-100": ["--model.calibration.statistics_items=100"],
    "stats-25": ["--model.calibration.statistics_items=25"],
    "best-check": ["--calibration_report.every_n_steps=25"],
    "fp-modulation": ['--model.layers.options={"quantize_modulation": false}'],
}


@dataclass(frozen=True)
class SuiteModel:
    """One reference model: its calibration config, FP model, classifier, real images and evaluation."""

    config: str
    load_model: Callable[[], torch.nn.Module]
    load_classifier: Callable[[], torch.nn.Module]
    real_images: Callable[[], torch.Tensor]
    num_classes: int
    samples: int
    steps: int
    guidance_scale: float = 1.5
    prompt_file: str | None = None  # a text model: sample i uses prompt i mod N, scored as the class it names
    sampler: str = "DDPM"  # what the summary line says: the family's own sampler samples


def _digits() -> SuiteModel:
    from vq4dit.evaluation import load_real_images
    from vq4dit.reference import load_reference_classifier, load_reference_model

    return SuiteModel("configs/demo.yaml", load_reference_model, load_reference_classifier,
                      lambda: load_real_images("digits"), 10, 500, 25)


def _rgb() -> SuiteModel:
    from vq4dit.evaluation import load_real_images
    from vq4dit.rgb_reference import load_rgb_reference_classifier, load_rgb_reference_model

    return SuiteModel("configs/rgb_reference.yaml", load_rgb_reference_model, load_rgb_reference_classifier,
                      lambda: load_real_images("rgb_patches"), 8, 256, 10)  # the set `train.py test` scores against


def _pixart() -> SuiteModel:
    from vq4dit.evaluation import load_real_images
    from vq4dit.pixart_reference import CALIBRATION_PROMPTS, load_pixart_reference_model
    from vq4dit.reference import load_reference_classifier

    return SuiteModel("configs/pixart_reference.yaml", load_pixart_reference_model, load_reference_classifier,
                      lambda: load_real_images("digits"), 40, 400, 25, 1.5, str(CALIBRATION_PROMPTS))


def _mmdit() -> SuiteModel:
    from vq4dit.evaluation import load_real_images
    from vq4dit.mmdit_reference import MMDIT_CALIBRATION_PROMPTS, load_mmdit_reference_model
    from vq4dit.reference import load_reference_classifier

    return SuiteModel("configs/mmdit_reference.yaml", load_mmdit_reference_model, load_reference_classifier,
                      lambda: load_real_images("digits"), 40, 400, 25, 1.0, str(MMDIT_CALIBRATION_PROMPTS),
                      "Euler flow-matching")


MODELS = {"digits": _digits, "rgb": _rgb, "pixart": _pixart, "mmdit": _mmdit}


class DefaultExport(pl.Callback):
    """The default's export of a ``best-check`` run: its start when its end is worse, else its end.

    The checks change no step, so this is the model the default exports on the same calibration,
    scored as a paired ``default`` row."""

    start: dict | None = None
    end: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.start = pl_module.engine.snapshot()

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.end = pl_module.engine.snapshot()


def calibrate(spec: SuiteModel, setting: str, recipe: str, seed: int, max_steps: int) -> tuple[torch.nn.Module, dict, Callable | None]:
    """One ``train.py fit`` run: (the hard student, {calibration_s, steps, phase seconds}, for
    ``best-check`` a function that turns the student into the default's export, else None)."""
    paired = ", {class_path: benchmarks.recipe_rule.DefaultExport}" if recipe == "best-check" else ""
    callbacks = ("--trainer.callbacks=[{class_path: callbacks.CandidatePruning, init_args: {every_n_steps: 1, "
                 "harden_threshold: 0.99, prune_floor: 0.01}}, {class_path: callbacks.CalibrationStop, "
                 f"init_args: {{max_steps: {max_steps}}}}}{paired}]")
    with tempfile.TemporaryDirectory() as tmp:
        cli, wall = fit(fit_args(tmp, [spec.config], "--trainer.enable_checkpointing=false", callbacks,
                                 *SETTINGS[setting], *RECIPES[recipe], f"--seed_everything={seed}",
                                 f"--data.seed={seed}", logger=False))
    engine = cli.model.engine
    info = {"calibration_s": wall, "steps": cli.trainer.global_step,
            "prepare_s": sum(getattr(engine, "phase_seconds", {}).values())}
    report = next((c for c in cli.trainer.callbacks if type(c).__name__ == "CalibrationReport"), None)
    if report is not None and report.kept_step is not None:  # the start (0) or a check's step was exported
        info["kept_step"] = report.kept_step
    check = getattr(engine, "allocation_check", None)
    if check:
        info["allocation_check"] = str(check)
    to_default = None
    # by name: run as ``python -m benchmarks.recipe_rule`` this module is __main__, the callback's class benchmarks.recipe_rule's
    export = next((c for c in cli.trainer.callbacks if type(c).__name__ == DefaultExport.__name__), None)
    if export is not None and report is not None and report.end is not None:
        judged = judged_metric(report.start)
        state = export.start if report.end[judged] >= report.start[judged] else export.end
        to_default = lambda: engine.restore_(state)  # noqa: E731
    return cli.model.student.eval(), info, to_default


def run(models: list[str], settings: list[str], recipes: list[str], seeds: list[int], max_steps: int,
        on_result: Callable[[list[dict]], None] | None = None, every_seed: bool = False,
        grids: dict[str, list[tuple[str, torch.Tensor]]] | None = None) -> list[dict]:
    """Every (model, setting, recipe, seed) run scored against its model's FP samples; FP rows first.
    The default recipe runs with every seed, the others with the first (``every_seed``: all).
    ``grids``: filled with model -> [(row label, its first 16 images [16, 3, H, W])] (FP first; the
    first seed of each run), all from the same labels and noise."""
    results: list[dict] = []
    for name in models:
        spec = MODELS[name]()
        labels, noise = evaluation_plan(spec.samples, spec.num_classes, 0)
        sampler = SamplerConfig(sampler="ddpm", num_steps=spec.steps, guidance_scale=spec.guidance_scale,
                                clip_denoised=True)
        classifier, real = spec.load_classifier(), spec.real_images()
        prompts = load_prompt_embeds(spec.prompt_file) if spec.prompt_file else None
        classes = prompt_classes(spec.prompt_file) if spec.prompt_file else None

        def score(images: torch.Tensor, fp: torch.Tensor | None, plan: torch.Tensor = labels) -> dict[str, float]:
            metrics = build_metrics("classifier", classifier, real, spec.samples)
            truth = plan if classes is None else classes[plan]
            for start in range(0, spec.samples, 250):
                metrics.update(images[start:start + 250], truth[start:start + 250],
                               None if fp is None else fp[start:start + 250])
            return {k: float(v) for k, v in metrics.compute().items()}

        def images_of(model: torch.nn.Module, plan: torch.Tensor, seeds: list[int]) -> torch.Tensor:
            return generate_images(model, plan, seeds, sampler, batch_size=250, prompts=prompts)

        fp_images = images_of(spec.load_model(), labels, noise)
        if grids is not None:
            grids[name] = [("fp", fp_images[:16])]
        results.append({"model": name, "setting": "fp", "recipe": "fp", "seed": 0, "bits_per_weight": 32.0,
                        **score(fp_images, None)})
        for other in seeds[1:] or [1]:  # the FP noise bar: another evaluation seed, scored like a run
            other_labels, other_noise = evaluation_plan(spec.samples, spec.num_classes, other)
            images = images_of(spec.load_model(), other_labels, other_noise)
            results.append({"model": name, "setting": "fp", "recipe": f"fp@{other}", "seed": other,
                            "bits_per_weight": 32.0, **score(images, fp_images, other_labels)})
        for setting in settings:
            for recipe in recipes:
                for seed in (seeds if recipe == "default" or every_seed else seeds[:1]):
                    print(f"[recipe_rule] {name} {setting} {recipe} seed {seed}", file=sys.stderr, flush=True)
                    student, info, to_default = calibrate(spec, setting, recipe, seed, max_steps)
                    images = images_of(student, labels, noise)
                    if grids is not None and seed == seeds[0]:
                        grids[name].append((f"{setting} {recipe}", images[:16]))
                    results.append({"model": name, "setting": setting, "recipe": recipe, "seed": seed,
                                    "bits_per_weight": bits_per_weight(student), **info,
                                    **score(images, fp_images)})
                    if to_default is not None:  # the default's export of the same calibration
                        to_default()
                        images = images_of(student, labels, noise)
                        if grids is not None and seed == seeds[0]:
                            grids[name].append((f"{setting} default", images[:16]))
                        results.append({**results[-1], "recipe": "default", "paired_with": recipe,
                                        **score(images, fp_images)})
                        results[-1].pop("kept_step", None)
                    if on_result is not None:
                        on_result(results)
    return results


def _fp(results: list[dict], model: str) -> dict:
    return next(r for r in results if r["model"] == model and r["recipe"] == "fp")


def format_table(results: list[dict]) -> str:
    """One row per run: ratios to the model's FP row."""
    rows = []
    for r in results:
        fp = _fp(results, r["model"])
        rows.append([r["model"], r["setting"], r["recipe"], r["seed"], f"{r['bits_per_weight']:.3f}",
                     f"{r['fid'] / fp['fid']:.3f}", f"{r['class_accuracy'] / fp['class_accuracy']:.3f}",
                     f"{r['mse_to_fp']:.4f}" if "mse_to_fp" in r else "-",
                     f"{r['fid_to_fp']:.2f}" if "fid_to_fp" in r else "-",
                     r.get("steps", "-"), f"{r['calibration_s']:.0f}" if "calibration_s" in r else "-"])
    return markdown_table(["model", "setting", "recipe", "seed", "bits/weight all-in", "FID/FP", "acc/FP",
                           "MSE to FP", "FID to FP samples", "steps", "calib. s"], rows)


def summary_table(results: list[dict]) -> str:
    """One row per model x setting x recipe: means over calibration seeds (range where several)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["setting"], r["recipe"] if r["setting"] != "fp" else "fp vs fp"), []).append(r)
    rows = []
    for (model, setting, recipe), runs in groups.items():
        fp = _fp(results, model)
        runs = [r for r in runs if not (setting == "fp" and r["recipe"] == "fp")]
        if not runs:
            continue

        def cell(values: list[float], fmt: str) -> str:
            mean = format(sum(values) / len(values), fmt)
            return mean if len(values) == 1 else f"{mean} ({format(min(values), fmt)}-{format(max(values), fmt)})"

        rows.append([model, setting, recipe, len(runs), f"{runs[0]['bits_per_weight']:.2f}" if setting != "fp" else "32",
                     cell([r["fid"] / fp["fid"] for r in runs], ".2f"),
                     cell([r["class_accuracy"] / fp["class_accuracy"] for r in runs], ".2f"),
                     cell([r["mse_to_fp"] for r in runs], ".4f"),
                     cell([r["steps"] for r in runs], ".0f") if "steps" in runs[0] else "-",
                     cell([r["calibration_s"] for r in runs], ".0f") if "calibration_s" in runs[0] else "-"])
    return markdown_table(["model", "setting", "recipe", "seeds", "bits/weight all-in", "FID/FP", "acc/FP", "MSE to FP",
                           "steps", "calib. s"], rows)


METRICS = {"fid": ("FID/FP", ".3f"), "mse_to_fp": ("MSE to FP", ".4f")}


def verdict(results: list[dict], metric: str = "fid", floor: float = 0.02) -> str:
    """Per model and setting: each recipe's ``metric`` (``fid``: FID/FP; ``mse_to_fp``) against the
    default's mean over calibration seeds. The noise bar is the default's seed spread (max - min, at
    least ``floor`` x the mean): "worse" / "better" when a recipe lies further than that above /
    below the default's mean, else "within noise"."""
    name, fmt = METRICS[metric]
    lines = []
    for (model, setting) in dict.fromkeys((r["model"], r["setting"]) for r in results if r["setting"] != "fp"):
        fp = _fp(results, model)
        value = (lambda r: r["fid"] / fp["fid"]) if metric == "fid" else (lambda r: r[metric])  # noqa: E731
        group = [r for r in results if (r["model"], r["setting"]) == (model, setting)]
        default = [value(r) for r in group if r["recipe"] == "default"]
        if not default:
            continue
        mean = sum(default) / len(default)
        bar = max(max(default) - min(default), floor * mean)
        cells = [f"default {mean:{fmt}} (noise bar +-{bar:{fmt}}, {len(default)} seeds)"]
        for recipe in dict.fromkeys(r["recipe"] for r in group if r["recipe"] != "default"):
            values = [value(r) for r in group if r["recipe"] == recipe]
            other = sum(values) / len(values)  # the mean over its seeds
            word = "worse" if other > mean + bar else ("better" if other < mean - bar else "within noise")
            cells.append(f"{recipe} {other:{fmt}} ({word}{f', {len(values)} seeds' if len(values) > 1 else ''})")
        lines.append(f"- {model} {setting}, {name}: " + "; ".join(cells))
    return "\n".join(lines)


def verdicts(results: list[dict]) -> str:
    """:func:`verdict` on FID/FP, then on MSE to FP."""
    return verdict(results, "fid") + "\n" + verdict(results, "mse_to_fp")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits", "rgb"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES),
                        default=["paper", "default", "no-rowscale", "no-aware", "no-feedback", "no-confident"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration seeds of the default")
    parser.add_argument("--every-seed", action="store_true", help="every recipe with every --seeds value")
    parser.add_argument("--max_steps", type=int, default=600, help="the stop rule's step cap, every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results as JSON (after every run)")
    parser.add_argument("--grid", default=None, metavar="PREFIX",
                        help="also write PREFIX<model>.png per model: 16 samples per row (FP, then each run; same noise)")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                        help="print the tables of earlier --json results (merged) instead of running")
    args = parser.parse_args(argv)
    if args.from_json:
        merged = {}  # the first run of each (model, setting, recipe, seed): several files repeat the FP rows
        for path in args.from_json:
            for r in json.loads(open(path).read()):
                r["recipe"] = "no-" + r["recipe"][1:] if r["recipe"].startswith("-") else r["recipe"]  # older label
                merged.setdefault((r["model"], r["setting"], r["recipe"], r["seed"]), r)
        results = list(merged.values())
        print(summary_table(results) + "\n\n" + verdicts(results))
        return results
    torch.set_num_threads(args.threads)
    total = Timer()

    def partial(results: list[dict]) -> None:
        print(format_table(results).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:
            from vq4dit.atomic import atomic_write_text

            atomic_write_text(args.json, json.dumps(results, indent=2))

    grids: dict[str, list[tuple[str, torch.Tensor]]] | None = {} if args.grid else None
    results = run(args.models, args.settings, args.recipes, args.seeds, args.max_steps, partial, args.every_seed, grids)
    for model, rows in (grids or {}).items():
        from vq4dit.images import make_grid, save_png

        path = save_png(make_grid([images for _, images in rows], scale=2), f"{args.grid}{model}.png")
        print(f"grid {path}: rows top to bottom: {', '.join(label for label, _ in rows)}", file=sys.stderr)
    plans = "; ".join(f"{name} {spec.samples} samples {spec.sampler} {spec.steps} steps cfg {spec.guidance_scale:g}"
                      + (f" (sample i: prompt i mod {spec.num_classes}, scored as the digit it names)" if spec.prompt_file else "")
                      for name, spec in ((name, MODELS[name]()) for name in args.models))
    print(f"\nrecipe rule: {', '.join(args.models)}; stop rule: CalibrationStop max_steps {args.max_steps}; "
          f"evaluation: {plans}; the model's own classifier as FID features; fp@N: FP sampled with evaluation "
          "seed N (the FP noise bar)")
    print(machine_line(f"total {total.elapsed:.0f} s") + "\n")
    print(format_table(results) + "\n\n" + summary_table(results) + "\n\n" + verdicts(results))
    return results


if __name__ == "__main__":
    main()
