"""Quality levers on the reference DiT, one table: noise, sensitivity, each lever alone, combinations.

Every row calibrates with ``train.py fit --config configs/demo.yaml`` plus the row's overrides (in
this process), then samples the same labels and seeds as FP (identical noise) and scores the images
with the shipped digits classifier (``vq4dit.metrics``). Rows are ``SETTING:LEVERS``:

- every row starts from the paper's method (``--model.recipe paper``) and adds only its levers;
- settings: ``paper-w2`` (k=256, d=4, the paper preset), ``regime-w2`` (k=16, d=2: 2 bits nominal,
  512-3,072 sub-vectors per codeword, DiT-XL/2's regime on 128-wide layers), ``w3`` (k=64, d=2);
- levers, joined by ``+``: ``n1`` / ``n2`` / ``n3`` candidates; ``rowscale`` (FP16 per-row scales);
  ``aware`` (activation-aware k-means and candidates); ``output`` (output-level loss term, weight 1); ``lr`` (codebook learning rate 1e-3 instead of
  1e-4); ``teacher`` (every block calibrated on its FP input); ``adaln3`` (adaLN layers at k=64: 3 bits at d=2); ``long`` (a longer codebook phase: stop rule
  min 300 codebook steps, patience 200); ``fp-adaln`` (adaLN modulation kept FP); sensitivity
  ``only-adaln|only-qkv|only-out|only-mlp1|only-mlp2|only-block<i>`` (everything else FP);
  ``feedback`` (error feedback: candidates assigned column group by group in decreasing E[x^2]
  order, each group's output error compensated on the later groups: GPTQ / GPTVQ with act-order);
  ``alloc`` (bit allocation: per-layer k in k/4..4k from measured sensitivity, the same all-in bits);
  ``budget<B>`` (bit allocation under B bits/weight all-in);
  ``confident`` (initial ratios 0.9 on the nearest candidate, 0.1 shared by the others);
  ``lrlog<X>`` (ratio-logit learning rate X instead of 5e-2);
  ``cfg<G>`` (calibration trajectories sampled at guidance G instead of the demo's 4);
  ``data<N>`` (N calibration trajectories instead of the demo's 8);
  ``seed<N>`` (calibration seed N: k-means and trajectories; the noise bar of a calibration);
- ``fp@<seed>``: the FP model sampled with another evaluation seed (the noise bar: FP vs FP).

    python -m benchmarks.ablation --rows fp@1 fp@2 regime-w2:n2 regime-w2:n2+rowscale --samples 500
    python -m benchmarks.ablation --preset readme --samples 500 --json outputs/ablation.json   # the README table
    python -m benchmarks.ablation --preset pictures --grid docs/levers_samples.png           # the README picture

FID numbers are digits-FID against the 1797 real digits; "FID/FP" divides by the FP row's FID.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.common import Timer, bits_per_weight, fit, fit_args, machine_line
from vq4dit.evaluation import build_metrics, evaluation_plan, generate_images, load_real_images
from vq4dit.reference import load_reference_classifier, load_reference_model
from vq4dit.sampling import SamplerConfig

SETTINGS = {
    "paper-w2": ["--model.vq.bits=2"],
    "regime-w2": ["--model.vq.bits=2", "--model.vq.codebook_size=16", "--model.vq.subvector_dim=2"],
    "w3": ["--model.vq.bits=3"],
}
CORE = {"adaln": ["norm1.linear"], "qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "out": ["attn1.to_out.0"],
        "mlp1": ["ff.net.0.proj"], "mlp2": ["ff.net.2"]}
ALL_CORE = [suffix for group in CORE.values() for suffix in group]
LONG_STOP = {"min_codebook_steps": 300, "patience": 200, "max_steps": 4000}

PRESETS = {
    "noise": ["fp@1", "fp@2"],
    "sensitivity": [f"regime-w2:n2+only-{g}" for g in CORE] + [f"regime-w2:n2+only-block{b}" for b in range(4)],
    "levers": ["regime-w2:n1", "regime-w2:n2", "regime-w2:n2+rowscale", "regime-w2:n2+output", "regime-w2:n2+long",
               "regime-w2:n2+fp-adaln", "regime-w2:n2+aware"],
}
PRESETS["combinations"] = [
    "regime-w2:n2+rowscale+aware", "regime-w2:n2+rowscale+lr", "regime-w2:n2+rowscale+aware+lr+long",
    "regime-w2:n1+rowscale+aware", "paper-w2:n1", "paper-w2:n2", "paper-w2:n1+rowscale+aware",
    "paper-w2:n2+rowscale+aware", "w3:n1", "w3:n2", "w3:n1+rowscale+aware", "w3:n2+rowscale+aware",
]
PRESETS["all"] = PRESETS["noise"] + PRESETS["levers"] + PRESETS["combinations"] + PRESETS["sensitivity"]
QUALITY = "rowscale+aware+feedback+confident+alloc"  # the quality recipe's levers (vq4dit.recipes), spelled as levers
FEEDBACK = "rowscale+aware+feedback+confident"  # the quality recipe without bit allocation
SEEDS = lambda row: [row, f"{row}+seed1", f"{row}+seed2"]  # noqa: E731  (a calibration noise bar)
PRESETS["feedback"] = [
    *SEEDS("regime-w2:n1+rowscale+aware+feedback"), "regime-w2:n2+rowscale+aware+feedback",
    *SEEDS(f"regime-w2:n2+{FEEDBACK}"), *SEEDS("regime-w2:n2+rowscale+aware+feedback+lrlog0.01"),
    *SEEDS(f"regime-w2:n2+{FEEDBACK}+lrlog0.01"), f"regime-w2:n2+{FEEDBACK}+cfg1.5", *SEEDS(f"regime-w2:n2+{QUALITY}"),
    "paper-w2:n1+rowscale+aware+feedback", "paper-w2:n2+rowscale+aware+feedback", *SEEDS(f"paper-w2:n2+{FEEDBACK}"),
    f"paper-w2:n2+{QUALITY}", f"paper-w2:n2+{QUALITY}+seed1", "w3:n1+rowscale+aware+feedback", *SEEDS(f"w3:n2+{FEEDBACK}"), f"w3:n2+{QUALITY}",
]
PRESETS["pictures"] = ["regime-w2:n2", "regime-w2:n2+rowscale+aware", f"regime-w2:n2+{FEEDBACK}", "paper-w2:n2",
                       f"paper-w2:n2+{FEEDBACK}", "w3:n2", f"w3:n2+{FEEDBACK}"]
# The README table, row for row (python -m benchmarks.ablation --preset readme --samples 500)
PRESETS["readme"] = PRESETS["noise"] + [
    "regime-w2:n1", "regime-w2:n2", "regime-w2:n2+rowscale", "regime-w2:n2+aware", "regime-w2:n2+output",
    "regime-w2:n2+long", "regime-w2:n2+rowscale+lr", "regime-w2:n2+rowscale+aware+lr+long", "regime-w2:n2+fp-adaln",
    "regime-w2:n1+rowscale+aware", *SEEDS("regime-w2:n2+rowscale+aware"), "regime-w2:n2+rowscale+aware+adaln3",
    "regime-w2:n2+rowscale+aware+alloc", "regime-w2:n2+rowscale+aware+data32", "regime-w2:n2+rowscale+aware+data32+lr",
    "paper-w2:n1", "paper-w2:n2", "paper-w2:n1+rowscale+aware", "paper-w2:n2+rowscale+aware",
    "w3:n1", "w3:n2", "w3:n1+rowscale+aware", "w3:n2+rowscale+aware",
] + PRESETS["feedback"] + PRESETS["sensitivity"]


def row_overrides(row: str, tmp: str, num_blocks: int = 4) -> tuple[list[str], dict | None]:
    """CLI overrides of a ``SETTING:LEVERS`` row, and the CalibrationStop settings it needs (or None)."""
    setting, _, levers = row.partition(":")
    if setting not in SETTINGS:
        raise SystemExit(f"error: unknown setting {setting!r} in {row!r}; known: {', '.join(SETTINGS)}")
    args, stop = ["--model.recipe=paper", *SETTINGS[setting]], None  # levers only where the row names them
    for lever in filter(None, levers.split("+")):
        if lever in ("n1", "n2", "n3"):
            args.append(f"--model.vq.num_candidates={lever[1]}")
        elif lever == "rowscale":
            args.append("--model.vq.row_scale=true")
        elif lever == "aware":
            args.append("--model.vq.kmeans_metric=activation")
        elif lever == "lr":
            args.append("--model.calibration.lr_codebook=1e-3")
        elif lever == "teacher":
            args.append("--model.calibration.block_inputs=teacher")
        elif lever == "adaln3":  # bit allocation by sensitivity: adaLN at k=64 (3 bits with d=2)
            args.append('--model.layers.overrides={"*.norm1.linear": {"codebook_size": 64}}')
        elif lever == "feedback":  # GPTQ-style error feedback across columns when assigning candidates
            args.append("--model.vq.error_feedback=true")
        elif lever == "alloc":  # per-layer k from measured sensitivity, the uniform setting's bits
            args.append("--model.allocation.enabled=true")
        elif lever.startswith("budget"):  # bit allocation under an explicit all-in budget
            args.append(f"--model.allocation.budget={float(lever[6:])}")
        elif lever == "output":
            args.append("--model.calibration.output_weight=1.0")
        elif lever == "long":
            stop = LONG_STOP
        elif lever == "confident":  # ratios start at 0.9 on the nearest (feedback) candidate
            args.append("--model.vq.ratio_init=confident")
        elif lever.startswith("lrlog"):  # learning rate of the ratio logits (default 5e-2)
            args.append(f"--model.calibration.lr_logits={float(lever[5:])}")
        elif lever.startswith("cfg"):  # guidance of the calibration trajectories (demo: 4; evaluation: 1.5)
            args.append(f"--data.guidance_scale={float(lever[3:])}")
        elif lever.startswith("data") and lever[4:].isdigit():  # calibration trajectories (demo: 8)
            args.append(f"--data.num_trajectories={lever[4:]}")
        elif lever.startswith("seed") and lever[4:].isdigit():  # another calibration seed (k-means, trajectories)
            args += [f"--seed_everything={lever[4:]}", f"--data.seed={lever[4:]}"]
        elif lever == "fp-adaln":
            args.append('--model.layers.exclude=["*.norm1.linear"]')
        elif lever.startswith("only-block") and lever[10:].isdigit():
            names = [f"transformer_blocks.{lever[10:]}.{suffix}" for suffix in ALL_CORE]
            args.append(f"--model.layers.include=[{', '.join(names)}]")
        elif lever.startswith("only-") and lever[5:] in CORE:
            names = [f"transformer_blocks.{b}.{suffix}" for b in range(num_blocks) for suffix in CORE[lever[5:]]]
            args.append(f"--model.layers.include=[{', '.join(names)}]")
        else:
            raise SystemExit(f"error: unknown lever {lever!r} in {row!r}")
    return args, stop


def calibrate(row: str) -> tuple[torch.nn.Module, float, int, dict[str, float]]:
    """Calibrate one row through the CLI: (hard student, wall s, steps, final train/val metrics)."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides, stop = row_overrides(row, tmp)
        configs = ["configs/demo.yaml"]
        if stop is not None:  # a second config file replaces the callbacks list
            demo = yaml.safe_load(Path("configs/demo.yaml").read_text())
            callbacks = [c for c in demo["trainer"]["callbacks"] if not c["class_path"].endswith(("SampleImages", "ModelCheckpoint", "LearningRateMonitor"))]
            for c in callbacks:
                if c["class_path"].endswith("CalibrationStop"):
                    c["init_args"] = dict(stop)
            Path(tmp, "stop.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
            configs.append(str(Path(tmp, "stop.yaml")))
        if stop is None:  # no sample grids, no checkpoints: only the calibration itself
            overrides.append("--trainer.callbacks=[{class_path: callbacks.CandidatePruning}, {class_path: callbacks.CalibrationStop, init_args: {max_steps: 2000}}]")
        cli, wall = fit(fit_args(tmp, configs, "--trainer.enable_checkpointing=false", *overrides, logger=False))
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k in ("val/block_mse", "val/output_mse")}
    return cli.model.student.eval(), wall, cli.trainer.global_step, logged


