"""The k-means initialisation of ``benchmarks/projection.py``: one ``hidden x hidden`` layer counted
(torch backend, as on a GPU) and timed (default backend, as on this CPU) under a run's resolved VQ
settings, and the counts scaled to every quantized layer of DiT-XL/2."""

from __future__ import annotations

from unittest import mock

import torch

from benchmarks.common import Timer
from benchmarks.recipe_configs import needs_statistics
from benchmarks.roofline import Counts, combine, count_ops
from vq4dit.codewords import to_subvectors
from vq4dit.kmeans import kmeans, kmeans_backend
from vq4dit.layers import InputMoments, VQLinear
from vq4dit.vq_config import VQConfig


def layer_moments(hidden: int) -> InputMoments:
    """Input second moments of a ``hidden``-wide layer from random inputs (the values change no count)."""
    x = torch.randn(2 * hidden, hidden, generator=torch.Generator().manual_seed(0))
    return InputMoments.from_full(x.t() @ x / x.shape[0])


def measure_kmeans(config: VQConfig, hidden: int, lloyd_iters: int) -> dict[str, Counts]:
    """k-means initialisation of one ``hidden x hidden`` layer under ``config`` with the torch backend
    (what a CUDA run uses): ``seeding`` (k-means++ only), ``layer0`` (``VQLinear.from_linear`` without
    Lloyd iterations: seeding + assignment + ratio init, with error feedback where ``config`` has it)
    and ``layerN`` (with ``lloyd_iters``); with error feedback also ``plain0`` (``layer0`` without it)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(hidden, hidden)
    points = to_subvectors(linear.weight.detach(), config.subvector_dim)
    moments = layer_moments(hidden) if needs_statistics(config) else None

    def build(**changes) -> None:
        VQLinear.from_linear(linear, config.with_overrides(**changes), "layer", moments)

    with mock.patch(f"{kmeans.__module__}.kmeans_backend", return_value="torch"), torch.no_grad():
        parts = {
            "seeding": count_ops(lambda: kmeans(points, config.codebook_size, 0, backend="torch")),
            "layer0": count_ops(lambda: build(kmeans_iters=0)),
            "layerN": count_ops(lambda: build(kmeans_iters=lloyd_iters)),
        }
        if config.error_feedback:
            parts["plain0"] = count_ops(lambda: build(kmeans_iters=0, error_feedback=False))
    return parts


def host_kmeans_seconds(config: VQConfig, hidden: int, iters: int) -> float:
    """CPU wall seconds of ``VQLinear.from_linear`` on one ``hidden x hidden`` layer under ``config``
    with the default backend (faiss when installed) and ``iters`` Lloyd iterations: what a CPU-only
    ``configure_model`` runs."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(hidden, hidden)
    moments = layer_moments(hidden) if needs_statistics(config) else None
    with Timer() as t:
        VQLinear.from_linear(linear, config.with_overrides(kmeans_iters=iters), "layer", moments)
    return t.seconds


def project_kmeans(parts: dict[str, Counts], hidden: int, lloyd_iters: int, target_iters: int,
                   shapes: list[tuple[int, int]]) -> Counts:
    """All layers ``shapes``: per layer the seeding (fixed-size subsample) plus the sub-vector
    proportional part (assignment + ``target_iters`` Lloyd iterations), scaled from the measured
    ``hidden x hidden`` layer by its sub-vector count, and the error feedback (``layer0 - plain0``):
    FLOPs and bytes scaled by ``out * in^2``, kernels and syncs by ``in`` (its loop over column groups)."""
    seeding, layer0, layer_n = parts["seeding"], parts["layer0"], parts["layerN"]
    per_iter = combine([(1.0 / lloyd_iters, layer_n), (-1.0 / lloyd_iters, layer0)])
    plain0 = parts.get("plain0", layer0)
    feedback = combine([(1.0, layer0), (-1.0, plain0)])
    proportional = combine([(1.0, plain0), (-1.0, seeding), (float(target_iters), per_iter)])
    scale = sum(o * i for o, i in shapes) / (hidden * hidden)
    scaled = combine([(sum(o * i * i for o, i in shapes) / hidden ** 3, feedback)])
    per_column = combine([(sum(i for _, i in shapes) / hidden, feedback)])  # one loop step per column group
    scaled.kernels, scaled.syncs, scaled.launch_s = per_column.kernels, per_column.syncs, per_column.launch_s
    return combine([(float(len(shapes)), seeding), (scale, proportional), (1.0, scaled)])


def kmeans_backend_name() -> str:
    """The k-means backend ``auto`` picks for a large CPU problem here."""
    return kmeans_backend("cpu")
