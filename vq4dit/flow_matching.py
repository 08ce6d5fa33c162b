"""Rectified-flow sampling (SD3 / SD3.5): the Euler sampler of diffusers' ``FlowMatchEulerDiscreteScheduler``.

Written from the scheduler's equations, static shift only (SD3's scheduler config): training sigmas
``s = i / T`` (i = 1..T) shifted by ``shift s / (1 + (shift - 1) s)``; the ``S`` inference sigmas
are ``linspace(T sigma_max, T sigma_min, S) / T`` shifted once more (as the scheduler does), then a
final 0. The model sees the timestep ``T sigma`` (float) and predicts the velocity ``v``; a step is
``x <- x + (sigma_next - sigma) v``. Classifier-free guidance combines the two branches as
``StableDiffusion3Pipeline`` does: ``v_u + g (v_c - v_u)``.

Flux's resolution-dependent schedule (:func:`dynamic_flow_schedule`): ``FluxPipeline``'s sigmas
``linspace(1, 1 / S, S)`` shifted exponentially, ``e^mu / (e^mu + 1 / s - 1)``, with ``mu`` linear in
the image's token count (:func:`image_seq_shift`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import math

import numpy as np
import torch
from torch import nn

from .sampling import Denoiser, SamplerConfig, initial_noise

SCHEDULER_SHIFT_KEY = "_scheduler_shift"
"""Model-config entry of its pipeline's ``scheduler_config.json`` ``shift``, recorded when a folder
is loaded (:func:`vq4dit.models.load_dit`; a ``_`` key: diffusers keeps it silently and packed saves
carry it)."""


def shifted(sigmas: np.ndarray | torch.Tensor, shift: float):
    """SD3's static time shift ``shift s / (1 + (shift - 1) s)`` (same type as ``sigmas``)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_schedule(num_steps: int, shift: float, train_steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas [S + 1], timesteps [S])`` float32 of ``S = num_steps`` Euler steps, noisiest first,
    ``sigmas[-1] = 0``: the values ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(S)`` holds."""
    training = shifted(torch.from_numpy(np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1].copy())
                       / train_steps, shift)  # [T] float32, as the scheduler's __init__
    sigma_max, sigma_min = training[0].item(), training[-1].item()
    sigmas = shifted(np.linspace(sigma_max * train_steps, sigma_min * train_steps, num_steps) / train_steps, shift)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)]), sigmas * train_steps


def image_seq_shift(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """``mu`` of an image of ``seq_len`` tokens: linear from ``base_shift`` at ``base_seq_len`` to
    ``max_shift`` at ``max_seq_len`` (``FluxPipeline``'s ``calculate_shift``, scheduler defaults)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * slope + base_shift - slope * base_seq_len


def dynamic_flow_schedule(num_steps: int, mu: float | None, shift: float = 1.0,
                          train_steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas [S + 1], timesteps [S])`` float32 of ``FluxPipeline``'s ``S = num_steps`` Euler steps:
    ``linspace(1, 1 / S, S)`` shifted by ``e^mu / (e^mu + 1 / s - 1)`` (dynamic shifting, FLUX.1-dev's
    scheduler), or statically by ``shift`` when ``mu`` is None (FLUX.1-schnell: shift 1)."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    sigmas = shifted(sigmas, shift) if mu is None else math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)]), sigmas * train_steps


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step ``x + (sigma_next - sigma) v`` (float32 sigmas, 0-dim) in float32, returned in
    ``velocity``'s dtype (the scheduler's ``step``): ``[B, C, H, W]``."""
    return (x.float() + (sigma_next - sigma).to(x.device) * velocity).to(velocity.dtype)


@dataclass(frozen=True)
class FlowMatchSampler:
    """The sampler of a flow-matching family: Euler over :func:`flow_schedule` with ``shift``.

    Args:
        shift: the scheduler's static shift when the model records none (``SCHEDULER_SHIFT_KEY``
            in its config, from its pipeline's scheduler config); SD3 / SD3.5: 3.0.
    """

    shift: float = 3.0
    kinds: ClassVar[tuple[str, ...]] = ()  # the ``--data.sampler`` values it honours: none
    description: ClassVar[str] = "flow matching (Euler steps, as the family's pipeline)"

    def latent_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample's latents: the model config's ``in_channels`` and ``sample_size``."""
        return model.config.in_channels, model.config.sample_size, model.config.sample_size

    def schedule(self, model: nn.Module, num_steps: int, train_steps: int,
                 shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas [S + 1], timesteps [S])`` for ``model``'s latents of ``shape``: :func:`flow_schedule`
        with the model's recorded shift, else ``shift``."""
        return flow_schedule(num_steps, self.shift_of(model), train_steps)

    def shift_of(self, model: nn.Module) -> float:
        """The static shift ``model`` is sampled with: its config's ``SCHEDULER_SHIFT_KEY`` (its
        pipeline's scheduler), else ``shift``."""
        config = getattr(model, "config", None)
        recorded = config.get(SCHEDULER_SHIFT_KEY) if config is not None else None
        return self.shift if recorded is None else float(recorded)

    @torch.no_grad()
    def __call__(self, model: nn.Module, labels: torch.Tensor | None, seeds: list[int],
                 config: SamplerConfig = SamplerConfig(), record_trajectory: bool = False, progress: bool = False,
                 denoiser: Denoiser | None = None):
        """:func:`vq4dit.sampling.sample`'s contract with flow matching: ``x_0 [B, C, H, W]`` of
        ``len(seeds)`` samples (and the trajectory ``[(x_t [B, C, H, W], t [B] float32)]`` when asked);
        ``config.num_steps`` steps out of ``config.train_steps``, guided by ``denoiser`` (the model
        on its condition, :mod:`vq4dit.families.guidance`); ``config.sampler`` does not apply."""
        if denoiser is None:
            raise ValueError("flow-matching models are text-conditioned: sample them with a denoiser (a condition)")
        shape = self.latent_shape(model)
        sigmas, timesteps = self.schedule(model, config.num_steps, config.train_steps, shape)
        x = initial_noise(shape, seeds, next(model.parameters()).device)
        trajectory = []
        from tqdm.auto import tqdm

        for i in tqdm(range(config.num_steps), desc="sampling", disable=not progress, leave=False):
            t = timesteps[i].expand(x.shape[0]).to(x.device)  # [B] float32, the pipeline's t.expand(B)
            if record_trajectory:
                trajectory.append((x.detach().cpu().clone(), t.cpu()))
            x = euler_step(x, denoiser(x, t).float(), sigmas[i], sigmas[i + 1])
        return (x, trajectory) if record_trajectory else x


__all__ = ["SCHEDULER_SHIFT_KEY", "FlowMatchSampler", "dynamic_flow_schedule", "euler_step", "flow_schedule", "image_seq_shift", "shifted"]
