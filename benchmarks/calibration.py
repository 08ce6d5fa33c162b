"""Calibration benchmark: block and output MSE vs the FP teacher, before and after calibration.

Runs ``train.py fit`` (the demo config unless --config is given) once per bit-width and prints a
markdown table. "k-means only" is the calibration start made hard at once (every sub-vector on
its nearest codeword, n = 1): the "traditional VQ" baseline. All numbers are on the datamodule's
validation trajectories (FP-teacher inputs not used for training).

    python -m benchmarks.calibration                   # reference digits DiT, w2 and w3
    python -m benchmarks.calibration --bits 2 --epochs 4
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.common import fit, fit_args, machine_line, markdown_table
from vq4dit.engine import Calibrator, build_student


@torch.no_grad()
def mean_losses(engine: Calibrator, batches) -> tuple[float, float]:
    blocks, outputs = [], []
    for batch in batches:
        block_mse, output_mse = engine.block_losses(batch)
        blocks.append(float(block_mse.mean()))
        outputs.append(float(output_mse))
    return sum(blocks) / len(blocks), sum(outputs) / len(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("extra", nargs="*", help="more LightningCLI overrides, e.g. --model.vq.num_candidates=3")
    args = parser.parse_args()

    rows = []
    for bits in args.bits:
        with tempfile.TemporaryDirectory() as tmp:
            epochs = [f"--trainer.max_epochs={args.epochs}"] if args.epochs else []
            cli, wall = fit(fit_args(tmp, [args.config], f"--model.vq.bits={bits}", *epochs, *args.extra))
        module, data = cli.model, cli.datamodule
        batches = list(data.val_dataloader())
        after = mean_losses(module.engine, batches)
        stop = next((cb for cb in cli.trainer.callbacks if type(cb).__name__ == "CalibrationStop"), None)
        hard_step = stop.hard_since if stop is not None else None
        steps = cli.trainer.global_step
        config = module.vq_config
        start = build_student(module.teacher, config.with_overrides(num_candidates=1, error_feedback=False), progress=False,
                              input_moments=module.engine.input_moments)
        before = mean_losses(Calibrator(module.teacher, start, module.calibration, guidance_scale=module.engine.guidance_scale), batches)
        rows.append((bits, config, before, after, hard_step, steps, wall))

    print(f"\nmodel: {cli.model.hparams.model}; {machine_line()}\n")
    print(markdown_table(
        ["bits", "k", "d", "n", "block MSE k-means only", "block MSE calibrated", "output MSE k-means only",
         "output MSE calibrated", "steps to all-hard", "steps", "wall s"],
        [[bits, config.codebook_size, config.subvector_dim, config.num_candidates, f"{before[0]:.3e}",
          f"{after[0]:.3e}", f"{before[1]:.3e}", f"{after[1]:.3e}", hard_step if hard_step is not None else "not reached",
          steps, f"{wall:.0f}"] for bits, config, before, after, hard_step, steps, wall in rows]))


if __name__ == "__main__":
    main()
