"""Bit allocation under a budget: per-layer codebook sizes chosen from each layer's sensitivity.

Every selected layer may take a codebook of ``2^(c-span) .. 2^(c+span)`` codewords around the base
``k = 2^c`` (same sub-vector length ``d``, so ``log2(k)/d`` bits per weight move in steps of
``1/d``). The sensitivity of layer ``l`` at option ``o`` is the mean squared error of the model's
final output when only that layer is vector-quantized with option ``o``: predicted from the layer's
output error ``tr(dW H dW^T)`` times one measured gain per layer (:mod:`vq4dit.engine.probe`, the
run's default), or measured with one model forward per option (:func:`measure_sensitivity`). The allocation
minimises the summed sensitivity subject to ``sum_l bits_l(o_l) <= budget x sum_l weights_l``
(a multiple-choice knapsack, solved exactly by dynamic programming on a fine grid of the budget), where
``bits_l`` is all-in: codes, FP32 codebook and FP16 row scales (:meth:`VQConfig.stored_bits_per_weight`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..families import Batch, batch_to, call_model
from ..layers import InputMoments, VQLinear
from ..vq_config import VQConfig
from .config import BitAllocation as AllocationConfig  # the settings (declared once, in engine.config)

log = logging.getLogger(__name__)


def allocation_options(config: VQConfig, out_features: int, in_features: int, span: int = 2) -> list[VQConfig]:
    """The configs one ``out x in`` layer may take: ``k = 2^(c + s)`` for ``s`` in ``-span..span``
    around ``config``'s ``k = 2^c``, kept where ``max(2, n) <= k <= sub-vectors``; fewest bits first."""
    if span < 0:
        raise ValueError(f"span must be >= 0, got {span}")
    base = config.code_bits
    subvectors = out_features * in_features // config.subvector_dim
    options = []
    for bits in range(base - span, base + span + 1):
        k = 2**bits
        if bits >= 1 and max(2, config.num_candidates) <= k <= subvectors:
            options.append(config.with_overrides(codebook_size=k))
    return options


def mean_bits_per_weight(selected: Iterable[tuple[str, nn.Linear, VQConfig]], span: int | None = None) -> float:
    """All-in bits per weight of ``selected`` layers as configured (``span`` None), or the fewest
    any allocation over ``k / 2^span .. k * 2^span`` can reach."""
    total = bits = 0.0
    for _, linear, config in selected:
        options = [config] if span is None else allocation_options(config, linear.out_features, linear.in_features, span)
        weights = linear.out_features * linear.in_features
        bits += min(o.stored_bits_per_weight(linear.out_features, linear.in_features) for o in options) * weights
        total += weights
    return bits / total


def cheapest_bits_per_weight(selected: Iterable[tuple[str, nn.Linear, VQConfig]],
                             span: int = AllocationConfig.span) -> float:
    """The fewest all-in bits per weight any allocation of ``selected`` layers can reach."""
    return mean_bits_per_weight(selected, span)


@dataclass
class LayerChoice:
    """One layer's options: ``configs[i]`` costs ``bits[i]`` (all-in, per weight) and gives output
    MSE ``scores[i]`` when it alone is quantized (measured, or ``gain x predicted[i]``, the layer's
    own output error, when predicted)."""

    name: str
    num_weights: int
    configs: list[VQConfig]
    bits: list[float]
    scores: list[float]
    predicted: list[float] | None = None
    gain: float | None = None
    base: int | None = None  # the uniform setting's option


