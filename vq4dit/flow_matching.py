"""Rectified-flow sampling (SD3 / SD3.5): the Euler sampler of diffusers' ``FlowMatchEulerDiscreteScheduler``.

Written from the scheduler's equations, static shift only (SD3's scheduler config): training sigmas
``s = i / T`` (i = 1..T) shifted by ``shift s / (1 + (shift - 1) s)``; the ``S`` inference sigmas
are ``linspace(T sigma_max, T sigma_min, S) / T`` shifted once more (as the scheduler does), then a
final 0. The model sees the timestep ``T sigma`` (float) and predicts the velocity ``v``; a step is
``x <- x + (sigma_next - sigma) v``. Classifier-free guidance combines the two branches as
``StableDiffusion3Pipeline`` does: ``v_u + g (v_c - v_u)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .sampling import Denoiser, SamplerConfig, initial_noise


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


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step ``x + (sigma_next - sigma) v`` (float32 sigmas, 0-dim) in float32, returned in
    ``velocity``'s dtype (the scheduler's ``step``): ``[B, C, H, W]``."""
    return (x.float() + (sigma_next - sigma).to(x.device) * velocity).to(velocity.dtype)


@dataclass(frozen=True)
class FlowMatchSampler:
    """The sampler of a flow-matching family: Euler over :func:`flow_schedule` with ``shift``.

    Args:
        shift: the scheduler's static shift (SD3 / SD3.5: 3.0).
    """

    shift: float = 3.0

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
        sigmas, timesteps = flow_schedule(config.num_steps, self.shift, config.train_steps)
        param = next(model.parameters())
        cfg = model.config
        x = initial_noise((cfg.in_channels, cfg.sample_size, cfg.sample_size), seeds, param.device)
        trajectory = []
        from tqdm.auto import tqdm

        for i in tqdm(range(config.num_steps), desc="sampling", disable=not progress, leave=False):
            t = timesteps[i].expand(x.shape[0]).to(x.device)  # [B] float32, the pipeline's t.expand(B)
            if record_trajectory:
                trajectory.append((x.detach().cpu().clone(), t.cpu()))
            x = euler_step(x, denoiser(x, t).float(), sigmas[i], sigmas[i + 1])
        return (x, trajectory) if record_trajectory else x


__all__ = ["FlowMatchSampler", "euler_step", "flow_schedule", "shifted"]
