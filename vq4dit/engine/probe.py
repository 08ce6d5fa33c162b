"""The student's VQ layers, built once, and the bit-allocation probe that chooses among them.

The probe builds every allocation option of every layer with the run's own levers (row scales,
activation-aware k-means, error feedback, the initial ratios), so its ``dW`` (start weight minus FP
weight) is the one the run starts from. It predicts each option's layer output error
``tr(dW H dW^T) / out`` from ``H = E[x x^T]`` with no model forward, and turns it into final-output
error with one gain per layer: the final-output MSE of one forward with the layer alone at its base
``k``, divided by that option's predicted error. The chosen option's layer goes into the student as
it is (no second k-means). A check on held-out items compares the allocated start with the uniform
start and keeps the uniform setting when allocation is worse. Every phase is timed (``Phases``)
under one progress bar with an ETA.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..layers import InputMoments, VQLinear
from ..vq_config import VQConfig
from .allocation import (
    AllocationConfig, AllocationResult, LayerChoice, allocation_options, mean_bits_per_weight, mean_over_ranks,
    solve_allocation,
)
from .statistics import input_second_moments, item_batches, statistics_batches, strided_items

log = logging.getLogger(__name__)

Selected = Sequence[tuple[str, nn.Linear, VQConfig]]
Batches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Phases:
    """Wall seconds per phase (``seconds``) and one progress bar with an ETA over all of them."""

    def __init__(self, total: int, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        self.seconds: dict[str, float] = {}
        self.bar = tqdm(total=total, desc="preparing the student", unit="step", disable=not progress)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``seconds[name]``."""
        self.bar.set_postfix_str(name, refresh=False)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def step(self, count: int = 1) -> None:
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()


def preparation_steps(selected: Selected, items: dict | None, allocate: bool, config: AllocationConfig) -> int:
    """Progress-bar steps of :func:`gather_statistics`, :func:`probe_allocation` and :func:`build_layers`."""
    steps = len(selected)  # the student's layers
    if items is not None and any(allocate or c.kmeans_metric == "activation" or c.error_feedback for _, _, c in selected):
        steps += len(strided_items(items["t"].numel(), 1024).split(8))  # statistics_batches' batches
    if allocate:
        steps += sum(len(allocation_options(c, m.out_features, m.in_features, config.span)) for _, m, c in selected)
        steps += len(selected) + 2  # the gain forwards (+ reference) and the check
    return steps


def gather_statistics(teacher: nn.Module, selected: Selected, items: dict | None, guidance_scale: float,
                      allocate: bool, phases: Phases) -> dict[str, InputMoments] | None:
    """Input second moments per layer: ``E[x^2] [in]`` for activation-aware k-means, and the full
    ``E[x x^T] [in, in]`` for error feedback and for every layer when allocating; None when none is needed."""
    aware = [name for name, _, c in selected if allocate or c.kmeans_metric == "activation" or c.error_feedback]
    if not aware:
        return None
    if items is None:
        raise ValueError("activation-aware k-means, error feedback and bit allocation need calibration items")
    full = {name for name, _, c in selected if allocate or c.error_feedback}
    with phases.phase("statistics"):
        return input_second_moments(teacher, aware, statistics_batches(items, guidance_scale), full=full,
                                    on_batch=phases.step)


def build_layers(selected: Selected, moments: Mapping[str, InputMoments] | None, phases: Phases,
                 built: Mapping[str, Sequence[VQLinear]] = {}) -> dict[str, VQLinear]:
    """One ``VQLinear`` per selected layer: a layer of ``built`` whose config is the layer's own
    (the probe's), else a new one (k-means and assignment)."""
    layers = {}
    with phases.phase("kmeans"):
        for name, linear, config in selected:
            reuse = [layer for layer in built.get(name, ()) if layer.config == config]
            layers[name] = reuse[0] if reuse else VQLinear.from_linear(
                linear, config, name, None if moments is None else moments.get(name), phases.seconds)
            phases.step()
    return layers


def layer_output_error(linear: nn.Linear, layer: VQLinear, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T) / out``: the mean squared output error of ``layer``'s start weight against
    ``linear``'s (``dW [out, in]``) on inputs with second moments ``hessian [in, in]``."""
    delta = layer.weight().detach().float() - linear.weight.detach().float()
    return float(((delta @ hessian.to(delta)) * delta).sum() / delta.shape[0])


