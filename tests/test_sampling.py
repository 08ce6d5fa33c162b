"""The shared diffusion schedule and sampler (vq4dit.sampling), on the tiny random DiT and stubs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vq4dit import sampling
from vq4dit.models import load_dit
from vq4dit.sampling import (
    NULL_CLASS,
    Diffusion,
    SamplerConfig,
    guided_output,
    linear_betas,
    respaced_timesteps,
    sample,
)


@pytest.fixture(scope="module")
def tiny():
    return load_dit("tiny").eval()


class CallRecorder(nn.Module):
    """Wraps a DiT and records the batch size and labels of every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, x, timestep, class_labels):
        self.calls.append((x.shape[0], class_labels.clone()))
        return self.model(x, timestep=timestep, class_labels=class_labels)


class LabelStub(nn.Module):
    """Output ``[B, 2C, H, W]`` = (channel + 1) for real labels, 0 for the null label."""

    def forward(self, x, timestep, class_labels):
        channels = torch.arange(1, 2 * x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)
        real = (class_labels != NULL_CLASS).to(x.dtype).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(real * channels).expand(x.shape[0], -1, *x.shape[2:]))


# --- schedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_steps, num_steps", [(1000, 50), (1000, 100), (1000, 1000), (1000, 2), (10, 3)])
def test_respaced_timesteps(train_steps, num_steps):
    steps = respaced_timesteps(train_steps, num_steps)
    assert steps.dtype == torch.long and len(steps) == num_steps
    assert steps[0] == 0 and steps[-1] == train_steps - 1
    assert (steps[1:] > steps[:-1]).all()
    assert respaced_timesteps(train_steps, 1).tolist() == [0]  # as the original: one step at t = 0


def _original_space_timesteps(train_steps: int, num_steps: int) -> list[int]:
    """The original DiT rule, re-derived: a float position accumulates the stride, Python round."""
    stride = 1 if num_steps <= 1 else (train_steps - 1) / (num_steps - 1)
    position, taken = 0.0, []
    for _ in range(num_steps):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


def test_respaced_timesteps_match_the_original_for_every_step_count():
    """Exact integers for N = 1..1000 (odd N put the middle step on x.5: float error decides)."""
    mismatched = [
        n for n in range(1, 1001) if respaced_timesteps(1000, n).tolist() != _original_space_timesteps(1000, n)
    ]
    assert mismatched == []
    assert all(respaced_timesteps(10, n).tolist() == _original_space_timesteps(10, n) for n in range(1, 11))
    # the schedules the golden / published runs use
    assert respaced_timesteps(1000, 25).tolist() == [round(i * 999 / 24) for i in range(25)]
    assert respaced_timesteps(1000, 50).tolist() == [round(i * 999 / 49) for i in range(50)]


@pytest.mark.parametrize("num_steps", [1, 2, 21, 25, 45, 250, 999])
def test_respaced_betas_follow_the_original(num_steps):
    """``new_beta = 1 - alpha_bar[t] / alpha_bar[previous kept t]`` over the kept set, in numpy float64."""
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    kept = set(_original_space_timesteps(1000, num_steps))
    last, expected = 1.0, []
    for t, a in enumerate(alpha_bar):
        if t in kept:
            expected.append(1.0 - a / last)
            last = a
    diffusion = Diffusion(num_steps)
    assert diffusion.timesteps.tolist() == sorted(kept)
    np.testing.assert_allclose(diffusion.betas.numpy(), np.array(expected), rtol=1e-10, atol=0)


@pytest.mark.parametrize("num_steps", [1, 7, 50, 1000])
def test_respaced_chain_keeps_alpha_bar(num_steps):
    base = torch.cumprod(1.0 - linear_betas(1000), dim=0)
    diffusion = Diffusion(num_steps)
    assert torch.allclose(diffusion.alpha_bar, base[diffusion.timesteps], rtol=1e-12, atol=0)
    assert torch.allclose(torch.cumprod(1.0 - diffusion.betas, dim=0), diffusion.alpha_bar, rtol=1e-10, atol=0)
    if num_steps == 1000:
        assert torch.allclose(diffusion.betas, linear_betas(1000), rtol=1e-9, atol=0)


def test_q_sample_statistics_and_tensor_steps():
    diffusion = Diffusion(100)
    i = 40
    a = diffusion.alpha_bar[i].item()
    x0 = torch.full((200_000,), 0.5)
    xt = diffusion.q_sample(x0, i, torch.randn_like(x0))
    assert xt.mean().item() == pytest.approx(0.5 * a**0.5, abs=5e-3)
    assert xt.std().item() == pytest.approx((1 - a) ** 0.5, rel=5e-3)
    # a [B] tensor of steps gives per-sample coefficients, equal to the int path
    x0, noise, steps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 40, 99])
    batched = diffusion.q_sample(x0, steps, noise)
    for n, s in enumerate(steps.tolist()):
        assert torch.allclose(batched[n], diffusion.q_sample(x0[n : n + 1], s, noise[n : n + 1])[0], atol=1e-6)


