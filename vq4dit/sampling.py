"""Diffusion sampling for FP or quantized DiTs: DDPM with learned variance (original DiT) and DDIM.

The schedule follows the original DiT / improved-DDPM setup, written from the equations:
linear betas over 1000 training steps, respaced to ``num_steps`` evenly spaced timesteps
(betas recomputed so the respaced chain has the same alpha-bar values), a learned-range variance
``log var = f * log beta_t + (1 - f) * log beta~_t`` with ``f = (v + 1) / 2`` taken from the
model's second half of output channels (channel ``C + c`` = ``v`` in [-1, 1] for channel ``c``).
Models without variance channels (``out_channels == in_channels``) get a fixed variance: "large"
(``beta_t``, with step 0's entry replaced by the posterior variance of step 1; the original DiT's
default for ``learn_sigma=False``) or "small" (the clipped posterior variance ``beta~_t``).
``clip_denoised`` clamps the predicted ``x_0`` to [-1, 1] (pixel-space models such as the digits
reference model; DiT latents use False, as the original DiT).

The same :class:`Diffusion` serves training: its methods accept a respaced step ``i`` either as an
``int`` (one step for the whole batch) or as a ``[B]`` long tensor (one step per sample);
``Diffusion(T, T)`` is the full training chain (step index = model timestep).

Classifier-free guidance evaluates the model on ``[x; x]`` with ``[y; null]`` labels and guides the
first ``guided_channels`` channels of the noise prediction (the original DiT guides 3 of the 4
latent channels "for exact reproducibility"; ``None`` guides all of them as diffusers does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

NULL_CLASS = 1000  # the DiT label table's extra row used for classifier-free guidance


@dataclass
class SamplerConfig:
    """How to sample.

    Args:
        sampler: ``ddpm`` (ancestral, learned variance, as the original DiT) or ``ddim`` (eta 0).
        num_steps: respaced sampling steps (out of ``train_steps``).
        guidance_scale: classifier-free guidance scale; 1 disables guidance (no null batch).
        guided_channels: leading noise channels that get guidance (original DiT: 3); None = all.
        train_steps: length of the training schedule (1000 for DiT).
        clip_denoised: clamp the predicted ``x_0`` to [-1, 1] in every step (pixel-space models).
        fixed_variance: variance of models without learned sigma (``out_channels == in_channels``):
            ``large`` (beta, the original DiT's default) or ``small`` (posterior beta~). Models with
            learned sigma ignore it.
    """

    sampler: Literal["ddpm", "ddim"] = "ddpm"
    num_steps: int = 50
    guidance_scale: float = 1.5
    guided_channels: int | None = None
    train_steps: int = 1000
    clip_denoised: bool = False
    fixed_variance: Literal["large", "small"] = "large"

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if not 1 <= self.num_steps <= self.train_steps:
            raise ValueError(f"num_steps must be in [1, {self.train_steps}], got {self.num_steps}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.guided_channels is not None and self.guided_channels < 1:
            raise ValueError(f"guided_channels must be >= 1 or None, got {self.guided_channels}")
        if self.fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {self.fixed_variance!r}")


def linear_betas(train_steps: int = 1000) -> torch.Tensor:
    """DiT's linear schedule, scaled for ``train_steps``: ``[T]`` float64."""
    scale = 1000.0 / train_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, train_steps, dtype=torch.float64)


