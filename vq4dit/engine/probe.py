"""The student's VQ layers, built once, and the bit-allocation probe that chooses among them.

The probe predicts each allocation option's layer output error ``tr(dW H dW^T) / out`` from
``H = E[x x^T]`` with no model forward. Every option (k/2, k, 2k) is built with the run's levers
(row scales, activation-aware k-means, error feedback, the initial ratios), so its ``dW`` is the one
the run would start from and the chosen one goes into the student as it is. A layer's options
share one error-feedback pass, and the options other than the base ``k`` run their k-means Lloyd
iterations on a sample of ``allocation.probe_points_per_codeword`` sub-vectors per codeword.
``allocation.probe_kmeans_iters`` drafts the options with fewer Lloyd iterations instead (their
errors scaled by what the full build gains over its draft at the base ``k``; the chosen ones are
then built in full). One gain per layer turns the prediction into final-output error, measured
block-locally: the layer's block output on recorded block inputs, and one model forward per block.
A check on held-out items compares the allocated start with the uniform start and keeps the
uniform setting when allocation is worse. Every phase is
timed (``Phases``) under one progress bar with an ETA.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..families import Batch, batch_size, block_modules, call_model, capture_blocks
from ..layers import InputMoments, VQLinear
from ..vq_config import VQConfig
from .allocation import (
    AllocationConfig, AllocationResult, LayerChoice, allocation_options, mean_bits_per_weight, mean_over_ranks,
    solve_allocation,
)
from .statistics import input_second_moments, item_batches, statistics_batches, strided_items

log = logging.getLogger(__name__)

Selected = Sequence[tuple[str, nn.Linear, VQConfig]]
Batches = list[Batch]


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


def preparation_steps(selected: Selected, items: dict | None, allocate: bool, config: AllocationConfig,
                      max_items: int = 1024) -> int:
    """Progress-bar steps of :func:`gather_statistics` (on ``max_items`` items at most),
    :func:`probe_allocation` and :func:`build_layers`."""
    steps = len(selected)  # the student's layers
    if items is not None and any(allocate or c.kmeans_metric == "activation" or c.error_feedback for _, _, c in selected):
        steps += len(strided_items(items["t"].numel(), max_items).split(8))  # statistics_batches' batches
    if allocate:
        steps += sum(len(allocation_options(c, m.out_features, m.in_features, config.span)) for _, m, c in selected)
        steps += len(selected) + 2  # the gain forwards (+ reference) and the check
    return steps


def gather_statistics(teacher: nn.Module, selected: Selected, items: dict | None, guidance_scale: float,
                      allocate: bool, phases: Phases, stop_after: nn.Module | None = None,
                      max_items: int = 1024, forward=None) -> dict[str, InputMoments] | None:
    """Input second moments per layer: ``E[x^2] [in]`` for activation-aware k-means, and the full
    ``E[x x^T] [in, in]`` for error feedback and for every layer when allocating; None when none is needed.
    ``stop_after``: the module after which the teacher's forward may stop (:func:`input_second_moments`);
    ``max_items``: the items used at most (evenly strided, :func:`statistics_batches`); ``forward``:
    how a model batch runs (:func:`input_second_moments`)."""
    aware = [name for name, _, c in selected if allocate or c.kmeans_metric == "activation" or c.error_feedback]
    if not aware:
        return None
    if items is None:
        raise ValueError("activation-aware k-means, error feedback and bit allocation need calibration items")
    full = {name for name, _, c in selected if allocate or c.error_feedback}
    with phases.phase("statistics"):
        return input_second_moments(teacher, aware, statistics_batches(items, guidance_scale, max_items=max_items), full=full,
                                    on_batch=phases.step, stop_after=stop_after, forward=forward)


def build_layers(selected: Selected, moments: Mapping[str, InputMoments] | None, phases: Phases,
                 built: Mapping[str, Sequence[VQLinear]] = {}, uniform: Mapping[str, VQConfig] = {},
                 config: AllocationConfig | None = None) -> dict[str, VQLinear]:
    """One ``VQLinear`` per selected layer: a layer of ``built`` whose config is the layer's own
    (the probe's), else a new one (k-means and assignment). A layer allocated away from its
    ``uniform`` config is built as the probe (settings ``config``) builds it
    (:func:`moved_layer`): a resumed run rebuilds the same layers."""
    layers = {}
    with phases.phase("kmeans"):
        for name, linear, vq in selected:
            layer_moments = None if moments is None else moments.get(name)
            reuse = [layer for layer in built.get(name, ()) if layer.config == vq]
            if reuse:
                layers[name] = reuse[0]
            elif name in uniform and vq != uniform[name] and config is not None:
                layers[name] = moved_layer(linear, name, vq, uniform[name], layer_moments, config, phases)
            else:
                layers[name] = VQLinear.from_linear(linear, vq, name, layer_moments, phases.seconds)
            phases.step()
    return layers


def build_options(linear: nn.Linear, name: str, options: Sequence[VQConfig], moments: InputMoments,
                  config: AllocationConfig, phases: Phases) -> list[VQLinear]:
    """``options`` of one layer other than its base ``k``, built together (one error-feedback
    pass), their Lloyd iterations on a sample of ``config.probe_points_per_codeword`` sub-vectors
    per codeword."""
    return VQLinear.from_linear_options(linear, options, name, moments, phases.seconds,
                                        [config.probe_points_per_codeword] * len(options))


def moved_layer(linear: nn.Linear, name: str, chosen: VQConfig, base: VQConfig, moments: InputMoments | None,
                config: AllocationConfig, phases: Phases) -> VQLinear:
    """The layer of option ``chosen`` (not the ``base``) as the probe built it: with the layer's
    other options (:func:`build_options`; alone when the probe drafts them)."""
    options = allocation_options(base, linear.out_features, linear.in_features, config.span)
    together = [option for option in options if option != base] if config.probe_kmeans_iters is None else []
    if chosen not in together:
        together = [chosen]
    return build_options(linear, name, together, moments, config, phases)[together.index(chosen)]


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
    outputs = [call_model(model, batch, device).float() for batch in batches]
    if reference is None:
        return 0.0, outputs
    return sum(float((o - r).pow(2).mean()) for o, r in zip(outputs, reference)) / len(batches), outputs


def draft_config(option: VQConfig, config: AllocationConfig) -> VQConfig:
    """The build of ``option`` the probe predicts from: ``config.probe_kmeans_iters`` Lloyd
    iterations (None: the option's own, a full build), every other setting the option's own."""
    iters = config.probe_kmeans_iters
    return option if iters is None else option.with_overrides(kmeans_iters=min(option.kmeans_iters, iters))


def predict_options(linear: nn.Linear, name: str, options: Sequence[VQConfig], base: VQConfig, moments: InputMoments,
                    config: AllocationConfig, phases: Phases) -> tuple[list[float], list[VQLinear]]:
    """Predicted output error ``[len(options)]`` of every option of one layer, and the layers
    built in full (the base ``k`` first; every option when drafts are full builds).

    The base ``k`` is built in full with the run's levers and its ``tr(dW H dW^T) / out`` is exact.
    Another option's prediction is its draft's error (:func:`draft_config`) times the base's
    full-to-draft ratio (what the remaining Lloyd iterations gain at the base ``k``)."""
    drafted = list(dict.fromkeys(draft_config(option, config) for option in options))
    drafted = [draft for draft in drafted if draft != base]  # each draft once (the base's own when drafting)
    with phases.phase("kmeans"):
        made = {base: VQLinear.from_linear(linear, base, name, moments, phases.seconds)}  # as without allocation
        made.update(zip(drafted, build_options(linear, name, drafted, moments, config, phases)))
    drafts = [made[draft_config(option, config)] for option in options]
    full = [made[base]] + [made[option] for option in options if option != base and option in made]
    with phases.phase("probe"):
        errors = [layer_output_error(linear, draft, moments.full) for draft in drafts]
        exact = layer_output_error(linear, full[0], moments.full)
        at_base = errors[options.index(base)]
        ratio = exact / at_base if at_base > 0 else 1.0
        predicted = [exact if option == base else error * ratio for option, error in zip(options, errors)]
    phases.step(len(options))
    return predicted, full


def _mse(output, reference) -> float:
    """MSE of a module output (a tensor, a diffusers output or a tuple of tensors) against ``reference``."""
    output, reference = (getattr(o, "sample", o) for o in (output, reference))
    if isinstance(output, (tuple, list)):
        pairs = [(o, r) for o, r in zip(output, reference) if isinstance(o, torch.Tensor)]
        return sum(float((o.float() - r.float()).pow(2).mean()) for o, r in pairs) / len(pairs)
    return float((output.float() - reference.float()).pow(2).mean())


@torch.no_grad()
def layer_gains(teacher: nn.Module, layers: Mapping[str, VQLinear], predicted: Mapping[str, float], batches: Batches,
                on_forward=lambda: None) -> dict[str, float]:
    """Final-output MSE per unit of predicted layer error, per layer, measured block-locally.

    For a layer in block ``b``: its block's output MSE with the layer alone quantized (the block
    run on its recorded inputs) per unit of ``predicted``, times block ``b``'s own output-to-final
    gain (one model forward with every given layer of block ``b`` quantized, divided by that
    block's output MSE with them). A layer outside the blocks gets its own model forward. So a
    model of B blocks needs B forwards (not one per layer) plus cheap block forwards.
    ``batches``: model batches; ``on_forward()`` after each model forward."""
    blocks = block_modules(teacher)
    owner = {id(module): index for index, block in enumerate(blocks) for module in block.modules()}
    grouped: dict[int | None, list[str]] = {}
    for name in layers:
        grouped.setdefault(owner.get(id(teacher.get_submodule(name))), []).append(name)
    device = next(teacher.parameters()).device
    records = []
    for batch in batches:
        with capture_blocks(blocks, record_inputs=True) as (outputs, inputs):
            final = call_model(teacher, batch, device)
        records.append((final, list(inputs), list(outputs)))
    on_forward()

    def final_mse(swap: Mapping[str, nn.Module]) -> float:
        with swapped(teacher, swap):
            return sum(_mse(call_model(teacher, batch, device), final)
                       for batch, (final, _, _) in zip(batches, records)) / len(batches)

    def block_mse(index: int, swap: Mapping[str, nn.Module]) -> float:
        with swapped(teacher, swap):
            return sum(_mse(blocks[index](*inputs[index][0], **inputs[index][1]), outputs[index])
                       for _, inputs, outputs in records) / len(records)

    gains = {}
    for index, names in grouped.items():
        if index is None:  # outside the blocks: its own forward
            for name in names:
                gains[name] = final_mse({name: layers[name]}) / predicted[name] if predicted[name] > 0 else 0.0
                on_forward()
            continue
        together = {name: layers[name] for name in names}
        through = block_mse(index, together)
        to_output = final_mse(together) / through if through > 0 else 0.0
        on_forward()
        for name in names:
            local = block_mse(index, {name: layers[name]})
            gains[name] = local / predicted[name] * to_output if predicted[name] > 0 else 0.0
    return gains


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

    Returns the allocation (the uniform one when the check fell back; ``notes`` say so) and the
    fully built layers per layer name (the base ``k`` and every chosen ``k``), for
    :func:`build_layers` to reuse.
    """
    budget = mean_bits_per_weight(selected) if budget is None else budget
    built: dict[str, list[VQLinear]] = {}
    predicted: dict[str, list[float]] = {}
    options: dict[str, list[VQConfig]] = {}
    for name, linear, base in selected:
        options[name] = allocation_options(base, linear.out_features, linear.in_features, config.span)
        predicted[name], built[name] = predict_options(linear, name, options[name], base, hessians[name], config,
                                                       phases)
    index = strided_items(items["t"].numel(), config.gain_items + config.check_items)
    gain_index, check_index = (index[0::2], index[1::2]) if config.check_items else (index, index[:0])
    with phases.phase("probe"):
        bases = {name: built[name][0] for name, _, _ in selected}
        at_base = {name: predicted[name][options[name].index(base)] for name, _, base in selected}
        gains = layer_gains(teacher, bases, at_base, item_batches(items, gain_index, guidance_scale, batch_size=32))
        measured = mean_over_ranks([gains[name] for name, _, _ in selected], next(teacher.parameters()).device)
        layers = []
        for (name, linear, base), gain in zip(selected, measured):
            layers.append(LayerChoice(name, linear.out_features * linear.in_features, options[name],
                                      [o.stored_bits_per_weight(linear.out_features, linear.in_features) for o in options[name]],
                                      [gain * p for p in predicted[name]], predicted[name], gain, options[name].index(base)))
        allocation = AllocationResult(budget, layers)
        allocation.choice = solve_allocation(layers, budget)
    phases.step(len(selected) + 1)
    build_choice(allocation, selected, hessians, built, phases, config)
    if config.check_items:
        with phases.phase("check"):
            check_allocation(teacher, allocation, built, item_batches(items, check_index, guidance_scale, batch_size=32))
    phases.step()
    log.info("%s", allocation.format())
    return allocation, built


def build_choice(allocation: AllocationResult, selected: Selected, hessians: Mapping[str, InputMoments],
                 built: dict[str, list[VQLinear]], phases: Phases, config: AllocationConfig) -> None:
    """Build, in full (:func:`build_options`), every layer's chosen option not in ``built`` yet
    (added to ``built[name]``)."""
    missing = [(name, linear, layer.configs[allocation.choice[name]])
               for (name, linear, _), layer in zip(selected, allocation.layers)
               if all(b.config != layer.configs[allocation.choice[name]] for b in built[name])]
    phases.bar.total += len(missing)
    with phases.phase("kmeans"):
        for name, linear, option in missing:
            built[name] += build_options(linear, name, [option], hessians[name], config, phases)
            phases.step()


def chosen_layers(allocation: AllocationResult, choice: Mapping[str, int],
                  built: Mapping[str, Sequence[VQLinear]]) -> dict[str, VQLinear]:
    """Layer name -> the built layer of the option ``choice`` picks."""
    configs = {layer.name: layer.configs for layer in allocation.layers}
    return {name: next(b for b in built[name] if b.config == configs[name][i]) for name, i in choice.items()}


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
    pick = lambda choice: chosen_layers(allocation, choice, built)  # noqa: E731
    _, reference = output_mse(teacher, batches)
    with swapped(teacher, pick(allocation.choice)):
        allocated = output_mse(teacher, batches, reference)[0]
    with swapped(teacher, pick(uniform)):
        flat = output_mse(teacher, batches, reference)[0]
    allocated, flat = mean_over_ranks([allocated, flat], reference[0].device)
    items = sum(batch_size(batch) for batch in batches)
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

