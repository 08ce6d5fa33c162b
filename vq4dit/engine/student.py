"""Teacher and student construction: the VQ student shares the frozen teacher's tensors."""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
from torch import nn

from ..families import FilterFn
from ..layers import InputMoments
from ..quantize import quantize_, vq_layers
from ..vq_config import VQConfig


def build_student(
    teacher: nn.Module,
    vq_config: VQConfig,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, int]] | None = None,
    progress: bool = True,
    input_moments: Mapping[str, InputMoments] | None = None,
    prebuilt: Mapping[str, nn.Module] | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """A calibration student: ``teacher``'s modules with k-means-initialised ``VQLinear`` layers.

    New modules, but the frozen tensors are shared with the (frozen) teacher: nothing writes them,
    and a deep copy would hold a second set of weights (3 GB on DiT-XL/2) that the quantized layers
    replace anyway. ``input_moments``: per layer, the input second moments of activation-aware k-means and
    error feedback; ``prebuilt``: ``VQLinear`` layers already built, used as they are
    (:func:`vq4dit.quantize.quantize_`); ``filter_fn``: the layer filter when no ``include`` is given
    (None: the model family's default set). Ratio logits and biases of the VQ layers require gradients (codebooks: see
    :meth:`vq4dit.engine.Calibrator.update_codebook_trainability`); the student is in eval mode.
    """
    shared = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    student = copy.deepcopy(teacher, memo=shared)
    quantize_(student, vq_config, filter_fn, include=include, exclude=exclude, overrides=overrides, progress=progress,
              input_moments=input_moments, prebuilt=prebuilt)
    for layer in vq_layers(student).values():
        layer.candidate_logits.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
    return student.eval()


def cast_teacher_(teacher: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give ``teacher`` new ``dtype`` tensors (a student built earlier keeps the float32 tensors it
    shared) and a pre-hook casting floating inputs, so callers may keep passing float32."""
    for module in teacher.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point():
                cast = tensor.detach().to(dtype)
                setattr(module, name, nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast)

    def cast_inputs(_module, args, kwargs):
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return tuple(map(cast, args)), {key: cast(value) for key, value in kwargs.items()}

    teacher.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return teacher


def load_packed_student(path: str, teacher: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """The packed model ``path`` (``vq4dit.load_quantized``), checked to be a quantization of
    ``teacher``'s architecture (``ValueError`` naming the differing config fields otherwise)."""
    from ..io import load_quantized

    student = load_quantized(path, device=device)
    mine = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    theirs = {k: v for k, v in student.config.items() if not k.startswith("_")}
    differing = sorted(k for k in mine if k in theirs and mine[k] != theirs[k])
    if differing:
        raise ValueError(
            f"the packed model {path} does not fit the FP model: "
            + ", ".join(f"{k} {theirs[k]!r} vs {mine[k]!r}" for k in differing)
        )
    return student.eval()
