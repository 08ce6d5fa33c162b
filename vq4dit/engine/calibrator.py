"""The calibration engine: plain PyTorch, no Lightning.

A :class:`Calibrator` holds the frozen FP teacher and the VQ student and does everything one
calibration step needs: the block-wise loss with the gated ratio regulariser (paper Eq. 8-10),
the optimizer's parameter groups, codebook trainability, and the harden / prune / finalize step
with its optimizer-state surgery. Under DDP with block spreading (:class:`vq4dit.distributed.BlockSpread`)
every method acts on this rank's blocks and the statistics are global (collectives)::

    engine = Calibrator.build(teacher, VQConfig.from_bits(2), CalibrationConfig(), guidance_scale=4.0)
    optimizer = engine.make_optimizer()
    for step, batch in enumerate(batches):                  # (x_t, t, y) from the teacher's trajectories
        engine.step_loss(batch, step).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.prune_(optimizer)                            # harden confident rows, prune weak candidates
    engine.finalize_()                                      # argmax of every remaining soft row
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import BlockSpread
from ..layers import InputMoments, VQLinear
from ..families import Batch, FilterFn, block_modules, family_of
from ..models import NonFiniteError
from ..quantize import finalize_model_, select_layers, vq_layers
from ..soft import logit_regularizer
from ..typed_settings import require_resolved
from ..vq_config import VQConfig
from .allocation import AllocationConfig
from .overrides import check_overrides, merge_overrides, refuse_allocated_fields
from .config import CalibrationConfig
from .losses import RegularizerGate, StepLoss, block_losses
from .probe import Phases, build_layers, gather_statistics, preparation_steps, probe_allocation
from .student import build_student, cast_teacher_
from .window_build import build_by_window
from .windows import BlockWindow, WindowSteps, mutate_in_optimizer_


class Calibrator(WindowSteps):
    """VQ4DiT calibration of ``student`` against ``teacher``.

    Args:
        teacher: the frozen FP transformer, of a supported family (:mod:`vq4dit.families`).
        student: a copy with ``VQLinear`` layers (:func:`vq4dit.engine.build_student`).
        config: the calibration settings.
        vq_config: the default VQ settings the student was built with (kept for resume checks).
        guidance_scale: the calibration trajectories' guidance; above 1 every batch is also fed
            unconditioned (null label, negative prompt: the unconditional path of guided sampling
            is calibrated too).
        spread: block spreading over DDP ranks (None: this process calibrates every block).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        config: CalibrationConfig | None = None,
        *,
        vq_config: VQConfig | None = None,
        guidance_scale: float = 1.0,
        spread: BlockSpread | None = None,
    ) -> None:
        self.teacher, self.student = teacher, student
        self.config = config or CalibrationConfig()
        require_resolved(self.config)
        self.vq_config, self.guidance_scale, self.spread = vq_config, guidance_scale, spread
        self.layers: dict[str, VQLinear] = vq_layers(student)
        if not self.layers:
            raise ValueError("the student has no VQLinear layer to calibrate")
        self.gate = RegularizerGate(self.config.gate_window, self.config.regularizer_gating)
        self.input_moments: dict[str, InputMoments] | None = None  # set by build(): diagonals of activation-aware layers
        self.allocation: dict[str, dict[str, int]] | None = None  # set by build(): per-layer codebook sizes
        self.allocation_report: str | None = None
        self.allocation_check: dict | None = None  # set by build(): the allocated vs uniform start (probe.check_allocation)
        self.phase_seconds: dict[str, float] = {}  # set by build(): wall seconds per preparation phase
        self.window = None if self.config.window_blocks is None else BlockWindow.for_student(student, self.config.window_blocks)
        self.window_inputs = self.window_store(self.config)
        self.update_codebook_trainability()

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        vq_config: VQConfig,
        config: CalibrationConfig | None = None,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        overrides: Mapping[str, Mapping[str, int]] | None = None,
        guidance_scale: float = 1.0,
        progress: bool = True,
        items: dict[str, torch.Tensor] | None = None,
        bit_allocation: bool = False,
        bit_budget: float | None = None,
        allocation: Mapping[str, Mapping[str, int]] | None = None,
        allocation_config: AllocationConfig | None = None,
        filter_fn: FilterFn | None = None,
        offload_blocks: bool = False,
    ) -> "Calibrator":
        """Freeze ``teacher``, build the k-means-initialised student, cast the teacher to
        ``config.teacher_dtype``: a ready engine. ``items`` (``{"x", "t", "y"}`` calibration
        items) give the input statistics of layers with ``kmeans_metric="activation"`` and the
        sensitivities of ``bit_allocation``: per-layer codebook sizes chosen so the selected
        layers cost ``bit_budget`` bits per weight all-in (None: what the uniform settings cost;
        :mod:`vq4dit.engine.probe`, settings ``allocation_config``). ``allocation``: a previous
        run's per-layer codebook sizes (``engine.allocation``), reused as they are (a resume).
        ``filter_fn``: the layer filter when no ``include`` is given (None: the family's default set;
        :meth:`vq4dit.engine.config.LayerSelection.linear_filter` adds the family's options).
        ``engine.phase_seconds``: wall seconds of statistics, kmeans, feedback, probe, check.
        ``offload_blocks`` (``window_blocks``, no probe): built a window at a time (:mod:`.window_build`)."""
        config, allocation_config = config or CalibrationConfig(), allocation_config or AllocationConfig()
        teacher.requires_grad_(False).eval()
        check_overrides(overrides)
        selected = select_layers(teacher, vq_config, filter_fn, include=include, exclude=exclude, overrides=overrides)
        if bit_allocation or allocation is not None:
            refuse_allocated_fields(overrides, [name for name, _, _ in selected])
        probing = bit_allocation and allocation is None
        if probing and items is None:
            raise ValueError("activation-aware k-means, error feedback and bit allocation need calibration items")
        by_window, most = offload_blocks and config.window_blocks is not None and not probing, config.statistics_items
        phases = Phases(preparation_steps(selected, items, probing, allocation_config, most), progress)
        try:
            moments = None if by_window else gather_statistics(teacher, selected, items, guidance_scale, probing, phases,
                                                               max_items=most)
            measured, built = None, {}
            if probing:
                measured, built = probe_allocation(teacher, selected, moments, items, guidance_scale, bit_budget,
                                                   allocation_config, phases)
                allocation = measured.overrides()
            uniform = {name: c for name, _, c in selected}  # a layer allocated away from it: built as the probe does
            if allocation is not None:  # field by field: the user's other fields of a layer stay
                overrides = merge_overrides(overrides, allocation)
                selected = select_layers(teacher, vq_config, filter_fn, include=include, exclude=exclude, overrides=overrides)
            if by_window:
                layers, moments, _ = build_by_window(teacher, selected, items, guidance_scale, config.window_blocks,
                                                     phases, uniform, allocation_config, max_items=most,
                                                     chain=cls.window_store(config))
            else:
                layers = build_layers(selected, moments, phases, built, uniform, allocation_config)
        finally:
            phases.close()
        phases.seconds["kmeans"] = phases.seconds.get("kmeans", 0.0) - phases.seconds.get("feedback", 0.0)
        student = build_student(teacher, vq_config, include=include, exclude=exclude, overrides=overrides,
                                progress=False, input_moments=moments, prebuilt=layers, filter_fn=filter_fn)
        engine = cls(teacher, student, config, vq_config=vq_config, guidance_scale=guidance_scale)
        # the activation statistics used (E[x^2]; not the full matrices), for baselines of the same layers
        engine.input_moments = None if moments is None else {name: m.without_full() for name, m in moments.items()}
        engine.allocation = None if allocation is None else {name: dict(fields) for name, fields in allocation.items()}
        engine.allocation_report, engine.allocation_check = (None, None) if measured is None else (measured.format(), measured.check)
        engine.phase_seconds = phases.seconds
        if config.teacher_dtype != "float32":
            cast_teacher_(teacher, getattr(torch, config.teacher_dtype))
        return engine

    # ----------------------------------------------------------------------------------- layers
    def owned_layers(self) -> dict[str, VQLinear]:
        """The VQ layers calibrated here and now: all, this rank's under a spread, the window's under a window."""
        layers = self.layers
        for scope in (s for s in (self.spread, self.window) if s is not None):
            layers = {name: layer for name, layer in layers.items() if scope.owns_layer(name)}
        return layers

    def update_codebook_trainability(self) -> None:
        """Codebooks train with the ratios (``simultaneous``) or once their layer is hard; under a
        window, nothing of a layer outside it requires grad."""
        simultaneous, window = self.config.codebook_training == "simultaneous", self.window
        for name, layer in self.layers.items():
            active = window is None or window.owns_layer(name)
            for param in (layer.codebook, layer.row_scales):  # the scales train with their codebook
                if param is not None:
                    param.requires_grad_(active and (simultaneous or layer.is_hard))
            for param in (layer.bias, layer.candidate_logits) if window is not None else ():
                if param is not None:
                    param.requires_grad_(active)

    # ------------------------------------------------------------------------------------- loss
    def model_batch(self, batch: Batch) -> Batch:
        """A batch of B items (DiT: ``(x [B, C, H, W], t [B], y [B])``) -> the model batch (2B with
        the unconditional copies under guidance: null labels, the negative prompt; a guidance-distilled
        model: B with the guidance scale as an input)."""
        return family_of(self.teacher).conditioning.guided(batch, self.guidance_scale)

    def block_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block MSE ``[L]`` (0 for other ranks' blocks under a spread) and the output MSE."""
        owned = self.spread.owned_blocks if self.spread is not None else self.window.blocks if self.window else None
        output_grad = self.config.output_weight > 0 and torch.is_grad_enabled()
        return block_losses(self.teacher, self.student, self.model_batch(batch), block_inputs=self.config.block_inputs,
                            owned_blocks=owned, output_grad=output_grad, start_inputs=self.recorded_inputs(batch))

    def ratio_terms(self) -> dict[str, torch.Tensor]:
        """The ratio regulariser of every soft layer this rank calibrates."""
        kind = self.config.regularizer
        return {n: logit_regularizer(l.candidate_logits, kind) for n, l in self.owned_layers().items() if not l.is_hard}

    def global_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of per-owner values (zeros elsewhere); ``tensor`` itself without a spread."""
        return tensor if self.spread is None else self.spread.all_reduce_sum(tensor)

    def step_loss(self, batch, step: int) -> StepLoss:
        """The loss of optimisation step ``step``: mean block MSE + lambda_r x mean L_r over soft
        layers (gated). ``batch``: B calibration items (DiT: ``(x [B, C, H, W], t [B], y [B])``)."""
        block_mse, output_mse = self.block_losses(batch)
        terms, names = self.ratio_terms(), list(self.layers)
        # Every block MSE and every soft layer's L_r has one owner: summed over ranks, each rank
        # sees the values of one process, so logs, gating and stop rule agree on every rank.
        zero = torch.zeros((), device=block_mse.device)
        local = torch.cat([
            block_mse.detach().float(),
            torch.stack([terms[n].detach().float() if n in terms else zero for n in names]),  # [M] L_r
            torch.tensor([float(n in terms) for n in names], device=block_mse.device),  # [M] soft layer
        ])
        summed = self.global_sum(local)
        num_blocks, num_layers = block_mse.numel(), len(names)
        all_mse, all_r = summed[:num_blocks], summed[num_blocks : num_blocks + num_layers]
        soft = summed[num_blocks + num_layers :] > 0
        calibrated = self.calibrated_blocks(num_blocks)
        loss_d = all_mse[calibrated].mean()
        loss_r = all_r[soft].mean() if soft.any() else zero
        value_d, value_r = torch.stack([loss_d, loss_r]).tolist()  # one host sync for both
        if not math.isfinite(value_d) and (self.spread is not None or not dist.is_initialized()):
            self.check_finite_(step)  # names the layers when their parameters went NaN/Inf
            first = next(i for i, v in enumerate(all_mse.tolist()) if not math.isfinite(v))
            raise NonFiniteError(
                f"calibration diverged at step {step}: the output of block {self._block_names()[first]} is "
                f"{all_mse[first].item()}; nothing was exported (lower lr_codebook / lr_logits / lr_bias)"
            )
        apply_r = self.gate(value_r, step)
        # This rank's part: the same gradients as mean over all blocks + lambda_r x mean over soft layers.
        weight = self.config.regularizer_weight
        loss = block_mse.sum() / len(calibrated)
        if apply_r and terms:
            loss = loss + weight * (torch.stack(list(terms.values())).sum() / int(soft.sum()))
        if self.config.output_weight > 0:  # plain DDP averages it like the block terms
            loss = loss + self.config.output_weight * output_mse
        return StepLoss(loss, all_mse, loss_d, loss_r, output_mse.detach(), apply_r, weight, self.config.output_weight)

    # ----------------------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict]:
        """Codebooks, biases and ratio logits of every VQ layer (the window's), each with its learning rate."""
        layers, c = list((self.layers if self.window is None else self.owned_layers()).values()), self.config
        groups = [
            {"params": [l.codebook for l in layers], "lr": c.lr_codebook, "name": "codebooks"},
            {"params": [l.bias for l in layers if l.bias is not None], "lr": c.lr_bias, "name": "biases"},
            {"params": [l.candidate_logits for l in layers], "lr": c.lr_logits, "name": "ratio_logits"},
        ]
        scales, lr = [l.row_scales for l in layers if l.row_scales is not None], c.lr_row_scale
        return groups + ([{"params": scales, "lr": c.lr_codebook if lr is None else lr, "name": "row_scales"}] if scales else [])

    def make_optimizer(self) -> torch.optim.Optimizer:
        """RMSprop (``config.rmsprop_alpha``, eps 1e-8) or Adam over :meth:`param_groups`."""
        if self.config.optimizer == "adam":
            return torch.optim.Adam(self.param_groups())
        return torch.optim.RMSprop(self.param_groups(), alpha=self.config.rmsprop_alpha, eps=1e-8, momentum=0.0,
                                   weight_decay=0.0)

    def average_gradients_(self, world_size: int) -> None:
        """Plain DDP: average the gradients DDP cannot bucket (codebooks, ratio logits change shape
        and trainability) over ranks in one all-reduce. No-op in one process or with a spread."""
        if self.spread is not None or world_size <= 1 or not dist.is_initialized():
            return
        grads = [
            p.grad for layer in self.layers.values() for p in (layer.codebook, layer.candidate_logits, layer.row_scales)
            if p is not None and p.grad is not None and p.grad.numel()
        ]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def prune_(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        harden_threshold: float = 0.99,
        prune_floor: float = 0.01,
        finalize_fraction: float = 0.99,
    ) -> None:
        """Harden rows whose top ratio exceeds ``harden_threshold``, drop candidates below
        ``prune_floor`` (0: never), finalise layers with at least ``finalize_fraction`` hard rows;
        ``optimizer``'s state for the shrunk ratio logits shrinks with them."""
        for layer in self.owned_layers().values():
            if layer.is_hard:
                continue
            mutate_in_optimizer_(optimizer, layer, lambda: layer.harden_rows_(harden_threshold))
            if prune_floor > 0 and not layer.is_hard:
                mutate_in_optimizer_(optimizer, layer, lambda: layer.prune_candidates_(prune_floor))
            if not layer.is_hard and layer.hard_fraction >= finalize_fraction:
                mutate_in_optimizer_(optimizer, layer, layer.finalize_)
        self.update_codebook_trainability()

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """A CPU copy of every VQ layer's state (codebook, codes, soft rows, candidates, ratio logits, bias,
        row scales): :meth:`restore_` returns the student to it. Identical on every rank before step 1."""
        return {name: {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
                for name, layer in self.layers.items()}

    def restore_(self, snapshot: dict[str, dict[str, torch.Tensor]]) -> int:
        """Load a :meth:`snapshot` into every VQ layer, then argmax every soft row (the student is
        hard afterwards, as after :meth:`finalize_`; the optimizer's state no longer applies).
        Returns the number of rows finalised."""
        for name, layer in self.layers.items():
            layer.load_state_dict(snapshot[name])
        return self.finalize_()

    def finalize_(self) -> int:
        """Argmax for every soft row of every layer (under a spread: :meth:`share_` first); the rows finalised."""
        count = finalize_model_(self.student)
        self.update_codebook_trainability()
        return count

    def check_finite_(self, step: int) -> None:
        """Stop a diverging calibration: :class:`vq4dit.models.NonFiniteError` naming the step and
        the first layers whose codebook, ratio logits or bias hold NaN/Inf (after an optimizer
        step, so non-finite gradients are caught too). One host sync; a collective under a spread."""
        owned = self.owned_layers()
        device = next(iter(self.layers.values())).codes.device

        def finite(layer: VQLinear) -> torch.Tensor:  # a pruned candidate's logit is -inf by design
            logits = layer.candidate_logits
            checks = [torch.isfinite(p).all() for p in (layer.codebook, layer.bias, layer.row_scales) if p is not None]
            return torch.stack([*checks, ~(torch.isnan(logits) | torch.isposinf(logits)).any()]).all()

        flags = torch.stack([finite(l) if n in owned else torch.ones((), dtype=torch.bool, device=device)
                             for n, l in self.layers.items()])
        bad_flags = self.global_sum((~flags).to(torch.int32))
        bad = [name for name, flag in zip(self.layers, bad_flags.tolist()) if flag]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NonFiniteError(
                f"calibration diverged at step {step}: NaN/Inf in layer {shown}; nothing was exported "
                "(lower lr_codebook / lr_logits / lr_bias)"
            )

    def _block_names(self) -> list[str]:
        names = {id(module): name for name, module in self.student.named_modules()}
        return [names[id(block)] for block in block_modules(self.student)]

    # ----------------------------------------------------------------------- global statistics
    def soft_counts(self) -> dict[str, tuple[int, int]]:
        """Per layer: (soft rows, soft rows x candidate columns), as the layer's owner has them (every
        layer under a window: the later windows' rows are soft). A collective under a spread."""
        owned = self.layers if self.spread is None else {n: l for n, l in self.layers.items() if self.spread.owns_layer(n)}
        device = next(iter(self.layers.values())).codes.device
        local = torch.tensor(
            [[l.num_soft, l.num_soft * l.active_candidates] if n in owned else [0, 0] for n, l in self.layers.items()],
            dtype=torch.int64, device=device,
        ).reshape(-1, 2)  # [M, 2]
        return {name: (soft, slots) for name, (soft, slots) in zip(self.layers, self.global_sum(local).tolist())}

    def top_ratios_of_soft_rows(self) -> torch.Tensor:
        """Top ratio of every soft row of every layer, ``[S_total]`` on the CPU (a collective
        under a spread: gathered from the owners)."""
        owned = [l.ratios().max(dim=1).values.detach().cpu() for l in self.owned_layers().values() if l.num_soft]
        local = torch.cat(owned) if owned else torch.zeros(0)
        return local if self.spread is None else self.spread.gather_cat(local)

    def share_(self, optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
        """Under a spread, every rank gets every block's VQ and optimizer state from its owner (a
        collective; a no-op without a spread). Before checkpoints, samples and the export."""
        if self.spread is None:
            return
        self.spread.share_(self.layers, optimizer, device)
        self.update_codebook_trainability()

    # --------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """What a checkpoint needs besides the student's tensors and the optimizer state."""
        return {
            "layers": sorted(self.layers),
            "vq_config": vars(self.vq_config) if self.vq_config is not None else None,
            "gate_minimum": self.gate.minimum,
            "allocation": self.allocation,
            "window": None if self.window is None else self.window.index,
        }

    def load_state_dict(self, saved: Mapping) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it came from another configuration."""
        mine = self.state_dict()
        if (saved.get("vq_config") != mine["vq_config"] or list(saved.get("layers", [])) != mine["layers"]
                or saved.get("allocation") != mine["allocation"]):
            raise ValueError(
                "cannot resume: the checkpoint was calibrated with another configuration "
                f"(checkpoint: {saved.get('vq_config')}, {len(saved.get('layers', []))} layers; "
                f"this run: {mine['vq_config']}, {len(mine['layers'])} layers)"
            )
        self.gate.minimum = saved.get("gate_minimum", self.gate.minimum)
        if self.window is not None and saved.get("window") is not None:  # the window the run had reached
            self.window.index = int(saved["window"])
