"""Calibration benchmark: block and output MSE vs the FP teacher, before and after calibration.

Runs ``train.py fit`` (the demo config unless --config is given) once per bit-width and prints a
markdown table. "k-means only" is the calibration start made hard at once (every sub-vector on
its nearest codeword, n = 1): the "traditional VQ" baseline. All numbers are on the datamodule's
validation trajectories (FP-teacher inputs not used for training).

    python benchmarks/calibration.py                   # reference digits DiT, w2 and w3
    python benchmarks/calibration.py --bits 2 --epochs 4
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import cli_main  # noqa: E402
from vq4dit.engine import Calibrator, build_student  # noqa: E402
from vq4dit.lightning.settings import flatten, is_resumable  # noqa: E402


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
            cli_args = [
                "fit", "--config", args.config, f"--model.vq.bits={bits}",
                f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
                f"--model.export.dir={tmp}/packed", "--trainer.enable_progress_bar=false",
                *(["--trainer.max_epochs", str(args.epochs)] if args.epochs else []), *args.extra,
            ]
            start = time.perf_counter()
            cli = cli_main(cli_args)
            wall = time.perf_counter() - start
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

    print()
    print(f"model: {cli.model.hparams.model}; machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    resolved = {k: v for k, v in flatten(module.hparams).items() if not is_resumable(k) and not k.startswith("_")}
    print("resolved settings (last row): " + ", ".join(f"{k}={v}" for k, v in resolved.items()))
    print()
    print("| bits | k | d | n | block MSE k-means only | block MSE calibrated | output MSE k-means only "
          "| output MSE calibrated | steps to all-hard | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bits, config, before, after, hard_step, steps, wall in rows:
        print(f"| {bits} | {config.codebook_size} | {config.subvector_dim} | {config.num_candidates} "
              f"| {before[0]:.3e} | {after[0]:.3e} | {before[1]:.3e} | {after[1]:.3e} "
              f"| {hard_step if hard_step is not None else 'not reached'} | {steps} | {wall:.0f} |")


if __name__ == "__main__":
    main()
