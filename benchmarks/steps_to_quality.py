"""Quality against calibration steps on the reference model, and where the default stop rule stops.

One long calibration per bit-width (the demo config with a larger step budget and the stop rule
switched off) is probed every ``--every`` steps: a copy of the student is made hard (argmax, as
the final export) and scored on the held-out teacher trajectories (block and output MSE) and on
generated images (pixel MSE to the FP samples under identical noise, class accuracy). A second,
default run (the demo config as shipped, ``CalibrationStop`` on) gives the default's step count,
wall time and final quality.

    python -m benchmarks.steps_to_quality                    # w2 and w3 (~40 min on 2 busy cores)
    python -m benchmarks.steps_to_quality --bits 2 --max-steps 400 --every 100 --samples 50
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from benchmarks.common import Timer, fit, fit_args, machine_line, markdown_table
from vq4dit.engine import block_losses
from vq4dit.evaluation import evaluation_plan, generate_images
from vq4dit.quantize import finalize_model_
from vq4dit.reference import classifier_accuracy, load_reference_classifier
from vq4dit.sampling import SamplerConfig


class ImageProbe:
    """Pixel MSE to FP and class accuracy of a model's samples (fixed labels, seeds, sampler)."""

    def __init__(self, teacher: torch.nn.Module, samples: int, steps: int) -> None:
        self.labels, self.seeds = evaluation_plan(samples, 10, seed=1)
        self.sampler = SamplerConfig(sampler="ddpm", num_steps=steps, guidance_scale=1.5, clip_denoised=True)
        self.classifier = load_reference_classifier()
        self.fp = generate_images(teacher, self.labels, self.seeds, self.sampler, batch_size=250)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[float, float]:
        images = generate_images(model, self.labels, self.seeds, self.sampler, batch_size=250)
        mse = ((images - self.fp) * 2).pow(2).mean().item()
        accuracy = classifier_accuracy(self.classifier, images[:, :1] * 2 - 1, self.labels)
        return mse, accuracy


@torch.no_grad()
def hard_scores(engine, batches, probe: ImageProbe | None) -> dict[str, float]:
    """Scores of a hard (argmax) copy of ``engine``'s current student; the run itself is not touched."""
    hard = copy.deepcopy(engine.student)
    finalize_model_(hard)
    inputs = engine.config.block_inputs
    block = [block_losses(engine.teacher, hard, engine.model_batch(b), block_inputs=inputs) for b in batches]
    layers = engine.layers.values()
    scores = {
        "block_mse": sum(float(b.mean()) for b, _ in block) / len(block),
        "output_mse": sum(float(o) for _, o in block) / len(block),
        "hard": sum(l.hard_fraction * l.num_subvectors for l in layers) / sum(l.num_subvectors for l in layers),
    }
    if probe is not None:
        scores["image_mse"], scores["accuracy"] = probe(hard)
    return scores


class Probe(pl.Callback):
    """Score the hard student at step 0 and every ``every`` steps (time spent here is excluded)."""

    def __init__(self, every: int, samples: int, steps: int) -> None:
        self.every, self.samples, self.steps = every, samples, steps
        self.rows: list[tuple[int, float, dict]] = []
        self.probe_time = 0.0
        self.clock = Timer()

    def _score(self, trainer, module) -> None:
        with Timer() as probing:
            if not hasattr(self, "images"):
                self.images = ImageProbe(module.teacher, self.samples, self.steps) if self.samples else None
                self.batches = list(trainer.datamodule.val_dataloader())
            scores = hard_scores(module.engine, self.batches, self.images)
        self.probe_time += probing.seconds
        self.rows.append((trainer.global_step, self.clock.elapsed - self.probe_time, scores))

    def on_train_start(self, trainer, module) -> None:
        self.clock = Timer()
        self._score(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._score(trainer, module)


def calibrate(bits: int, config: str, override: dict | None, extra: list[str], tmp: str, probe: Probe | None):
    """One ``fit`` of the reference model; returns (cli, wall seconds without probing)."""
    configs = [config]
    if override is not None:
        path = Path(tmp) / "override.yaml"
        path.write_text(yaml.safe_dump(override))
        configs.append(str(path))
    cli, _ = fit(fit_args(tmp, configs, f"--model.vq.bits={bits}", *extra), run=False)
    if probe is not None:
        cli.trainer.callbacks.append(probe)
    with Timer() as t:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, t.seconds - (probe.probe_time if probe else 0.0)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--max-steps", type=int, default=2000, help="budget of the long run")
    parser.add_argument("--every", type=int, default=250, help="probe interval (steps)")
    parser.add_argument("--samples", type=int, default=200, help="images per probe (0: no image metrics)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)

    print(f"reference digits DiT, {args.config} {' '.join(extra)}; probes: hard (argmax) copy of the student, "
          f"{args.samples} images DDPM {args.sample_steps} steps cfg 1.5; {machine_line()}")
    for bits in args.bits:
        long_run = {
            "trainer": {"max_epochs": 1000, "callbacks": [
                {"class_path": "callbacks.CandidatePruning"},
                {"class_path": "callbacks.CalibrationStop", "init_args": {"max_steps": args.max_steps, "patience": 10**9}},
            ]},
        }
        with tempfile.TemporaryDirectory() as tmp:
            probe = Probe(args.every, args.samples, args.sample_steps)
            calibrate(bits, args.config, long_run, extra, tmp, probe)
        with tempfile.TemporaryDirectory() as tmp:
            default_probe = Probe(10**9, args.samples, args.sample_steps)  # scores step 0 only ...
            cli, wall = calibrate(bits, args.config, None, extra, tmp, default_probe)
            default_probe._score(cli.trainer, cli.model)  # ... and the final model
            stop = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "CalibrationStop")
        final = default_probe.rows[-1]
        print()
        print(f"w{bits}: default stop rule stopped at step {final[0]} (all layers hard at step {stop.hard_since}), "
              f"{wall:.0f} s for the whole fit (teacher trajectories and k-means included; 'calib. s' counts from the first step)")
        print()
        rows = [("long", *row) for row in probe.rows] + [("**default**", *final)]
        print(markdown_table(
            ["run", "step", "calib. s", "hard %", "block MSE", "output MSE", "image MSE to FP", "class acc %"],
            [[name, step, f"{seconds:.0f}", f"{100 * s['hard']:.1f}", f"{s['block_mse']:.3e}", f"{s['output_mse']:.3e}",
              fmt(s.get('image_mse'), '.4f'), fmt(100 * s['accuracy'] if 'accuracy' in s else None, '.1f')]
             for name, step, seconds, s in rows]))

if __name__ == "__main__":
    main()