def test_q_posterior_matches_bayes_rule():
    diffusion = Diffusion(1000)
    t = 500
    x0, xt = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.full((1, 1, 1, 1), -0.7, dtype=torch.float64)
    alpha_bar_prev, beta = diffusion.alpha_bar_prev[t], diffusion.betas[t]
    precision = 1 / (1 - alpha_bar_prev) + (1 - beta) / beta
    expected = (alpha_bar_prev.sqrt() * x0 / (1 - alpha_bar_prev) + (1 - beta).sqrt() * xt / beta) / precision
    for step in (t, torch.tensor([t])):
        mean, log_var = diffusion.q_posterior(x0, xt, step)
        assert mean.item() == pytest.approx(expected.item(), rel=1e-9)
        assert log_var.shape == xt.shape and log_var.exp().item() == pytest.approx(1 / precision.item(), rel=1e-9)


@pytest.mark.parametrize("v, table", [(1.0, "log_betas"), (-1.0, "posterior_log_var")])
def test_ddpm_step_learned_variance_endpoints(v, table):
    """Channel C+c is v in [-1, 1]: v = 1 gives variance beta, v = -1 the posterior variance beta~."""
    diffusion = Diffusion(50)
    i = 20
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
    noise = torch.ones_like(x)
    mean, _ = diffusion.q_posterior(diffusion.predict_x0(x, eps, i), x, i)
    step = diffusion.ddpm_step(x, out, i, noise)
    expected_std = torch.exp(0.5 * getattr(diffusion, table)[i]).item()
    assert torch.allclose(step - mean, torch.full_like(x, expected_std), rtol=1e-5)
    assert torch.equal(diffusion.ddpm_step(x, out, 0, noise), diffusion.q_posterior(diffusion.predict_x0(x, eps, 0), x, 0)[0])


