"""The start of a quantized layer: row scales, the k-means codebook and every sub-vector's
candidates, for one or several settings of one weight.

Pure tensor math over a weight ``[out, in]`` (:class:`vq4dit.layers.VQLinear` turns an
:class:`Assignment` into a layer). Several settings of one layer (the bit-allocation probe's
options k/2, k, 2k) share the weight preparation and run their error feedback together
(:func:`vq4dit.error_feedback.error_feedback_assign_many`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .codewords import nearest_codewords, to_subvectors
from .error_feedback import error_feedback_assign_many
from .kmeans import kmeans
from .vq_config import VQConfig


@dataclass
class Assignment:
    """A layer's start: ``scales [out]`` (None without row scales), ``codebook [k, d]``,
    ``nearest [N, n]`` candidate indices (nearest first, N = out * in / d) and their
    ``sq_distances [N, n]`` (what the initial ratios are computed from)."""

    scales: torch.Tensor | None
    codebook: torch.Tensor
    nearest: torch.Tensor
    sq_distances: torch.Tensor


def scaled_weight(weight: torch.Tensor, row_scale: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight [out, in]`` as float32 divided by its row RMS ``[out]`` (stored as float16) when
    ``row_scale``; the scales (None without)."""
    weight = weight.detach().float()
    if not row_scale:
        return weight, None
    scales = weight.pow(2).mean(dim=1).sqrt().clamp(min=torch.finfo(torch.float16).tiny)
    scales = scales.half().float()  # the stored precision
    return weight / scales.unsqueeze(1), scales


def in_weight_units(scales: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``scales [out]`` and a ``codebook [k, d]`` fitted to the scaled rows, rescaled by the power
    of two nearest the scales' geometric mean: the scales become relative (about 1) and the codewords
    are in the weight's own units, so the optimizer's ``lr_codebook`` moves a codeword as far in
    weight space as it does without row scales (with codewords of about 1 it moved them 10-50x less:
    calibration barely trained the codebooks). The product, and so the layer, is bit-identical."""
    unit = torch.exp2(scales.log2().mean().round())
    return scales / unit, codebook * unit


def activation_weights(diagonal: torch.Tensor | None, out_features: int, in_features: int, d: int,
                       name: str) -> torch.Tensor:
    """Per-dimension weights ``[out * in / d, d]`` of every sub-vector from ``E[x^2] [in]``
    (normalised to mean 1): the activation metric of k-means and assignment."""
    if diagonal is None or diagonal.shape != (in_features,):
        raise ValueError(f"{name}: kmeans_metric='activation' needs the input moments' diagonal E[x^2] [{in_features}]")
    per_dim = diagonal.float()
    per_dim = per_dim / per_dim.mean().clamp(min=torch.finfo(torch.float32).tiny)  # scale-free
    return per_dim.view(1, -1).expand(out_features, -1).reshape(-1, d)


def _feedback_key(config: VQConfig) -> tuple:
    """Settings that let two configs of one layer share one error-feedback pass."""
    return config.subvector_dim, config.row_scale, config.num_candidates, config.ratio_init


@torch.no_grad()
def assign_options(weight: torch.Tensor, configs: Sequence[VQConfig], diagonal: torch.Tensor | None = None,
                   hessian: torch.Tensor | None = None, name: str = "layer",
                   seconds: dict[str, float] | None = None,
                   lloyd_points: Sequence[int | None] | None = None) -> list[Assignment]:
    """The start of ``weight [out, in]`` under each of ``configs`` (one :class:`Assignment` each).

    ``diagonal``: the input moments ``E[x^2] [in]`` (``kmeans_metric="activation"``); ``hessian``:
    ``E[x x^T] [in, in]`` (``error_feedback``). Configs that agree on ``d``, row scales, candidates
    and initial ratios run their error feedback in one pass; its wall time is added to
    ``seconds["feedback"]``. ``lloyd_points``: per config, the Lloyd iterations' sample of points
    per codeword (:func:`vq4dit.kmeans.kmeans`; None: every sub-vector)."""
    out_features, in_features = weight.shape
    prepared, feedback = [], {}
    for index, config in enumerate(configs):
        config.validate_for(out_features, in_features, name)
        scaled, scales = scaled_weight(weight, config.row_scale)
        points = to_subvectors(scaled, config.subvector_dim)  # [N, d]
        weights = None
        if config.kmeans_metric == "activation":
            weights = activation_weights(None if diagonal is None else diagonal.to(weight.device), out_features,
                                         in_features, config.subvector_dim, name)
        codebook = kmeans(points, config.codebook_size, config.kmeans_iters, config.kmeans_seed, weights=weights,
                          lloyd_points_per_cluster=None if lloyd_points is None else lloyd_points[index])
        prepared.append((scaled, scales, points, weights, codebook))
        if config.error_feedback:
            if hessian is None or hessian.shape != (in_features, in_features):
                raise ValueError(f"{name}: error_feedback needs the full input moments E[x x^T] "
                                 f"[{in_features}, {in_features}]")
            feedback.setdefault(_feedback_key(config), []).append(index)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for indices in feedback.values():
        started = time.perf_counter()
        config = configs[indices[0]]
        results = error_feedback_assign_many(prepared[indices[0]][0], [prepared[i][4] for i in indices], hessian,
                                             config.num_candidates, ratio_init=config.ratio_init)
        found.update(zip(indices, results))
        if seconds is not None:
            seconds["feedback"] = seconds.get("feedback", 0.0) + time.perf_counter() - started
    assignments = []
    for index, (config, (_, scales, points, weights, codebook)) in enumerate(zip(configs, prepared)):
        nearest, sq_distances = found[index] if index in found else \
            nearest_codewords(points, codebook, config.num_candidates, weights)
        if scales is not None and config.codebook_units == "weight":
            scales, codebook = in_weight_units(scales, codebook)
        assignments.append(Assignment(scales, codebook, nearest, sq_distances))
    return assignments