def respaced_timesteps(train_steps: int, num_steps: int) -> torch.Tensor:
    """The ``num_steps`` training timesteps kept by respacing, ascending: ``[S]`` long.

    Reproduces the original DiT's ``space_timesteps(train_steps, [num_steps])`` exactly: a float
    position advances by ``(T - 1) / (S - 1)`` per step (accumulated, not multiplied) and each is
    rounded with Python's ``round`` (half to even), so odd ``S`` whose middle step lands on ``x.5``
    agree with the original to the last integer. ``S = 1`` keeps ``t = 0``; ``S = T`` keeps all.
    """
    stride = (train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    kept, position = set(), 0.0
    for _ in range(num_steps):
        kept.add(round(position))
        position += stride
    return torch.tensor(sorted(kept), dtype=torch.long)


Step = int | torch.Tensor  # a respaced step index: int, or ``[B]`` long tensor (one per sample)


class Diffusion:
    """A (respaced) Gaussian diffusion: the coefficients of one sampling chain.

    All tables are float64 ``[S]`` on the CPU, indexed by the respaced step ``i`` (0 = cleanest);
    ``timesteps[i]`` is the model timestep of step ``i``. Methods take ``i`` as an ``int`` or a ``[B]``
    long tensor and tensors ``x [B, C, ...]``.
    """

    def __init__(
        self, num_steps: int = 50, train_steps: int = 1000, fixed_variance: Literal["large", "small"] = "large"
    ) -> None:
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        base_alpha_bar = torch.cumprod(1.0 - linear_betas(train_steps), dim=0)
        self.timesteps = respaced_timesteps(train_steps, num_steps)  # original t of each step
        alpha_bar = base_alpha_bar[self.timesteps]
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.betas = 1.0 - alpha_bar / alpha_bar_prev
        self.log_betas = self.betas.log()
        self.alpha_bar = alpha_bar
        self.alpha_bar_prev = alpha_bar_prev
        self.sqrt_alpha_bar = alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar = (1.0 / alpha_bar).sqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / alpha_bar - 1.0).sqrt()
        self.posterior_var = self.betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # log(0) at step 0 is replaced by the next value, as in improved DDPM
        clipped = torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]) if num_steps > 1 else self.betas
        self.posterior_log_var = torch.log(clipped)
        # variance of models without learned sigma; step 0's beta replaced by beta~_1 for "large"
        if fixed_variance == "small":
            self.fixed_log_var = self.posterior_log_var
        else:
            large = torch.cat([self.posterior_var[1:2], self.betas[1:]]) if num_steps > 1 else self.betas
            self.fixed_log_var = torch.log(large)
        self.fixed_variance = fixed_variance
        self.coef_x0 = self.betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
        self.coef_xt = (1.0 - alpha_bar_prev) * (1.0 - self.betas).sqrt() / (1.0 - alpha_bar)

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    @staticmethod
    def _at(table: torch.Tensor, i: Step, like: torch.Tensor) -> float | torch.Tensor:
        """``table[i]``: a float for an int ``i``, else ``[B, 1, ..., 1]`` in ``like``'s dtype/device."""
        if not torch.is_tensor(i) or i.ndim == 0:
            return table[int(i)].item()
        return table.to(i.device)[i].to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.ndim - 1))

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: Step) -> torch.Tensor:
        """``x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``: ``[B, C, ...]``."""
        return x * self._at(self.sqrt_recip_alpha_bar, i, x) - eps * self._at(self.sqrt_recipm1_alpha_bar, i, x)

    def q_sample(self, x0: torch.Tensor, i: Step, noise: torch.Tensor) -> torch.Tensor:
        """Forward process at respaced step ``i``: ``sqrt(a) x0 + sqrt(1 - a) noise``."""
        return x0 * self._at(self.sqrt_alpha_bar, i, x0) + noise * self._at(self.sqrt_one_minus_alpha_bar, i, x0)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, i: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of ``q(x_{i-1} | x_i, x_0)``, both shaped like ``xt``."""
        mean = x0 * self._at(self.coef_x0, i, xt) + xt * self._at(self.coef_xt, i, xt)
        log_var = self._at(self.posterior_log_var, i, xt)
        if isinstance(log_var, float):
            return mean, torch.full_like(xt, log_var)
        return mean, log_var.expand_as(xt)

    def learned_log_var(self, v: torch.Tensor, i: Step) -> torch.Tensor:
        """``log var = f log beta + (1 - f) log beta~`` with ``f = (v + 1) / 2``, ``v`` in [-1, 1]."""
        frac = (v + 1.0) / 2.0
        return frac * self._at(self.log_betas, i, v) + (1.0 - frac) * self._at(self.posterior_log_var, i, v)

    def p_mean_variance(
        self, x: torch.Tensor, model_out: torch.Tensor, i: Step, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reverse step ``p(x_{i-1} | x_i)`` from ``model_out [B, 2C or C, ...]`` = (eps[, v]).

        Returns ``(mean, log_var, x0_pred)``, each shaped like ``x``; without ``v`` channels the
        variance is the fixed one chosen at construction (``fixed_log_var``: large or small).
        """
        channels = x.shape[1]
        eps, v = model_out[:, :channels], model_out[:, channels:]
        x0 = self.predict_x0(x, eps, i)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x0, x, i)
        if v.shape[1] == 0:
            fixed = self._at(self.fixed_log_var, i, x)
            log_var = torch.full_like(x, fixed) if isinstance(fixed, float) else fixed.expand_as(x)
        else:
            log_var = self.learned_log_var(v.float(), i)
        return mean, log_var, x0

    def ddpm_step(
        self, x: torch.Tensor, model_out: torch.Tensor, i: int, noise: torch.Tensor, clip_denoised: bool = False
    ) -> torch.Tensor:
        """One ancestral step; ``model_out [B, 2C, ...]`` = (eps, v) (learned range) or ``[B, C, ...]`` (fixed)."""
        mean, log_var, _ = self.p_mean_variance(x, model_out, i, clip_denoised)
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * log_var).to(x.dtype) * noise

    def ddim_step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, clip_denoised: bool = False) -> torch.Tensor:
        """One deterministic DDIM step (eta = 0); with ``clip_denoised`` eps is re-derived from the clamped x0."""
        eps = model_out[:, : x.shape[1]]
        x0 = self.predict_x0(x, eps, i)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x * self._at(self.sqrt_recip_alpha_bar, i, x) - x0) / self._at(self.sqrt_recipm1_alpha_bar, i, x)
        a_prev = self.alpha_bar_prev[i]
        return x0 * a_prev.sqrt().item() + eps * (1.0 - a_prev).sqrt().item()