@pytest.mark.parametrize("num_steps", [2, 25, 50, 1000])
def test_fixed_variance_without_learned_sigma(num_steps):
    """``out_channels == in_channels``: large = (beta~_1, beta_1, beta_2, ...), small = clipped beta~."""
    large, small = Diffusion(num_steps), Diffusion(num_steps, fixed_variance="small")
    alpha_bar = large.alpha_bar
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta = 1.0 - alpha_bar / alpha_bar_prev
    posterior = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    expected = {
        "large": torch.cat([posterior[1:2], beta[1:]]).log(),
        "small": torch.cat([posterior[1:2], posterior[1:]]).log(),
    }
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for name, diffusion in (("large", large), ("small", small)):
        torch.testing.assert_close(diffusion.fixed_log_var, expected[name], rtol=1e-12, atol=0)
        for i in {0, num_steps // 2, num_steps - 1}:
            _, log_var, _ = diffusion.p_mean_variance(x, eps, i)
            assert torch.allclose(log_var, torch.full_like(x, expected[name][i].item()))
            per_sample = diffusion.p_mean_variance(x, eps, torch.tensor([i, i]))[1]
            assert torch.allclose(per_sample, log_var.to(per_sample.dtype))
            mean = diffusion.q_posterior(diffusion.predict_x0(x, eps, i), x, i)[0]
            step = diffusion.ddpm_step(x, eps, i, torch.ones_like(x))
            std = 0.0 if i == 0 else expected[name][i].exp().sqrt().item()
            torch.testing.assert_close(step, mean + std, rtol=1e-6, atol=1e-6)  # float32 step
    # learned sigma ignores the choice
    out = torch.cat([eps, torch.rand_like(eps) * 2 - 1], dim=1)
    i = num_steps - 1
    assert torch.equal(large.p_mean_variance(x, out, i)[1], small.p_mean_variance(x, out, i)[1])


class FixedVarianceStub(nn.Module):
    """A model without learned sigma (out_channels == in_channels): predicts eps = 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(in_channels=2, out_channels=2, sample_size=4)

    def forward(self, x, timestep, class_labels):
        return SimpleNamespace(sample=torch.zeros_like(x) * self.weight)


def test_sample_uses_the_configured_fixed_variance(monkeypatch):
    made = []
    original = sampling.Diffusion

    def recording(*args):
        made.append(args)
        return original(*args)

    monkeypatch.setattr(sampling, "Diffusion", recording)
    labels, stub = torch.tensor([1, 2]), FixedVarianceStub()
    large = sample(stub, labels, [0, 1], SamplerConfig(num_steps=3, guidance_scale=1.0))
    small = sample(stub, labels, [0, 1], SamplerConfig(num_steps=3, guidance_scale=1.0, fixed_variance="small"))
    assert [args[2] for args in made] == ["large", "small"]
    assert not torch.allclose(large, small)


def test_clip_denoised_clamps_x0():
    diffusion = Diffusion(10)
    x, eps = 5 * torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    out = torch.cat([eps, torch.zeros_like(eps)], dim=1)
    _, _, x0 = diffusion.p_mean_variance(x, out, 5, clip_denoised=True)
    assert x0.abs().max() <= 1.0
    assert diffusion.ddpm_step(x, out, 0, eps, clip_denoised=True).abs().max() <= 1.0
    assert diffusion.ddim_step(x, out, 0, clip_denoised=True).abs().max() <= 1.0 + 1e-6
    assert diffusion.ddim_step(x, out, 0).abs().max() > 1.0


# --- guidance ------------------------------------------------------------------------------------


@torch.no_grad()
def test_guidance_batches(tiny):
    recorder = CallRecorder(tiny)
    labels = torch.tensor([1, 2, 3])
    sample(recorder, labels, [0, 1, 2], SamplerConfig(num_steps=3, guidance_scale=1.0))
    assert [size for size, _ in recorder.calls] == [3, 3, 3]
    assert all(torch.equal(y, labels) for _, y in recorder.calls)
    recorder.calls.clear()
    sample(recorder, labels, [0, 1, 2], SamplerConfig(num_steps=3, guidance_scale=4.0))
    assert [size for size, _ in recorder.calls] == [6, 6, 6]
    assert all(torch.equal(y, torch.tensor([1, 2, 3, NULL_CLASS, NULL_CLASS, NULL_CLASS])) for _, y in recorder.calls)


def test_guided_channels_guides_only_the_leading_channels():
    x, t, labels = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.tensor([0, 5])
    out = guided_output(LabelStub(), x, t, labels, 3.0, guided_channels=2)  # cond = c + 1, uncond = 0
    per_channel = out[0, :, 0, 0].tolist()
    assert per_channel == [3.0, 6.0, 3.0, 4.0, 5.0, 6.0]
    all_channels = guided_output(LabelStub(), x, t, labels, 3.0, guided_channels=None)[0, :, 0, 0].tolist()
    assert all_channels == [3.0, 6.0, 9.0, 4.0, 5.0, 6.0]
    assert guided_output(LabelStub(), x, t, labels, 1.0, None)[0, :, 0, 0].tolist() == [1, 2, 3, 4, 5, 6]


# --- sampling ------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_deterministic_per_seed(tiny, sampler):
    config = SamplerConfig(sampler=sampler, num_steps=4, guidance_scale=2.0)
    labels = torch.tensor([3, 7])
    first = sample(tiny, labels, [11, 12], config)
    assert first.shape == (2, tiny.config.in_channels, tiny.config.sample_size, tiny.config.sample_size)
    assert torch.equal(first, sample(tiny, labels, [11, 12], config))
    assert not torch.allclose(first, sample(tiny, labels, [13, 14], config))
    # a sample depends only on its own seed and label, not on the rest of the batch
    alone = torch.cat([sample(tiny, labels[:1], [11], config), sample(tiny, labels[1:], [12], config)])
    assert (first - alone).abs().max() <= 1e-5 * first.abs().max()  # random weights: large values


@torch.no_grad()
def test_record_trajectory(tiny):
    labels = torch.tensor([0, 1])
    x, trajectory = sample(tiny, labels, [0, 1], SamplerConfig(num_steps=5, guidance_scale=1.0),
                           record_trajectory=True)
    assert len(trajectory) == 5
    times = [int(t[0]) for _, t in trajectory]
    assert times == sorted(times, reverse=True) and len(set(times)) == 5 and times[0] == 999 and times[-1] == 0
    assert all(xt.shape == x.shape and t.shape == (2,) for xt, t in trajectory)
    assert torch.equal(x, sample(tiny, labels, [0, 1], SamplerConfig(num_steps=5, guidance_scale=1.0)))


@pytest.mark.parametrize(
    "kwargs",
    [dict(sampler="euler"), dict(num_steps=0), dict(num_steps=1001), dict(num_steps=20, train_steps=10),
     dict(guidance_scale=0.5), dict(guided_channels=0), dict(fixed_variance="learned")],
)
def test_invalid_sampler_config(kwargs):
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


def test_invalid_fixed_variance_message():
    with pytest.raises(ValueError, match="fixed_variance must be 'large' or 'small'"):
        SamplerConfig(fixed_variance="fixed")
    with pytest.raises(ValueError, match="fixed_variance"):
        Diffusion(10, fixed_variance="medium")


def test_sample_needs_one_seed_per_label(tiny):
    with pytest.raises(ValueError, match="one seed per label"):
        sample(tiny, torch.tensor([1, 2]), [0], SamplerConfig(num_steps=2))