@contextlib.contextmanager
def swapped(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with ``layers`` (exact name -> module) in place of its own; restored afterwards."""
    originals = []
    try:
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, layer)
        yield model
    finally:
        for parent, child, module in reversed(originals):
            setattr(parent, child, module)


@torch.no_grad()
def output_mse(model: nn.Module, batches: Batches, reference: list[torch.Tensor] | None = None) -> tuple[float, list]:
    """Mean final-output MSE of ``model`` against ``reference`` over ``batches`` (0 without one)
    and the outputs ``[B, C, H, W]`` per batch."""
    device = next(model.parameters()).device
    outputs = [model(x.to(device), timestep=t.to(device), class_labels=y.to(device)).sample.float() for x, t, y in batches]
    if reference is None:
        return 0.0, outputs
    return sum(float((o - r).pow(2).mean()) for o, r in zip(outputs, reference)) / len(batches), outputs


@torch.no_grad()
def probe_allocation(
    teacher: nn.Module,
    selected: Selected,
    hessians: Mapping[str, InputMoments],
    items: dict[str, torch.Tensor],
    guidance_scale: float,
    budget: float | None,
    config: AllocationConfig,
    phases: Phases,
) -> tuple[AllocationResult, dict[str, list[VQLinear]]]:
    """Allocate ``budget`` bits per weight (all-in; None: what the uniform setting costs) over
    ``selected`` from predicted sensitivities, checked against uniform on held-out items.

    Args:
        hessians: the input moments of every selected layer, with the full ``E[x x^T] [in, in]``
            (:func:`gather_statistics`).
        items: ``{"x", "t", "y"}`` calibration items; the gain forwards and the check use disjoint ones.

    Returns the allocation (the uniform one when the check fell back; ``notes`` say so) and every
    option's layer per layer name, for :func:`build_layers` to reuse.
    """
    budget = mean_bits_per_weight(selected) if budget is None else budget
    built: dict[str, list[VQLinear]] = {}
    predicted: dict[str, list[float]] = {}
    for name, linear, base in selected:
        options = allocation_options(base, linear.out_features, linear.in_features, config.span)
        built[name] = []
        for option in options:
            with phases.phase("kmeans"):
                built[name].append(VQLinear.from_linear(linear, option, name, hessians[name], phases.seconds))
            with phases.phase("probe"):
                predicted.setdefault(name, []).append(layer_output_error(linear, built[name][-1], hessians[name].full))
            phases.step()
    index = strided_items(items["t"].numel(), config.gain_items + config.check_items)
    gain_index, check_index = (index[0::2], index[1::2]) if config.check_items else (index, index[:0])
    with phases.phase("probe"):
        gain_batches = item_batches(items, gain_index, guidance_scale, batch_size=32)
        _, reference = output_mse(teacher, gain_batches)
        phases.step()
        measured = []
        for name, _, base in selected:
            at_base = next(layer for layer in built[name] if layer.config == base)
            with swapped(teacher, {name: at_base}):
                measured.append(output_mse(teacher, gain_batches, reference)[0])
            phases.step()
        measured = mean_over_ranks(measured, reference[0].device)
        layers = []
        for (name, linear, base), final in zip(selected, measured):
            options = [layer.config for layer in built[name]]
            at_base = predicted[name][options.index(base)]
            gain = final / at_base if at_base > 0 else 0.0
            layers.append(LayerChoice(name, linear.out_features * linear.in_features, options,
                                      [o.stored_bits_per_weight(linear.out_features, linear.in_features) for o in options],
                                      [gain * p for p in predicted[name]], predicted[name], gain, options.index(base)))
        allocation = AllocationResult(budget, layers)
        allocation.choice = solve_allocation(layers, budget)
    if config.check_items:
        with phases.phase("check"):
            check_allocation(teacher, allocation, built, item_batches(items, check_index, guidance_scale, batch_size=32))
    phases.step()
    log.info("%s", allocation.format())
    return allocation, built


@torch.no_grad()
def check_allocation(teacher: nn.Module, allocation: AllocationResult, built: Mapping[str, Sequence[VQLinear]],
                     batches: Batches) -> bool:
    """Final-output MSE of the allocated start and of the uniform start on ``batches``; when the
    allocated one is worse, ``allocation`` falls back to the uniform setting (its ``choice``) and
    its ``notes`` say so. Returns whether the allocation was kept."""
    uniform = {layer.name: layer.base for layer in allocation.layers}
    allocated_choice, allocation.choice = allocation.choice, uniform
    uniform_bits, allocation.choice = allocation.bits_per_weight, allocated_choice
    if uniform_bits > allocation.budget * (1 + 1e-9):
        allocation.notes.append(f"bit allocation check: none (the uniform setting, {uniform_bits:.3f} b/w, "
                                "does not fit the budget)")
        return True
    pick = lambda choice: {name: built[name][i] for name, i in choice.items()}  # noqa: E731
    _, reference = output_mse(teacher, batches)
    with swapped(teacher, pick(allocation.choice)):
        allocated = output_mse(teacher, batches, reference)[0]
    with swapped(teacher, pick(uniform)):
        flat = output_mse(teacher, batches, reference)[0]
    allocated, flat = mean_over_ranks([allocated, flat], reference[0].device)
    items = sum(x.shape[0] for x, _, _ in batches)
    kept = allocated <= flat
    allocation.check = {"allocated_mse": allocated, "uniform_mse": flat, "items": items, "kept": kept}
    if kept:
        allocation.notes.append(f"bit allocation check: start output MSE {allocated:.3e} allocated <= {flat:.3e} "
                                f"uniform on {items} held-out items: allocation kept")
    else:
        allocation.choice = uniform
        allocation.notes.append(f"bit allocation fell back to uniform: start output MSE {allocated:.3e} allocated > "
                                f"{flat:.3e} uniform on {items} held-out items")
    return kept