def evaluate(rows: list[str], samples: int, steps: int, guidance: float, seed: int, on_row=None,
             keep_images: int = 0) -> list[dict]:
    """Score FP and every row on the same labels and seeds; ``on_row(results)`` after each row.
    ``keep_images``: each result also holds its first images under ``"images"`` (for a grid)."""
    labels, seeds = evaluation_plan(samples, 10, seed)
    sampler = SamplerConfig(sampler="ddpm", num_steps=steps, guidance_scale=guidance, clip_denoised=True)
    classifier, real = load_reference_classifier(), load_real_images("digits")
    fp_images = generate_images(load_reference_model(), labels, seeds, sampler, batch_size=250)

    def score(images: torch.Tensor, compare: torch.Tensor | None) -> dict[str, float]:
        metrics = build_metrics("classifier", classifier, real, samples)
        for start in range(0, samples, 500):
            metrics.update(images[start:start + 500], labels[start:start + 500],
                           None if compare is None else compare[start:start + 500])
        return {k: float(v) for k, v in metrics.compute().items()}

    results = [{"row": "fp", "bits_per_weight": 32.0, **score(fp_images, None)}]
    if keep_images:
        results[0]["images"] = fp_images[:keep_images]
    for row in rows:
        if on_row is not None:
            on_row(results)
        print(f"[ablation] {row}", file=sys.stderr, flush=True)
        if row.startswith("fp@"):
            other_labels, other_seeds = evaluation_plan(samples, 10, int(row[3:]))
            images = generate_images(load_reference_model(), other_labels, other_seeds, sampler, batch_size=250)
            results.append({"row": row, "bits_per_weight": 32.0, **score(images, None)})
            if keep_images:
                results[-1]["images"] = images[:keep_images]
            continue
        student, wall, steps_done, logged = calibrate(row)
        images = generate_images(student, labels, seeds, sampler, batch_size=250)
        results.append({"row": row, "bits_per_weight": bits_per_weight(student), "calibration_s": wall,
                        "steps": steps_done, **logged, **score(images, fp_images)})
        if keep_images:
            results[-1]["images"] = images[:keep_images]
    if on_row is not None:
        on_row(results)
    return results


