"""A model family: what vq4dit needs to know about one transformer class, as data.

A :class:`Family` says where the blocks are, which Linears are quantized by default (and which an
option adds), how the model is conditioned and called on a calibration batch, and which pipeline
loads it. The engine needs nothing else: block-wise targets come from :func:`capture_blocks`'
hooks on the teacher (each block's real positional and keyword inputs), never from a hand-written
block call.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..sampling import sample
from .conditioning import Batch, Conditioning, batch_to

FilterFn = Callable[[nn.Module, str], bool]
ModelInputs = tuple[tuple[Any, ...], dict[str, Any]]
OutputFn = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]  # (model, batch, .sample) -> [B, C_out, H, W]
SampleFn = Callable[..., Any]  # vq4dit.sampling.sample's signature: (model, labels, seeds, config, record, progress, denoiser)


class UnsupportedModelError(TypeError, ValueError):
    """A model of a class no family describes (a ``ValueError`` too: the CLI prints it as one
    ``error:`` line)."""


def as_it_is(model: nn.Module, batch: Any, sample: torch.Tensor) -> torch.Tensor:
    """The default :attr:`Family.output`: a model's ``.sample`` already is ``[B, C_out, H, W]``."""
    return sample


@dataclass(frozen=True)
class Family:
    """One supported transformer class.

    Args:
        name: what messages call it, e.g. ``"PixArt"``.
        model_class: the diffusers class (instances of subclasses belong to the family too).
        pipelines: the diffusers pipeline classes that load it (names), the usual one first.
        conditioning: how its calibration items are conditioned (:mod:`.conditioning`).
        block_lists: attributes holding the ``nn.ModuleList`` s of blocks, concatenated in forward order.
        block_linears: the Linears quantized by default: their names inside a block.
        options: option -> the further Linears (qualified names) it quantizes, e.g.
            ``{"quantize_adaln": ("adaln_single.linear",)}``.
        block_options: option -> the further Linears (names inside every block) it quantizes, e.g.
            ``{"quantize_modulation": ("norm1.linear",)}``.
        default_options: options that are on unless set False (part of the default set).
        inputs: ``(model, batch) -> (args, kwargs)``: the model call on one model batch (conditional
            and unconditional rows alike).
        sampler: how the teacher samples its trajectories (:func:`vq4dit.sampling.sample`'s contract):
            DDPM / DDIM by default, :class:`vq4dit.flow_matching.FlowMatchSampler` for flow matching.
        text_channels: prompt-file key -> the model config field its last dimension must equal
            (text families), e.g. ``{"prompt_embeds": "caption_channels"}``.
        output: ``(model, batch, sample) -> [B, C_out, H, W]``: the model's ``.sample`` in the
            batch's latent layout (Flux unpacks its 2x2 tokens); default: as it is.
    """

    name: str
    model_class: type[nn.Module]
    pipelines: tuple[str, ...]
    conditioning: Conditioning
    block_lists: tuple[str, ...]
    block_linears: tuple[str, ...]
    inputs: Callable[[nn.Module, Batch], ModelInputs]
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    block_options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_options: Mapping[str, bool] = field(default_factory=dict)
    sampler: SampleFn = sample
    text_channels: Mapping[str, str] = field(default_factory=dict)
    output: OutputFn = as_it_is

    def check_sampler_flags(self, **flags: str | None) -> None:
        """Refuse sampler choices (``flag=value``, e.g. ``sampler="ddim"``; None: not set) that this
        family's sampler would silently ignore (flow matching has no DDPM / DDIM choice).

        Raises:
            ValueError: a set flag whose value the family's sampler does not honour."""
        kinds = getattr(self.sampler, "kinds", None)
        if kinds is None:  # DDPM / DDIM: SamplerConfig checks the value
            return
        for flag, value in flags.items():
            if value is not None and value not in kinds:
                raise ValueError(f"--data.{flag} {value} does not apply to {self.name} models: they sample by "
                                 f"{self.sampler.description}; leave --data.{flag} unset")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks of ``model``, in forward order."""
        blocks: list[nn.Module] = []
        for attribute in self.block_lists:
            found = getattr(model, attribute, None)
            if not isinstance(found, nn.ModuleList):
                raise UnsupportedModelError(f"expected a {self.model_class.__name__} with a {attribute!r} block "
                                            f"list, got {type(model).__name__}")
            blocks.extend(found)
        return blocks

    def linear_filter(self, **options: bool) -> FilterFn:
        """``(module, qualified_name) -> bool``: True for the default quantized ``nn.Linear`` s
        (``<block list>.<i>.<block linear>``) and those of the ``options`` set True (a default
        option: unless set False).

        Raises:
            ValueError: an option this family does not have.
        """
        known = (*self.options, *self.block_options)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{self.name} models have no layer option {', '.join(map(repr, unknown))}; "
                             f"options: {', '.join(known) or 'none'}")
        options = {**self.default_options, **options}
        inside = (*self.block_linears, *(n for o, on in options.items() if on for n in self.block_options.get(o, ())))
        lists, linears = (("|".join(map(re.escape, names))) for names in (self.block_lists, inside))
        extra = [re.escape(name) for option, on in options.items() if on for name in self.options.get(option, ())]
        pattern = re.compile("|".join([rf"(?:{lists})\.\d+\.(?:{linears})", *extra]))
        return lambda module, name: isinstance(module, nn.Linear) and pattern.fullmatch(name) is not None

    def forward(self, model: nn.Module, batch: Batch, device: torch.device | str | None = None) -> torch.Tensor:
        """``model``'s output ``.sample`` ``[B, C_out, H, W]`` on one model batch (moved to ``device``
        first when given), in the batch's latent layout (:attr:`output`)."""
        batch = batch if device is None else batch_to(batch, device)
        args, kwargs = self.inputs(model, batch)
        return self.output(model, batch, model(*args, **kwargs).sample)


@contextlib.contextmanager
def capture_blocks(blocks: list[nn.Module], record_inputs: bool = False) -> Iterator[tuple[list, list]]:
    """Record every block's output (and, optionally, its call arguments) during a forward.

    Yields ``(outputs, inputs)``: lists indexed by block; inputs are ``(args, kwargs)`` as the block
    received them (forward pre-hooks with kwargs), so ``block(*args, **kwargs)`` runs it again. The
    hooks are removed when the context exits, whatever happens.
    """
    outputs: list[Any] = [None] * len(blocks)
    inputs: list[Any] = [None] * len(blocks)
    handles = []

    def keep_output(index, _module, _args, output):
        outputs[index] = output

    def keep_input(index, _module, args, kwargs):
        inputs[index] = (args, kwargs)

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_hook(lambda m, a, o, i=index: keep_output(i, m, a, o)))
            if record_inputs:
                handles.append(
                    block.register_forward_pre_hook(lambda m, a, k, i=index: keep_input(i, m, a, k), with_kwargs=True)
                )
        yield outputs, inputs
    finally:
        for handle in handles:
            handle.remove()
