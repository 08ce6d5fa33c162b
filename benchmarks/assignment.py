"""Layer output error of the assignment methods on the reference DiT, before any calibration.

For every core Linear of the shipped digits DiT, the relative output error
``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` with ``H = E[x x^T]`` of the layer's inputs on the
demo's calibration trajectories (8 x 4 samples, 25 DDPM steps, cfg 4, with null labels), where
``Q`` is the hard (n = 1) quantized weight of: ``nearest`` (every sub-vector on its nearest
codeword under the activation metric: the default recipe before error feedback), ``feedback``
(error feedback, column groups left to right), ``feedback-act`` (groups by decreasing E[x^2]).
Row scales and activation-aware k-means as in the quality recipe. A fast screen (seconds): the
calibration and the images decide (``python -m benchmarks.ablation``).

    python -m benchmarks.assignment
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_line, markdown_table
from vq4dit import VQConfig
from vq4dit.engine import input_second_moments, statistics_batches
from vq4dit.error_feedback import error_feedback_assign
from vq4dit.layers import InputMoments, VQLinear
from vq4dit.quantize import select_layers
from vq4dit.reference import load_reference_model
from vq4dit.sampling import SamplerConfig
from vq4dit.trajectories import TrajectoryPlan, generate_items

SETTINGS = {"regime-w2": (16, 2), "paper-w2": (256, 4), "w3": (64, 2)}
METHODS = ("nearest", "feedback", "feedback-act")
TYPES = {"norm1.linear": "adaLN", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "net.0.proj": "mlp1",
         "net.2": "mlp2"}


def relative_output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = approximation - weight
    return float(torch.trace(delta @ hessian @ delta.t()) / torch.trace(weight @ hessian @ weight.t()))


def hard_weight(linear, config: VQConfig, hessian: torch.Tensor, method: str) -> torch.Tensor:
    """The n = 1 weight of one method (k-means and row scales as ``VQLinear.from_linear``)."""
    layer = VQLinear.from_linear(linear, config.with_overrides(num_candidates=1), "layer", InputMoments(diagonal=hessian.diagonal()))
    if method != "nearest":
        scales = layer.row_scales.detach().unsqueeze(1)
        order = "activation" if method == "feedback-act" else "input"
        codes, _ = error_feedback_assign(linear.weight.detach() / scales, layer.codebook.detach(), hessian, 1, order=order)
        layer.codes.copy_(codes[:, 0].to(layer.codes.dtype))
    return layer.weight().detach()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_reference_model().eval()
    plan = TrajectoryPlan(0, 4, 10, SamplerConfig(sampler="ddpm", num_steps=25, guidance_scale=4.0))
    items = generate_items(teacher, list(range(8)), plan, progress=False)
    names = [name for name, _, _ in select_layers(teacher, VQConfig(codebook_size=16, subvector_dim=2))]
    hessians = {name: moments.full for name, moments in
                input_second_moments(teacher, names, statistics_batches(items, 4.0), full=set(names)).items()}
    results = {}
    for setting in args.settings:
        k, d = SETTINGS[setting]
        config = VQConfig(codebook_size=k, subvector_dim=d, row_scale=True, kmeans_metric="activation")
        for name in names:
            linear = teacher.get_submodule(name)
            for method in METHODS:
                error = relative_output_error(linear.weight.detach(), hard_weight(linear, config, hessians[name], method),
                                              hessians[name])
                results[(setting, name, method)] = error
    print("relative layer output error before calibration, reference digits DiT")
    print(machine_line() + "\n")
    kinds = sorted(set(TYPES.values()), key=list(TYPES.values()).index)
    rows = []
    for setting in args.settings:
        for method in METHODS:
            errors = {name: results[(setting, name, method)] for name in names}
            by_kind = {kind: [e for n, e in errors.items() if TYPES[next(s for s in TYPES if n.endswith(s))] == kind]
                       for kind in kinds}
            rows.append([setting, method, f"{sum(errors.values()) / len(errors):.4f}",
                         *(f"{sum(v) / len(v):.4f}" for v in by_kind.values())])
    print(markdown_table(["setting", "method", "mean", *kinds], rows))
    return results


if __name__ == "__main__":
    main()
