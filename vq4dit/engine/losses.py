"""Block-wise calibration losses (paper Eq. 8) and the official ratio-regulariser gate."""

from __future__ import annotations

import math
from typing import Container

import torch
import torch.nn.functional as F
from torch import nn

from ..models import block_modules, capture_blocks
from ..sampling import NULL_CLASS


def with_null_labels(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, t, y)`` of B items -> 2B: the items again with the null label (the unconditional
    path that classifier-free guided sampling also runs)."""
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])


def block_losses(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    block_inputs: str = "student",
    owned_blocks: Container[int] | None = None,
    output_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block MSE ``[L]`` between teacher and student block outputs, and the final-output MSE.

    ``x [B, C, H, W]``, ``t [B]``, ``y [B]``. ``block_inputs="student"`` runs the student end to
    end; ``"teacher"`` feeds every student block the teacher's input of that block (the output MSE
    is then NaN: there is no student output). ``owned_blocks`` (``teacher`` inputs only): blocks
    computed here; the others get an MSE of exactly 0 (their owner computes them).
    ``output_grad``: the output MSE keeps its graph (an output-level loss term), else detached.
    """
    teacher_blocks, student_blocks = block_modules(teacher), block_modules(student)
    teaching_inputs = block_inputs == "teacher"
    with torch.no_grad(), capture_blocks(teacher_blocks, record_inputs=teaching_inputs) as (t_out, t_in):
        teacher_final = teacher(x, timestep=t, class_labels=y).sample
    if teaching_inputs:
        owned = range(len(student_blocks)) if owned_blocks is None else owned_blocks
        s_out = [
            block(*args, **kwargs) if index in owned else None
            for index, (block, (args, kwargs)) in enumerate(zip(student_blocks, t_in))
        ]
        output_mse = torch.tensor(float("nan"), device=x.device)
    else:
        with capture_blocks(student_blocks) as (s_out, _):
            student_final = student(x, timestep=t, class_labels=y).sample
        output = student_final if output_grad else student_final.detach()
        output_mse = F.mse_loss(output.float(), teacher_final.float())
    zero = torch.zeros((), device=x.device)
    block_mse = torch.stack([zero if s is None else F.mse_loss(s.float(), tt.float()) for s, tt in zip(s_out, t_out)])
    return block_mse, output_mse


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
