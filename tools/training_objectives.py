"""What the shared training loop (:mod:`tools.diffusion_training`) optimizes: an :class:`Objective`
noises a clean batch and scores the model's output.

:class:`DDPMObjective`: the training-only math of improved DDPM (Nichol & Dhariwal 2021: the hybrid
loss with its Gaussian KL and discretized decoder likelihood; the schedule, forward process and
posterior are :class:`vq4dit.sampling.Diffusion`'s). :class:`FlowMatchingObjective`: rectified flow
as SD3 trains it (the MMDiT reference).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from vq4dit.sampling import Diffusion


class Objective(Protocol):
    """What the loop trains: how a clean batch is noised and how the model's output is scored."""

    def noisy(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``(x_t [B, C, H, W], model timesteps [B], state)`` of ``x0 [B, C, H, W]`` (draws from ``generator``)."""

    def losses(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, state: tuple) -> dict[str, torch.Tensor]:
        """Per-sample loss terms ``{name: [B]}`` of ``output``; the training loss is their summed mean."""


# ---------------------------------------------------------------------------------------------
# Training-only diffusion math (the schedule and posterior are vq4dit.sampling.Diffusion's)
# ---------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of data in [-1, 1] on 256 bins under ``N(mean, e^(2 log_scale))``.

    The end bins extend to -inf / +inf (DDPM's decoder ``L_0``).
    """
    inv_std = (-log_scale).exp()
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= x + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X >= x - 1/255)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, bin_mass.log()))


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def hybrid_loss(
    diffusion: Diffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(L_simple, L_vlb)`` ``[B]`` of improved DDPM as used by DiT (total loss = their sum).

    ``model_output [B, 2C, H, W]`` = (eps, v); ``t [B]`` are step indices of ``diffusion``.
    ``L_simple = mean (eps - eps_pred)^2``. ``L_vlb`` is the bound term ``L_t`` in bits per pixel:
    ``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))`` for t > 0, the decoder NLL for t = 0, computed with a
    stop-gradient on the predicted mean so it trains only the variance. Sampling t uniformly makes
    ``E[L_t] = L_vlb / T``, i.e. the paper's ``lambda = 0.001`` at T = 1000.
    """
    channels = x0.shape[1]
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"expected {2 * channels} output channels (eps, v), got {model_output.shape[1]}")
    eps_pred = model_output[:, :channels]
    mse = _mean_over_pixels((noise - eps_pred) ** 2)
    frozen = torch.cat([eps_pred.detach(), model_output[:, channels:]], dim=1)
    mean, log_variance, _ = diffusion.p_mean_variance(xt, frozen, t, clip_denoised=False)
    true_mean, true_log_variance = diffusion.q_posterior(x0, xt, t)
    kl = _mean_over_pixels(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
    nll = -_mean_over_pixels(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
    return mse, torch.where(t == 0, nll, kl)


class DDPMObjective:
    """Improved DDPM on ``num_timesteps`` linear betas: uniform step ``t``, then the noise; the
    hybrid loss ``{mse, vb}`` (the model outputs ``[B, 2C, H, W]`` = eps and the variance)."""

    def __init__(self, num_timesteps: int = 1000) -> None:
        self.diffusion = Diffusion(num_timesteps, num_timesteps)  # full chain: step index = timestep

    def noisy(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``(x_t, timesteps [B], (t, noise))`` of ``x0 [B, C, H, W]``."""
        t = torch.randint(0, self.diffusion.num_steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return self.diffusion.q_sample(x0, t, noise), self.diffusion.timesteps[t], (t, noise)

    def losses(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, state: tuple) -> dict[str, torch.Tensor]:
        """``{mse [B], vb [B]}`` of :func:`hybrid_loss`."""
        mse, vb = hybrid_loss(self.diffusion, output, x0, xt, *state)
        return {"mse": mse, "vb": vb}


class FlowMatchingObjective:
    """Rectified flow as SD3 trains it: ``x_s = (1 - s) x0 + s noise``, the model sees the timestep
    ``s * train_steps`` (what ``StableDiffusion3Pipeline`` feeds) and predicts the velocity
    ``noise - x0`` (``[B, C, H, W]``); ``s`` logit-normal (``sigmoid(N(0, 1))``, SD3's default) or uniform."""

    def __init__(self, sampling: str = "logit_normal", train_steps: int = 1000) -> None:
        if sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"sampling must be logit_normal or uniform, got {sampling!r}")
        self.sampling, self.train_steps = sampling, train_steps

    def noisy(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``(x_s, timesteps s * train_steps [B], (noise,))`` of ``x0 [B, C, H, W]``."""
        draw = torch.randn if self.sampling == "logit_normal" else torch.rand
        s = draw(x0.shape[0], generator=generator)
        s = torch.sigmoid(s) if self.sampling == "logit_normal" else s
        noise = torch.randn(x0.shape, generator=generator)
        sb = s.view(-1, *[1] * (x0.ndim - 1))
        return (1 - sb) * x0 + sb * noise, s * self.train_steps, (noise,)

    def losses(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, state: tuple) -> dict[str, torch.Tensor]:
        """``{mse [B]}``: the velocity error ``mean (noise - x0 - output)^2``."""
        if output.shape != x0.shape:
            raise ValueError(f"expected a velocity of shape {tuple(x0.shape)}, got {tuple(output.shape)}")
        return {"mse": _mean_over_pixels((state[0] - x0 - output) ** 2)}