@dataclass
class AllocationResult:
    """The chosen option per layer (``choice[name]`` indexes ``layers[i].configs``)."""

    budget: float
    layers: list[LayerChoice]
    choice: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the check against uniform, printed with the table
    check: dict | None = None  # its numbers: allocated_mse, uniform_mse, items, kept

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per weight of the allocation over the selected layers."""
        total = sum(layer.bits[self.choice[layer.name]] * layer.num_weights for layer in self.layers)
        return total / sum(layer.num_weights for layer in self.layers)

    def overrides(self) -> dict[str, dict[str, int]]:
        """Exact layer name -> ``{"codebook_size": k}`` (``quantize_``'s ``overrides``)."""
        return {layer.name: {"codebook_size": layer.configs[self.choice[layer.name]].codebook_size} for layer in self.layers}

    def format(self) -> str:
        """A table: layer, k chosen, all-in bits/weight, the gain (output MSE per unit of layer
        error, when predicted) and the single-layer output MSE of every option; then the notes."""
        lines = [f"bit allocation: budget {self.budget:.3f} b/w, allocated {self.bits_per_weight:.3f} b/w",
                 "| layer | k | bits/weight | gain | output MSE by k |", "|---|---|---|---|---|"]
        for layer in self.layers:
            i = self.choice[layer.name]
            scores = ", ".join(f"{c.codebook_size}: {s:.2e}" for c, s in zip(layer.configs, layer.scores))
            gain = "measured" if layer.gain is None else f"{layer.gain:.3g}"
            lines.append(f"| {layer.name} | {layer.configs[i].codebook_size} | {layer.bits[i]:.3f} | {gain} | {scores} |")
        return "\n".join(lines + self.notes)


def solve_allocation(layers: Sequence[LayerChoice], budget: float, resolution: int = 8192) -> dict[str, int]:
    """Minimise ``sum scores`` subject to the weighted mean of ``bits`` <= ``budget``.

    Exact dynamic programme over the budget cut into ``resolution`` units (every option's cost is
    rounded up, so the result always fits), then the rounding slack goes greedily to the upgrade
    with the best MSE decrease per bit. Deterministic.

    Raises:
        ValueError: even the cheapest option of every layer exceeds the budget.
    """
    total_weights = sum(layer.num_weights for layer in layers)
    limit = budget * total_weights * (1 + 1e-9)
    cost = lambda layer, i: layer.bits[i] * layer.num_weights  # noqa: E731
    cheapest = sum(min(cost(layer, i) for i in range(len(layer.configs))) for layer in layers)
    if cheapest > limit:
        raise ValueError(f"bit budget {budget} is below the cheapest allocation "
                         f"({cheapest / total_weights:.3f} bits/weight all-in)")
    unit = limit / resolution
    best = torch.full((resolution + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[c]: least summed score of the layers so far at exactly c units
    picks = []
    for layer in layers:
        options = torch.full((len(layer.configs), resolution + 1), math.inf, dtype=torch.float64)
        for i, score in enumerate(layer.scores):
            units = math.ceil(cost(layer, i) / unit - 1e-9)
            if units <= resolution:
                options[i, units:] = best[:resolution + 1 - units] + score
        best, pick = options.min(dim=0)
        picks.append(pick)
    at = int(best.argmin())
    choice = {}
    for layer, pick in zip(reversed(layers), reversed(picks)):
        i = int(pick[at])
        choice[layer.name] = i
        at -= math.ceil(cost(layer, i) / unit - 1e-9)
    while True:  # the rounding slack: the best MSE decrease per extra bit that still fits
        room, upgrade = limit - sum(cost(layer, choice[layer.name]) for layer in layers), None
        for layer in layers:
            here = choice[layer.name]
            for i in range(len(layer.configs)):
                extra, gain = cost(layer, i) - cost(layer, here), layer.scores[here] - layer.scores[i]
                if gain > 0 and extra <= room and (upgrade is None or gain / max(extra, 1e-30) > upgrade[0]):
                    upgrade = (gain / max(extra, 1e-30), layer.name, i)
        if upgrade is None:
            return {layer.name: choice[layer.name] for layer in layers}
        choice[upgrade[1]] = upgrade[2]


@torch.no_grad()
def measure_sensitivity(
    teacher: nn.Module,
    selected: Iterable[tuple[str, nn.Linear, VQConfig]],
    batches: Sequence[Batch],
    input_moments: Mapping[str, InputMoments] | None = None,
    span: int = 2,
    progress: bool = True,
) -> list[LayerChoice]:
    """Output MSE of ``teacher`` with one layer at a time vector-quantized, for every option.

    Args:
        teacher: the FP DiT (restored unchanged afterwards).
        selected: ``(name, linear, config)`` of the layers to allocate (``select_layers``).
        batches: model batches (DiT: ``(x [B, C, H, W], t [B], y [B])``).
        input_moments: per layer, the input second moments (``kmeans_metric="activation"``, error feedback).
        span: options ``k = 2^(c-span) .. 2^(c+span)`` around each layer's ``k = 2^c``.

    Under ``torch.distributed`` the scores are averaged over ranks, so every rank allocates alike.
    """
    from tqdm.auto import tqdm

    selected = list(selected)
    device = next(teacher.parameters()).device
    batches = [batch_to(batch, device) for batch in batches]
    run = lambda: [call_model(teacher, batch).float() for batch in batches]  # noqa: E731
    reference = run()
    layers = []
    work = sum(len(allocation_options(c, m.out_features, m.in_features, span)) for _, m, c in selected)
    bar = tqdm(total=work, desc="bit allocation", unit="option", disable=not progress)
    for name, linear, config in selected:
        parent_name, _, child = name.rpartition(".")
        parent = teacher.get_submodule(parent_name) if parent_name else teacher
        weights = None if input_moments is None else input_moments.get(name)
        options = allocation_options(config, linear.out_features, linear.in_features, span)
        scores = []
        try:
            for option in options:
                hard = VQLinear.from_linear(linear, option.with_overrides(num_candidates=1), name, weights)
                setattr(parent, child, hard)
                outputs = run()
                scores.append(sum(float((o - r).pow(2).mean()) for o, r in zip(outputs, reference)) / len(batches))
                bar.update()
        finally:
            setattr(parent, child, linear)
        layers.append(LayerChoice(name, linear.out_features * linear.in_features, options,
                                  [o.stored_bits_per_weight(linear.out_features, linear.in_features) for o in options],
                                  scores))
    bar.close()
    flat = mean_over_ranks([s for layer in layers for s in layer.scores], device)
    for layer in layers:
        layer.scores, flat = flat[:len(layer.scores)], flat[len(layer.scores):]
    return layers


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """``values`` averaged over ``torch.distributed`` ranks (as they are in one process), so every
    rank allocates alike."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    flat = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return (flat / dist.get_world_size()).tolist()


def allocate_bits(
    teacher: nn.Module,
    selected: Iterable[tuple[str, nn.Linear, VQConfig]],
    batches: Sequence[Batch],
    budget: float | None = None,
    input_moments: Mapping[str, InputMoments] | None = None,
    span: int = 2,
    progress: bool = True,
) -> AllocationResult:
    """Measure every selected layer's sensitivity and allocate ``budget`` bits per weight (all-in;
    None: what the selected configs cost as given, i.e. the same bits spent where they matter)."""
    selected = list(selected)
    if budget is None:
        budget = mean_bits_per_weight(selected)
    layers = measure_sensitivity(teacher, selected, batches, input_moments, span, progress)
    allocation = AllocationResult(budget, layers)
    allocation.choice = solve_allocation(layers, budget)
    log.info("%s", allocation.format())
    return allocation
