"""Block-wise calibration losses (paper Eq. 8) and the official ratio-regulariser gate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Container

import torch
import torch.nn.functional as F
from torch import nn

from ..families import Batch, ClassLabels, capture_blocks, family_of
from .window_inputs import BlockCall, StopForward, teacher_from


@dataclass
class StepLoss:
    """One step's loss and its parts (all but ``loss`` detached and global over ranks).

    ``loss``: this rank's part, to call ``backward()`` on (summed over ranks it is the full loss);
    ``block_mse [L]``: per-block MSE; ``distillation``: their mean (L_d); ``ratio``: mean ratio
    regulariser over soft layers (L_r); ``ratio_applied``: whether the gate let L_r in.
    """

    loss: torch.Tensor
    block_mse: torch.Tensor
    distillation: torch.Tensor
    ratio: torch.Tensor
    output_mse: torch.Tensor
    ratio_applied: bool
    ratio_weight: float
    output_weight: float = 0.0

    @property
    def total(self) -> torch.Tensor:
        """L_d + lambda_r L_r (where the gate applied it) + lambda_o output MSE, as optimised."""
        ratio = self.ratio_weight * self.ratio if self.ratio_applied else 0.0
        return self.distillation + ratio + (self.output_weight * self.output_mse if self.output_weight else 0.0)


def with_null_labels(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, t, y)`` of B items -> 2B: the items again with the null label (the unconditional
    path that classifier-free guided sampling also runs)."""
    return ClassLabels().with_unconditional((x, t, y))


def block_output_mse(output, reference) -> torch.Tensor:
    """MSE of a block's output against the teacher's: a tensor, or the mean over the tensors of a
    tuple (blocks that return several streams)."""
    if isinstance(output, torch.Tensor):
        return F.mse_loss(output.float(), reference.float())
    pairs = [(o, r) for o, r in zip(output, reference) if isinstance(o, torch.Tensor)]
    return torch.stack([F.mse_loss(o.float(), r.float()) for o, r in pairs]).mean()


def block_losses(
    teacher: nn.Module,
    student: nn.Module,
    *batch: Batch | torch.Tensor,
    block_inputs: str = "student",
    owned_blocks: Container[int] | None = None,
    output_grad: bool = False,
    start_inputs: tuple[int, BlockCall] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block MSE ``[L]`` between teacher and student block outputs, and the final-output MSE.

    ``batch``: one model batch (a dict, or DiT's tuple), or DiT's three tensors ``x [B, C, H, W],
    t [B], y [B]``; the teacher's family calls both models on it. ``block_inputs="student"`` runs
    the student end to end; ``"teacher"`` feeds every student block the teacher's input of that
    block, as hooks recorded it (the output MSE is then NaN: there is no student output).
    ``owned_blocks`` (``teacher`` inputs only): blocks computed here; the others get an MSE of
    exactly 0 (their owner, or their window, computes them); only the owned blocks' teacher inputs and
    outputs are kept, and the teacher's forward stops after the last of them. ``output_grad``: the output MSE keeps its graph (an
    output-level loss term), else detached.
    """
    batch = batch[0] if len(batch) == 1 else batch
    family = family_of(teacher)
    teacher_blocks, student_blocks = family.blocks(teacher), family.blocks(student)
    teaching_inputs = block_inputs == "teacher"
    if teaching_inputs:
        owned = range(len(student_blocks)) if owned_blocks is None else owned_blocks
        return _owned_block_losses(family, teacher, student_blocks, batch, owned, start_inputs)
    with torch.no_grad(), capture_blocks(teacher_blocks) as (t_out, _):
        teacher_final = family.forward(teacher, batch)
    with capture_blocks(student_blocks) as (s_out, _):
        student_final = family.forward(student, batch)
    output = student_final if output_grad else student_final.detach()
    final_mse = F.mse_loss(output.float(), teacher_final.float())
    block_mse = torch.stack([block_output_mse(s, tt) for s, tt in zip(s_out, t_out)])
    return block_mse, final_mse


def _owned_block_losses(family, teacher: nn.Module, student_blocks: list[nn.Module], batch: Batch,
                        owned_blocks: Container[int], start_inputs: tuple[int, BlockCall] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_losses` with teacher inputs for ``owned_blocks`` only (0 for the others, NaN output MSE)."""
    teacher_blocks = family.blocks(teacher)
    owned = [index for index in range(len(teacher_blocks)) if index in owned_blocks]
    device = next(teacher.parameters()).device
    t_out, t_in = [None] * len(teacher_blocks), [None] * len(teacher_blocks)
    if owned:
        def stop(_module, _args, _output):
            raise StopForward

        start, call = start_inputs or (0, None)
        if call is not None and owned[0] < start:
            raise ValueError(f"recorded inputs of block {start} cannot compute block {owned[0]}")
        with torch.no_grad(), teacher_from(family, teacher, start, call), \
                capture_blocks([teacher_blocks[i] for i in owned], record_inputs=True) as (out, inp):
            handle = teacher_blocks[owned[-1]].register_forward_hook(stop)  # after capture_blocks' own hook
            try:
                family.forward(teacher, batch)
            except StopForward:
                pass
            finally:
                handle.remove()
        for position, index in enumerate(owned):
            t_out[index], t_in[index] = out[position], inp[position]
        device = _first_tensor(t_out[owned[-1]]).device
    zero = torch.zeros((), device=device)
    block_mse = torch.stack([
        block_output_mse(student_blocks[i](*t_in[i][0], **t_in[i][1]), t_out[i]) if t_out[i] is not None else zero
        for i in range(len(teacher_blocks))
    ])
    return block_mse, torch.tensor(float("nan"), device=device)


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else next(o for o in output if isinstance(o, torch.Tensor))


class RegularizerGate:
    """The official code's gate of the ratio loss: apply L_r only when it rose above its running
    minimum; the minimum is forgotten every ``window`` steps (one trajectory in the official code)."""

    def __init__(self, window: int, enabled: bool = True) -> None:
        self.window, self.enabled = window, enabled
        self.minimum = math.inf

    def __call__(self, value: float, step: int) -> bool:
        """Whether to apply a ratio loss of ``value`` at optimisation step ``step``."""
        if not self.enabled:
            return True
        if step % self.window == 0:
            self.minimum = math.inf
        apply = value > self.minimum
        self.minimum = min(self.minimum, value)
        return apply
