"""Why 100 calibration steps turn a 1e-6 float difference into a 10 % bias difference (issue 20).

Runs the golden test's calibration (``configs/demo.yaml`` + ``tests/golden/demo_short.yaml``, 100
steps) twice per setting: as is, and with every codebook multiplied by ``1 + 1e-6 * noise`` at the
first step (what another CPU's kernels do to the k-means start). Prints, per setting and step, the
largest bias difference between the two runs relative to the largest bias of the layer, for the
attention key biases (``to_k``, whose gradient is zero in exact arithmetic: softmax ignores a
constant added to every key's score, so what the optimizer sees is rounding noise) and for the
other layers, and the median |gradient| of each group at the first step.

    python -m benchmarks.bias_drift                    # rmsprop, lr_bias 1e-4 (the demo) and 1e-5
    python -m benchmarks.bias_drift --settings "--model.calibration.optimizer=adam"
"""

from __future__ import annotations

import argparse
import os
import tempfile

import pytorch_lightning as pl
import torch

from benchmarks.common import machine_line
from train import cli_main
from vq4dit.layers import VQLinear

STEPS = (1, 10, 50, 100)


class BiasRecorder(pl.Callback):
    """Perturbs the codebooks by ``scale`` (relative) at the first step; records biases and grads."""

    def __init__(self, scale: float) -> None:
        self.scale, self.biases, self.grads = scale, {}, {}

    def layers(self, module) -> dict[str, VQLinear]:
        return {n: m for n, m in module.student.named_modules() if isinstance(m, VQLinear) and m.bias is not None}

    def on_train_start(self, trainer, module) -> None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in self.layers(module).values():
                noise = torch.randn(layer.codebook.shape, generator=generator)
                layer.codebook.mul_(1 + self.scale * noise)

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {n: m.bias.grad.detach().abs().median().item() for n, m in self.layers(module).items()
                          if m.bias.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in STEPS:
            self.biases[trainer.global_step] = {n: m.bias.detach().clone() for n, m in self.layers(module).items()}


def run(settings: list[str], scale: float) -> BiasRecorder:
    recorder = BiasRecorder(scale)
    with tempfile.TemporaryDirectory() as folder:
        cli = cli_main(["--config", "configs/demo.yaml", "--config", "tests/golden/demo_short.yaml",
                        f"--model.export.dir={folder}/packed", f"--trainer.default_root_dir={folder}", *settings], run=False)
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, cli.datamodule)
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=["", "--model.calibration.lr_bias=1e-5"],
                        help="extra flags per setting ('' = the golden settings)")
    parser.add_argument("--scale", type=float, default=1e-6)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"# bias drift under a {args.scale:g} relative codebook perturbation; "
          + machine_line(f"CPU capability {torch.backends.cpu.get_cpu_capability()}"))
    print("| setting | step | to_k: max |dB| / max |B| | others: max |dB| / max |B| | others: median | worst layer |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        flags = setting.split() if setting else []
        base, moved = run(flags, 0.0), run(flags, args.scale)
        for step in STEPS:
            if step not in base.biases:
                continue
            rel = {n: ((moved.biases[step][n] - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                   for n, b in base.biases[step].items()}
            keys = [r for n, r in rel.items() if n.endswith("to_k")]
            others = sorted(r for n, r in rel.items() if not n.endswith("to_k"))
            worst = max((n for n in rel if not n.endswith("to_k")), key=rel.get)
            print(f"| {setting or 'golden'} | {step} | {max(keys):.2e} | {others[-1]:.2e} | {others[len(others) // 2]:.2e} "
                  f"| {worst} |")
        grads = base.grads
        key_grad = sorted(g for n, g in grads.items() if n.endswith("to_k"))
        other_grad = sorted(g for n, g in grads.items() if not n.endswith("to_k"))
        print(f"| {setting or 'golden'} | grad@1 | median |g| {key_grad[len(key_grad) // 2]:.1e} | "
              f"median |g| {other_grad[len(other_grad) // 2]:.1e} | | |")


if __name__ == "__main__":
    main()
