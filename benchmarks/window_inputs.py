"""What recorded window inputs save (``--model.calibration.window_inputs``): block-by-block calibration
of a reference model with the teacher recomputed from the model's input every step, against its
window inputs recorded once per batch in host RAM and on disk.

Every run is ``train.py fit`` with the model's config, ``block_inputs: teacher``, windows of ``K``
blocks and exactly ``--steps`` steps per window (``BlockWindows`` with its codebook rule off, so every
mode takes the same steps), no sample grids or checkpoints. Per run: the seconds of the training loop
(from ``on_train_start`` to ``on_train_end``: the steps, validation, and the recording passes where
there are any, also shown apart; the trajectories and the student build are not counted), the teacher's
block forwards in that loop, and whether the packed model equals the memory run's (the recorded modes
use fixed batches; ``recompute`` regroups the items every epoch, so its model differs by the batches).

    python -m benchmarks.window_inputs                                   # digits, windows of 1, 200 steps each
    python -m benchmarks.window_inputs --configs configs/demo.yaml configs/rgb_reference.yaml --window-blocks 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks.common import fit, fit_args, machine_line, markdown_table
from safetensors.torch import load_file

from vq4dit.models import block_modules


class LoopProbe(pl.Callback):
    """Seconds of the training loop, of its recording passes, and the teacher's block forwards in it."""

    def __init__(self) -> None:
        self.seconds, self.recording, self.forwards, self.handles, self.start = 0.0, 0.0, 0, [], 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        def count(*_):
            self.forwards += 1

        self.handles = [b.register_forward_hook(count) for b in block_modules(pl_module.teacher)]  # blocks that ran
        engine, record = pl_module.engine, pl_module.engine.record_window_inputs_

        def timed_record(*args, **kwargs):  # the recording passes, timed apart from the steps
            begin = time.perf_counter()
            try:
                return record(*args, **kwargs)
            finally:
                self.recording += time.perf_counter() - begin

        engine.record_window_inputs_ = timed_record
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start
        for handle in self.handles:
            handle.remove()


def run(config: str, mode: str, window_blocks: int, steps: int, tmp: Path) -> dict:
    """One windowed ``train.py fit``: loop seconds, teacher block forwards, the packed tensors."""
    callbacks = ("--trainer.callbacks=[{class_path: callbacks.CandidatePruning, init_args: {every_n_steps: 1, "
                 "harden_threshold: 0.99, prune_floor: 0.01}}, {class_path: callbacks.CalibrationStop, "
                 "init_args: {max_steps: 1000000, patience: 1000000}}]")
    args = fit_args(tmp, [config], callbacks, "--model.calibration.block_inputs=teacher",
                    f"--model.calibration.window_blocks={window_blocks}", f"--model.calibration.window_inputs={mode}",
                    f"--block_windows.max_steps={steps}", "--block_windows.min_codebook_steps=1000000",
                    "--trainer.max_epochs=1000", "--model.allocation.enabled=false", logger=False)
    cli, _ = fit(args, run=False)
    probe = LoopProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    blocks = len(block_modules(cli.model.teacher))
    return {"seconds": probe.seconds, "recording": probe.recording, "forwards": probe.forwards, "steps": cli.trainer.global_step, "blocks": blocks,
            "packed": load_file(str(tmp / "packed" / "diffusion_pytorch_model.safetensors"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/demo.yaml"])
    parser.add_argument("--window-blocks", nargs="+", type=int, default=[1])
    parser.add_argument("--steps", type=int, default=200, help="steps per window")
    parser.add_argument("--modes", nargs="+", default=["recompute", "memory", "disk"],
                        choices=["recompute", "memory", "disk"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for config in args.configs:
        for size in args.window_blocks:
            results = {}
            for mode in args.modes:
                with tempfile.TemporaryDirectory() as tmp:
                    results[mode] = run(config, mode, size, args.steps, Path(tmp))
            base = results.get("recompute")
            for mode, r in results.items():
                memory = results.get("memory")
                same = "-" if memory is None or mode in ("memory", "recompute") else (
                    "yes" if r["packed"].keys() == memory["packed"].keys()
                    and all(torch.equal(r["packed"][k], memory["packed"][k]) for k in memory["packed"]) else "NO")
                speed = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
                steps_s = r["seconds"] - r["recording"]
                rows.append([config, f"{size} of {r['blocks']}", mode, r["steps"], f"{r['seconds']:.1f}",
                             f"{r['recording']:.1f}", f"{1000 * steps_s / r['steps']:.0f}", speed, r["forwards"], same])
    print(machine_line())
    print(f"`python -m benchmarks.window_inputs --configs {' '.join(args.configs)} --window-blocks "
          f"{' '.join(map(str, args.window_blocks))} --steps {args.steps}`\n")
    print(markdown_table(["config", "window (blocks)", "teacher inputs", "steps", "loop s", "of it recording s",
                          "ms / step (loop less recording)",
                          "speed-up vs recompute", "teacher block forwards", "packed model = memory run's"], rows))


if __name__ == "__main__":
    main()