def format_table(results: list[dict]) -> str:
    fp_fid = results[0]["fid"]
    lines = ["| row | bits/weight all-in | class acc % | digits-FID | FID/FP | precision | recall | MSE to FP "
             "| val block MSE | val output MSE | steps | calib. s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        get = lambda key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
        lines.append(f"| {r['row']} | {r['bits_per_weight']:.3f} | {100 * r['class_accuracy']:.1f} | {r['fid']:.2f} "
                     f"| {r['fid'] / fp_fid:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {get('mse_to_fp', '.4f')} "
                     f"| {get('val/block_mse', '.2e')} | {get('val/output_mse', '.2e')} | {get('steps', 'd')} "
                     f"| {get('calibration_s', '.0f')} |")
    return "\n".join(lines)


def seed_summary(results: list[dict]) -> str:
    """Rows calibrated with several seeds (``ROW``, ``ROW+seed1``, ...): mean and range over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in results[1:]:
        base, _, last = r["row"].rpartition("+")
        key = base if last.startswith("seed") and last[4:].isdigit() else r["row"]
        groups.setdefault(key, []).append(r)
    fp_fid = results[0]["fid"]
    lines = ["| row (calibration seeds) | seeds | FID/FP mean | FID/FP range | class acc % mean | class acc % range "
             "| MSE to FP mean |", "|---|---|---|---|---|---|---|"]
    for key, rows in groups.items():
        if len(rows) < 2:
            continue
        ratios = [r["fid"] / fp_fid for r in rows]
        accs = [100 * r["class_accuracy"] for r in rows]
        mse = sum(r["mse_to_fp"] for r in rows) / len(rows)
        lines.append(f"| {key} | {len(rows)} | {sum(ratios) / len(rows):.2f} | {min(ratios):.2f}-{max(ratios):.2f} "
                     f"| {sum(accs) / len(rows):.1f} | {min(accs):.1f}-{max(accs):.1f} | {mse:.4f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[], help="SETTING:LEVERS rows or fp@SEED")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named list of rows (added first)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25, help="DDPM steps of the evaluation")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default=None, help="also write a PNG: one row of 20 samples per table row (same noise)")
    args = parser.parse_args(argv)
    rows = (PRESETS[args.preset] if args.preset else []) + args.rows
    if not rows:
        parser.error("give --rows and/or --preset")
    for row in rows:
        if not row.startswith("fp@"):
            row_overrides(row, "")  # unknown settings or levers fail now, not after an hour
    torch.set_num_threads(args.threads)
    total = Timer()

    def partial(results: list[dict]) -> None:  # progress: the table so far, and the JSON
        print(format_table(results).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:
            from vq4dit.atomic import atomic_write_text

            atomic_write_text(args.json, json.dumps([{k: v for k, v in r.items() if k != "images"} for r in results],
                                                    indent=2))

    results = evaluate(rows, args.samples, args.steps, args.guidance, args.seed, partial, keep_images=20 if args.grid else 0)
    if args.grid:
        from vq4dit.images import make_grid, save_png

        grid = make_grid([r.pop("images") for r in results], scale=2)
        print(f"grid ({', '.join(r['row'] for r in results)} top to bottom): {save_png(grid, args.grid)}", file=sys.stderr)
    print(f"\nreference digits DiT; {args.samples} samples per row, DDPM {args.steps} steps, cfg {args.guidance}, "
          f"seed {args.seed}; calibration: configs/demo.yaml + row overrides")
    print(machine_line(f"total {total.elapsed:.0f} s") + "\n")
    print(format_table(results))
    summary = seed_summary(results)
    if summary:
        print("\n" + summary)
    return results


if __name__ == "__main__":
    main()
