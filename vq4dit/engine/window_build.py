"""The student's VQ layers built window by window (``calibration.window_blocks`` with ``offload_blocks``).

For window ``w`` of K blocks in turn: the input statistics of its layers only (one pass of the teacher
over the statistics items, its forward stopped after the window's last block), then each layer built
where the teacher is (k-means, error feedback: the fast device) and, outside window 0, moved to the
CPU right after it is built; then the window's full ``E[x x^T]`` are dropped (the diagonals stay, for
``engine.input_moments``). Layers outside the blocks belong to window 0 (as in :class:`BlockWindow`).
So during the build the device holds, besides the teacher: the float32 statistics sums of one window's
layers, window 0's VQ state, and the one layer being built (:class:`BuildLedger` counts the VQ state).
Every layer is built from the same statistics (the same items, the same activations) by the same
seeded k-means as in the one-pass build: the student and its export are bit-identical. The cost: one
statistics pass per window instead of one (each stopped after its window: about ``(W + 1) / 2`` full
passes for W windows), unless a ``chain`` (``window_inputs`` memory / disk) records, during window
``w``'s pass, every statistics batch's input of window ``w + 1``'s first block: the next pass starts
there (:mod:`.window_inputs`), and the teacher's blocks run once per batch over the build. The
statistics, hence the layers, are the same; a recording that does not fit falls back (one line).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..families import call_model, family_of
from ..layers import InputMoments, VQLinear
from ..models import block_modules
from ..vq_config import VQConfig
from ..write_faults import WriteError
from .allocation import AllocationConfig
from .probe import Phases, Selected, build_layers, gather_statistics
from .statistics import statistics_batches
from .window_inputs import WindowInputs, teacher_from

log = logging.getLogger(__name__)

def layer_windows(teacher: nn.Module, selected: Selected, size: int) -> dict[str, int | None]:
    """Window index of every selected layer: its block's index // ``size``; None outside the blocks
    (built with window 0)."""
    owner = {id(module): index for index, block in enumerate(block_modules(teacher)) for module in block.modules()}
    return {name: owner[id(linear)] // size if id(linear) in owner else None for name, linear, _ in selected}


def state_bytes(module: nn.Module, device: torch.device) -> int:
    """Bytes of ``module``'s parameters and buffers that live on ``device``."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()) if t.device == device)


@dataclass
class BuildLedger:
    """The built VQ layers' bytes on the compute ``device`` during a build: ``held`` (those left
    there), ``peak`` (the most at once: held plus the layer just built, before it moved), and the
    layers moved off it (``parked``)."""

    device: torch.device
    held: int = 0
    peak: int = 0
    parked: list[str] = field(default_factory=list)

    def record(self, name: str, built: int, kept: int) -> None:
        """Layer ``name`` was built with ``built`` bytes on the device and left ``kept`` there."""
        self.peak = max(self.peak, self.held + built)
        self.held += kept
        if kept < built:
            self.parked.append(name)


def build_by_window(teacher: nn.Module, selected: Selected, items: dict | None, guidance_scale: float, size: int,
                    phases: Phases, uniform: Mapping[str, VQConfig] = {}, config: AllocationConfig | None = None,
                    park_device: torch.device | str = "cpu", max_items: int = 1024, chain: WindowInputs | None = None,
                    ) -> tuple[dict[str, VQLinear], dict[str, InputMoments] | None, BuildLedger]:
    """:func:`vq4dit.engine.probe.build_layers` of ``selected`` a window of ``size`` blocks at a time
    (see the module): the layers outside window 0 move to ``park_device`` right after they are built.

    Returns the layers (in ``selected``'s order), the diagonals ``E[x^2] [in]`` of the layers that
    had statistics (None when none had), and the ledger of the VQ state on the teacher's device."""
    placed = layer_windows(teacher, selected, size)
    windows = {name: 0 if window is None else window for name, window in placed.items()}
    blocks, device = block_modules(teacher), next(teacher.parameters()).device
    ledger, park_device = BuildLedger(device), torch.device(park_device)
    layers: dict[str, VQLinear] = {}
    diagonals: dict[str, InputMoments] = {}
    per_pass, passes = 0 if items is None else len(statistics_batches(items, guidance_scale, max_items=max_items)), 0
    for window in sorted(set(windows.values())):
        group = [entry for entry in selected if windows[entry[0]] == window]
        inside = all(placed[name] is not None for name, _, _ in group)  # else a layer may follow the blocks
        last = blocks[min((window + 1) * size, len(blocks)) - 1] if inside else None
        needs = any(c.kmeans_metric == "activation" or c.error_feedback for _, _, c in group)
        if needs:  # preparation_steps counted one statistics pass
            phases.bar.total += per_pass if passes else 0
            passes += 1
        chained = chain is not None and not chain.stopped and all(p is not None for p in placed.values()) and needs
        target = (window + 1) * size if chained and (window + 1) * size < len(blocks) else None
        try:
            if chained and target is not None:
                chain.begin_(target, per_pass)
            moments = gather_statistics(teacher, group, items, guidance_scale, False, phases,
                                        stop_after=last if target is None else None, max_items=max_items,
                                        forward=_chained(chain, teacher, target) if chained else None)
            if chained and target is not None:
                log.info("student build: %s", chain.commit_())
        except (WriteError, MemoryError) as err:  # the recording did not fit: this window's pass again, plainly
            log.warning("student build: %s", chain.abort_(err))
            moments = gather_statistics(teacher, group, items, guidance_scale, False, phases, stop_after=last,
                                        max_items=max_items)
        for entry in group:
            name = entry[0]
            layer = build_layers([entry], moments, phases, {}, uniform, config)[name]
            built = state_bytes(layer, device)
            if window > 0:
                layer = layer.to(park_device)
            ledger.record(name, built, state_bytes(layer, device))
            layers[name] = layer
            if moments is not None and name in moments:
                diagonals[name] = moments.pop(name).without_full()  # the full E[x x^T] is freed here
    if chain is not None:
        chain.clear_()  # the build's recordings (calibration records its own)
    log.info("student build by window: at most %.3f GB of VQ state on %s, %.3f GB left there; %d of %d layers "
             "moved to %s; %d statistics passes", ledger.peak / 1e9, device, ledger.held / 1e9, len(ledger.parked),
             len(layers), park_device, passes)
    return {name: layers[name] for name, _, _ in selected}, diagonals or None, ledger


def _chained(chain: WindowInputs, teacher: nn.Module, target: int | None):
    """How a statistics batch runs under ``chain``: from its recording (if any) to block ``target``,
    recording that block's input (:meth:`WindowInputs.record_one_`); ``target`` None (the last
    window): from its recording on, the statistics' stop hook ends the forward."""
    family, device = family_of(teacher), next(teacher.parameters()).device

    def forward(batch) -> None:
        if target is not None:
            chain.record_one_(family, teacher, batch, batch)
            return
        call = chain.get(batch, device)
        with teacher_from(family, teacher, chain.start if call is not None else 0, call):
            call_model(teacher, batch, device)

    return forward
