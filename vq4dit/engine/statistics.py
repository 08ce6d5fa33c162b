"""Activation statistics of the teacher on calibration items (for activation-aware codebooks)."""

from __future__ import annotations

from typing import Callable, Container, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..families import Batch, call_model, conditioning_of
from ..layers import InputMoments
from .window_inputs import StopForward


def statistics_batches(items: dict[str, torch.Tensor], guidance_scale: float, batch_size: int = 8,
                       max_items: int = 1024) -> list[Batch]:
    """Model batches over at most ``max_items`` calibration items (evenly strided over all
    trajectories and timesteps), with unconditional copies when ``guidance_scale > 1``."""
    return item_batches(items, strided_items(items["t"].numel(), max_items), guidance_scale, batch_size)


def strided_items(count: int, max_items: int) -> torch.Tensor:
    """At most ``max_items`` indices ``[M]`` evenly strided over ``0 .. count-1`` (CPU, int64)."""
    # explicit CPU: Lightning's configure_model runs under ``with torch.device(accelerator)``
    return torch.linspace(0, count - 1, min(count, max_items), device="cpu").round().long().unique()


def item_batches(items: dict[str, torch.Tensor], index: torch.Tensor, guidance_scale: float,
                 batch_size: int = 8) -> list[Batch]:
    """Model batches of the items ``index [M]`` (class labels: ``(x, t, y)`` tuples; text: dicts),
    guided as the conditioning guides: with the unconditional copies (null label, negative prompt)
    when ``guidance_scale > 1``; a guidance-distilled model's with the scale as an input."""
    conditioning = conditioning_of(items)
    return [conditioning.guided(conditioning.batch(items, chunk), guidance_scale) for chunk in index.split(batch_size)]


def _stop(_module, _args, _output) -> None:
    raise StopForward


@torch.no_grad()
def input_second_moments(model: nn.Module, names: Iterable[str], batches, full: Container[str] = (),
                         on_batch: Callable[[], object] | None = None,
                         stop_after: nn.Module | None = None,
                         forward: Callable[[Batch], object] | None = None) -> dict[str, InputMoments]:
    """The input second moments of ``model``'s Linear layers ``names`` over model ``batches``
    (every token of every item counts once): ``E[x_j^2]``
    ``[in]``, and for the layers in ``full`` also the whole ``E[x x^T]`` ``[in, in]`` (error feedback).
    ``on_batch`` is called after every batch (a progress bar); ``stop_after``: a module after whose
    forward the model's forward stops (every layer of ``names`` runs before it); ``forward``: how a
    batch runs (default: the model on it; the windowed build's runs from recorded block inputs)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name in names:
        def record(_module, args, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            moment = x.t() @ x if name in full else x.pow(2).sum(0)
            sums[name] = sums[name] + moment if name in sums else moment
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    if stop_after is not None:
        hooks.append(stop_after.register_forward_hook(_stop))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            try:
                call_model(model, batch, device) if forward is None else forward(batch)
            except StopForward:
                pass
            if on_batch is not None:
                on_batch()
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in names if name not in counts]
    if missing:
        raise ValueError(f"no input reached {missing[:3]} while collecting activation statistics")
    if dist.is_available() and dist.is_initialized():  # every DDP rank must build the same codebooks
        for name in sums:
            total = torch.cat([sums[name].flatten(), torch.tensor([float(counts[name])], device=sums[name].device)])
            dist.all_reduce(total)
            sums[name], counts[name] = total[:-1].view_as(sums[name]), total[-1].item()
    return {name: InputMoments.from_full((sums[name] / counts[name]).cpu()) if name in full
            else InputMoments(diagonal=(sums[name] / counts[name]).cpu()) for name in sums}
