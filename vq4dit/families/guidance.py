"""Sampling any family's model: the guided model output on a fixed conditioning, called as the
family calls its model (:mod:`vq4dit.sampling` holds the schedule and the DiT call)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..sampling import Denoiser, SamplerConfig, combine_guidance
from .base import Family

Condition = torch.Tensor | Mapping[str, torch.Tensor]  # class labels [B], or a text condition (below)


def denoiser(family: Family, model: nn.Module, condition: Mapping[str, torch.Tensor], guidance_scale: float,
             guided_channels: int | None) -> Denoiser:
    """``(x [B, C, H, W], t [B]) -> [B, C_out, H, W]``: ``model``'s output on ``condition`` (a text
    condition: ``prompt_embeds [B, T, C']``, ``prompt_attention_mask [B, T]``,
    ``negative_prompt_embeds [1, T, C']``, ``negative_prompt_attention_mask [1, T]``; pooled families:
    ``pooled_prompt_embeds [B, P]``, ``negative_pooled_prompt_embeds [1, P]``; guidance-distilled
    ones: no negative keys), guided as the family's conditioning guides (:meth:`guided`): against
    its unconditional branch when ``guidance_scale > 1`` (a 2B model batch), or by the scale as an
    input (a B batch)."""
    device = next(model.parameters()).device
    condition = {key: value.to(device) for key, value in condition.items()}

    def output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = family.forward(model, family.conditioning.guided({"x": x, "t": t, **condition}, guidance_scale))
        if out.shape[0] == x.shape[0]:
            return out
        return combine_guidance(out, x.shape[1], guidance_scale, guided_channels)

    return output


def sample_conditioned(family: Family, model: nn.Module, condition: Condition, seeds: list[int],
                       config: SamplerConfig = SamplerConfig(), record_trajectory: bool = False, progress: bool = False):
    """The family's sampler (:func:`vq4dit.sampling.sample` or flow matching) of ``len(seeds)`` samples
    on class labels ``[B]`` or a text condition (:func:`denoiser`): ``x_0 [B, C, H, W]`` (and the
    trajectory when asked)."""
    if torch.is_tensor(condition):
        return family.sampler(model, condition, seeds, config, record_trajectory, progress)
    rows = condition["prompt_embeds"].shape[0]
    if rows != len(seeds):
        raise ValueError(f"need one seed per prompt: {len(seeds)} seeds for {rows} prompts")
    output = denoiser(family, model, condition, config.guidance_scale, config.guided_channels)
    return family.sampler(model, None, seeds, config, record_trajectory, progress, denoiser=output)