def combine_guidance(both: torch.Tensor, channels: int, guidance_scale: float, guided_channels: int | None) -> torch.Tensor:
    """Classifier-free guidance of a doubled model output ``both [2B, C_out, H, W]`` (conditional
    rows first, then unconditional) on the leading ``guided_channels`` (None: all ``channels``)
    noise channels: ``[B, C_out, H, W]``; the rest (learned variance) is the conditional row's."""
    cond, uncond = both.chunk(2)
    channels = channels if guided_channels is None else min(guided_channels, channels)
    guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def guided_output(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    guidance_scale: float,
    guided_channels: int | None,
) -> torch.Tensor:
    """Model output for ``x [B, C, H, W]`` with classifier-free guidance: ``[B, C_out, H, W]``."""
    if guidance_scale == 1.0:
        return model(x, timestep=t, class_labels=labels).sample
    null = torch.full_like(labels, NULL_CLASS)
    both = model(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
    return combine_guidance(both, x.shape[1], guidance_scale, guided_channels)


# ``(x [B, C, H, W], t [B]) -> [B, C_out, H, W]``: a model's guided output on a fixed conditioning
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(shape: tuple[int, ...], seeds: list[int], device, dtype=torch.float32) -> torch.Tensor:
    """One CPU generator per sample: the noise of a sample depends only on its seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: torch.Tensor | None,
    seeds: list[int],
    config: SamplerConfig = SamplerConfig(),
    record_trajectory: bool = False,
    progress: bool = False,
    denoiser: Denoiser | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Generate ``len(seeds)`` samples (model space: latents or pixels).

    Args:
        model: a diffusers-style DiT: ``model(x, timestep=t, class_labels=y).sample``.
        labels: ``[B]`` class ids (None with a ``denoiser``).
        seeds: one seed per sample; the initial noise and every step's noise derive from it, so
            FP and quantized models get identical noise.
        config: sampler settings.
        record_trajectory: also return the list of model inputs ``(x_t [B, C, H, W], t [B])``.
        progress: show a progress bar over steps.
        denoiser: the guided model output on another conditioning (text prompts:
            :func:`vq4dit.families.guidance.sample_conditioned`); None: ``model`` on ``labels``.

    Returns:
        ``x_0 [B, C, H, W]`` (and the trajectory when asked).
    """
    if denoiser is None and len(seeds) != labels.numel():
        raise ValueError(f"need one seed per label: {len(seeds)} seeds for {labels.numel()} labels")
    diffusion = Diffusion(config.num_steps, config.train_steps, config.fixed_variance)
    param = next(model.parameters())
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = initial_noise(shape, seeds, param.device)
    labels = labels.to(param.device) if denoiser is None else None
    step_generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    trajectory = []
    from tqdm.auto import tqdm

    for i in tqdm(range(diffusion.num_steps - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), int(diffusion.timesteps[i]), device=x.device, dtype=torch.long)
        if record_trajectory:
            trajectory.append((x.detach().cpu().clone(), t.cpu()))
        if denoiser is None:
            out = guided_output(model, x, t, labels, config.guidance_scale, config.guided_channels).float()
        else:
            out = denoiser(x, t).float()
        if config.sampler == "ddim":
            x = diffusion.ddim_step(x, out, i, config.clip_denoised)
        else:
            noise = torch.stack([torch.randn(shape, generator=g) for g in step_generators]).to(x.device)
            x = diffusion.ddpm_step(x, out, i, noise, config.clip_denoised)
    return (x, trajectory) if record_trajectory else x
