"""Quality of quantized reference DiTs side by side: FP, round-to-nearest, plain VQ, VQ4DiT.

Same layers (the 7 core Linears of every block), same evaluation harness, same labels and seeds
(identical noise for every model). Calibrated methods run ``train.py fit`` with the demo config.

    python -m benchmarks.quality                        # the README table (~30 min on 2 CPU cores)
    python -m benchmarks.quality --methods fp rtn-c2 vq4dit-w2-n2 --samples 100 --steps 10
    python -m benchmarks.quality --grid outputs/quality.png  # also a sample grid, one row per method

Methods: ``fp``; ``rtn-c{b}`` round-to-nearest per output channel and ``rtn-g64-{b}`` per group of
64 inputs at b bits (fp16 scale and zero point per group counted in bits/weight); ``vq-w{b}``
plain VQ (k-means codebook, nearest codeword, no calibration); ``n1-w{b}`` codebook-only
calibration (n = 1, the "traditional VQ" of the paper); ``vq4dit-w{b}-n{n}`` VQ4DiT with n
candidates. Metrics (``vq4dit.metrics``, digits classifier features): class accuracy of the
samples, digits-FID / precision / recall against the 1797 real digits, Inception Score with the
digits classifier (max 10), pixel MSE and FID to the FP samples.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from benchmarks.common import Timer, bits_per_weight, fit, fit_args, machine_line
from vq4dit.baselines import round_to_nearest
from vq4dit.evaluation import build_metrics, evaluation_plan, generate_images, load_real_images
from vq4dit.images import make_grid, save_png
from vq4dit.models import default_linear_filter
from vq4dit.quantize import finalize_model_, quantize_
from vq4dit.reference import load_reference_classifier, load_reference_model
from vq4dit.sampling import SamplerConfig
from vq4dit.vq_config import VQConfig

DEFAULT_METHODS = [
    "fp", "rtn-c4", "rtn-c3", "rtn-c2", "rtn-g64-4", "rtn-g64-3", "rtn-g64-2", "vq-w3", "vq-w2",
    "n1-w3", "n1-w2", "vq4dit-w3-n2", "vq4dit-w2-n2", "vq4dit-w3-n3", "vq4dit-w2-n3",
]
METHOD_PATTERN = re.compile(r"^(fp|rtn-c([2-8])|rtn-g64-([2-8])|vq-w([23])|n1-w([23])|vq4dit-w([23])-n([1-9]))$")


@dataclass
class Result:
    method: str
    bits_per_weight: float
    metrics: dict[str, float]
    calibration_s: float | None = None
    steps: int | None = None
    images: torch.Tensor | None = field(default=None, repr=False)


def quantized_layer_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and default_linear_filter(module, name)]


def rtn_model(bits: int, group_size: int | None) -> tuple[torch.nn.Module, float]:
    """Reference model with round-to-nearest weights in the VQ layers; bits/weight incl. fp16 scale + zero."""
    model = load_reference_model()
    total_bits = total_weights = 0
    for name in quantized_layer_names(model):
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(round_to_nearest(layer.weight, bits, group_size))
        groups = layer.out_features * (1 if group_size is None else layer.in_features // group_size)
        total_bits += layer.weight.numel() * bits + groups * 2 * 16
        total_weights += layer.weight.numel()
    return model, total_bits / total_weights


def plain_vq_model(bits: int) -> tuple[torch.nn.Module, float]:
    model = load_reference_model()
    quantize_(model, VQConfig.from_bits(bits).with_overrides(num_candidates=1), filter_fn=default_linear_filter,
              progress=False)
    finalize_model_(model)
    return model, bits_per_weight(model)


def calibrated_model(bits: int, candidates: int, config: str, extra: list[str]) -> tuple[torch.nn.Module, float, float, int]:
    """``train.py fit`` on the reference model: (hard student, bits/weight, wall s, steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        cli, wall = fit(fit_args(tmp, [config], "--model.model=reference", f"--model.vq.bits={bits}",
                                 f"--model.vq.num_candidates={candidates}", *extra))
    student = cli.model.student.eval()
    return student, bits_per_weight(student), wall, cli.trainer.global_step


def build(method: str, config: str, extra: list[str]) -> tuple[torch.nn.Module, float, float | None, int | None]:
    match = METHOD_PATTERN.match(method)
    if match is None:
        raise SystemExit(f"error: unknown method {method!r}; known: fp, rtn-c<b>, rtn-g64-<b>, vq-w<b>, n1-w<b>, "
                         "vq4dit-w<b>-n<n>")
    if method == "fp":
        return load_reference_model(), 32.0, None, None
    if match.group(2):
        return (*rtn_model(int(match.group(2)), None), None, None)
    if match.group(3):
        return (*rtn_model(int(match.group(3)), 64), None, None)
    if match.group(4):
        return (*plain_vq_model(int(match.group(4))), None, None)
    if match.group(5):
        return calibrated_model(int(match.group(5)), 1, config, extra)
    return calibrated_model(int(match.group(6)), int(match.group(7)), config, extra)


def run(methods: list[str], samples: int, steps: int, guidance: float, seed: int, config: str,
        extra: list[str], batch_size: int = 250, progress: bool = True) -> list[Result]:
    """Evaluate every method on the same labels and seeds; FP samples are generated once."""
    labels, seeds = evaluation_plan(samples, 10, seed)
    sampler = SamplerConfig(sampler="ddpm", num_steps=steps, guidance_scale=guidance, clip_denoised=True)
    classifier = load_reference_classifier()
    real = load_real_images("digits")
    fp_images = generate_images(load_reference_model(), labels, seeds, sampler, batch_size=batch_size)
    results = []
    for method in methods:
        model, bits, wall, calibration_steps = build(method, config, extra)
        if progress:
            print(f"[quality] {method}: sampling {samples} images", file=sys.stderr, flush=True)
        images = fp_images if method == "fp" else generate_images(model, labels, seeds, sampler, batch_size=batch_size)
        metrics = build_metrics("classifier", classifier, real, samples)
        for start in range(0, samples, 500):
            stop = start + 500
            metrics.update(images[start:stop], labels[start:stop], None if method == "fp" else fp_images[start:stop])
        results.append(Result(method, bits, metrics.compute(), wall, calibration_steps, images))
    return results


def format_table(results: list[Result]) -> str:
    lines = [
        "| method | bits/weight | class acc % | digits-FID | precision | recall | IS | MSE to FP | FID to FP "
        "| calib. steps | calib. s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics
        lines.append(
            f"| {r.method} | {r.bits_per_weight:.3f} | {100 * m['class_accuracy']:.1f} | {m['fid']:.2f} "
            f"| {m['precision']:.3f} | {m['recall']:.3f} | {m['inception_score']:.2f} "
            f"| {m.get('mse_to_fp', 0.0):.4f} | {m.get('fid_to_fp', 0.0):.2f} "
            f"| {r.steps if r.steps is not None else '-'} | {f'{r.calibration_s:.0f}' if r.calibration_s else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--samples", type=int, default=500, help="images per method (balanced over 10 classes)")
    parser.add_argument("--steps", type=int, default=25, help="DDPM steps (learned variance)")
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance of the evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="configs/demo.yaml", help="calibration config of the calibrated methods")
    parser.add_argument("--grid", default=None, help="write a PNG grid: one row per method, 20 samples each")
    parser.add_argument("--threads", type=int, default=1)
    # Any other --section.key=value goes to the calibrations' LightningCLI, e.g. --data.num_trajectories=4
    args, args.extra = parser.parse_known_args(argv)
    unknown = [a for a in args.extra if not a.startswith(("--model.", "--data.", "--trainer."))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (calibration overrides look like --data.key=value)")
    for method in args.methods:
        if METHOD_PATTERN.match(method) is None:
            parser.error(f"unknown method {method!r}")
    if args.samples < 10:
        parser.error("--samples must be >= 10")
    torch.set_num_threads(args.threads)
    total = Timer()
    results = run(args.methods, args.samples, args.steps, args.guidance, args.seed, args.config, args.extra)
    print()
    print(f"reference digits DiT; {args.samples} samples per method (balanced), DDPM {args.steps} steps, "
          f"cfg {args.guidance}, seed {args.seed}; calibration: {args.config} {' '.join(args.extra)}".rstrip())
    print(machine_line(f"total {total.elapsed:.0f} s"))
    print()
    print(format_table(results))
    if args.grid:
        count = min(20, args.samples)
        grid = make_grid([r.images[:count] for r in results], scale=2)
        print(f"\ngrid ({', '.join(r.method for r in results)} top to bottom): {save_png(grid, args.grid)}")
    return results


if __name__ == "__main__":
    main()
