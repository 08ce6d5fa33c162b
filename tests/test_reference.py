"""The shipped reference DiT and digits classifier, and the training math (schedule: vq4dit.sampling)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vq4dit.reference import (
    ASSETS_DIR,
    NULL_CLASS,
    DigitsClassifier,
    classifier_accuracy,
    digits_dataset,
    digits_split,
    load_reference_classifier,
    load_reference_model,
    sample_class_accuracy,
)
from tools.train_reference import (
    ClassifierConfig,
    ReferenceConfig,
    hybrid_loss,
    random_shift,
    train_classifier,
    train_transformer,
)
from vq4dit.sampling import Diffusion, SamplerConfig, guided_output, sample


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(16)


@pytest.fixture(scope="module")
def reference_model():
    return load_reference_model()


def _tiny_config(**overrides) -> ReferenceConfig:
    settings = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, train_steps=1, batch_size=4,
                    warmup_steps=1, ema_start=1)
    settings.update(overrides)
    return ReferenceConfig(**settings)


# --- data ----------------------------------------------------------------------------------------


def test_digits_dataset_shape_and_range(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() == -1.0 and images.max() > 0.9
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))


def test_digits_split_is_stratified_disjoint_and_deterministic(digits):
    _, labels = digits
    train, test = digits_split(labels, 0.2, seed=0)
    again_train, again_test = digits_split(labels, 0.2, seed=0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert len(train) + len(test) == len(labels)
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.bincount(labels[test], minlength=10).min() >= 30


def test_random_shift_translates_with_background_fill():
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16) / 512.0
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift(images, 0, generator), images)
    shifted = random_shift(images, 1, generator)
    assert shifted.shape == images.shape
    for original, moved in zip(images[:, 0], shifted[:, 0]):
        padded = torch.nn.functional.pad(original, (1, 1, 1, 1), value=-1.0)
        windows = [padded[dy : dy + 16, dx : dx + 16] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(moved, window) for window in windows)


# --- diffusion math ------------------------------------------------------------------------------


def test_training_chain_is_the_full_linear_schedule():
    diffusion = Diffusion(1000, 1000)  # what train_transformer uses: step index = model timestep
    assert torch.equal(diffusion.timesteps, torch.arange(1000))
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)


def test_hybrid_loss_is_finite_and_vb_only_trains_the_variance():
    diffusion = Diffusion(1000, 1000)
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    xt = diffusion.q_sample(x0, t, noise)
    output = torch.randn(6, 2, 4, 4, requires_grad=True)
    mse, vb = hybrid_loss(diffusion, output, x0, xt, t, noise)
    assert mse.shape == vb.shape == (6,)
    assert torch.isfinite(mse).all() and torch.isfinite(vb).all() and (vb[1:] >= 0).all()
    (gradient,) = torch.autograd.grad(vb.sum(), output)
    assert gradient[:, 0].abs().max() == 0 and gradient[:, 1].abs().max() > 0


# --- shipped artefacts ---------------------------------------------------------------------------


def test_shipped_model_is_a_learned_sigma_dit_with_null_class(reference_model):
    config = reference_model.config
    assert (config.in_channels, config.out_channels, config.sample_size, config.patch_size) == (1, 2, 16, 2)
    assert config.norm_type == "ada_norm_zero" and config.num_embeds_ada_norm == 1000
    assert not reference_model.training
    table = reference_model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NULL_CLASS + 1
    info = json.loads((ASSETS_DIR / "training.json").read_text())
    assert info["dit"]["config"]["num_layers"] == config.num_layers


def test_shipped_classifier_accuracy_on_held_out_digits(digits):
    images, labels = digits
    classifier = load_reference_classifier()
    training = json.loads((ASSETS_DIR / "classifier.json").read_text())["training"]
    _, test = digits_split(labels, training["test_fraction"], training["split_seed"])
    assert classifier_accuracy(classifier, images[test], labels[test]) >= 0.95
    assert classifier.features(images[:4]).shape == (4, classifier.feature_dim)


@torch.no_grad()
def test_shipped_model_predicts_noise(digits, reference_model):
    images, labels = digits
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(images), generator=generator)[:64]
    x0, y = images[index], labels[index]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.full((64,), 500)
    xt = Diffusion(1000, 1000).q_sample(x0, t, noise)
    output = reference_model(xt, timestep=t, class_labels=y).sample
    mse = (output[:, :1] - noise).pow(2).mean().item()
    assert mse < 0.1  # predicting 0 gives ~1; the shipped model reaches ~0.01
    v = output[:, 1:]
    assert v.abs().max() < 3.0  # the variance interpolation value stays near its [-1, 1] range


@torch.no_grad()
def test_guided_output_and_samplers_run(reference_model):
    labels = torch.tensor([3, 7])
    x = torch.randn(2, 1, 16, 16)
    timesteps = torch.full((2,), 999)
    conditional = reference_model(x, timestep=timesteps, class_labels=labels).sample
    assert torch.allclose(guided_output(reference_model, x, timesteps, labels, 1.0, None), conditional)
    guided = guided_output(reference_model, x, timesteps, labels, 4.0, None)
    assert torch.allclose(guided[:, 1:], conditional[:, 1:], atol=1e-5)
    for method in ("ddpm", "ddim"):
        config = SamplerConfig(sampler=method, num_steps=3, guidance_scale=2.0, clip_denoised=True)
        images = sample(reference_model, labels, [0, 1], config)
        assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1.0 + 1e-6


@torch.no_grad()
def test_shipped_model_samples_the_requested_digits(reference_model):
    """The learned-variance convention of vq4dit.sampling matches training: guided samples are the digits asked for."""
    accuracy, images = sample_class_accuracy(reference_model, load_reference_classifier(), per_class=2,
                                             num_steps=25, guidance_scale=4.0)
    assert images.shape == (20, 1, 16, 16) and accuracy >= 0.8


# --- training code (smoke runs on tiny configs) ----------------------------------------------------


def test_train_transformer_one_step_smoke(digits):
    images, labels = digits
    model, stats = train_transformer(_tiny_config(), images[:16], labels[:16], progress=False)
    assert not model.training and math.isfinite(stats["final_loss"])
    assert stats["final_loss"] == pytest.approx(stats["final_mse"] + stats["final_vb"], rel=1e-5)
    assert all(e.class_embedder.dropout_prob == 0.0 for e in (b.norm1.emb for b in model.transformer_blocks))
    with torch.no_grad():
        output = model(images[:2], timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, NULL_CLASS])).sample
    assert output.shape == (2, 2, 16, 16)


def test_train_transformer_rejects_wrong_image_size(digits):
    images, labels = digits
    with pytest.raises(ValueError, match="sample_size"):
        train_transformer(_tiny_config(sample_size=8), images[:4], labels[:4], progress=False)


def test_train_classifier_smoke(digits):
    images, labels = digits
    classifier, stats = train_classifier(ClassifierConfig(channels=4, feature_dim=8, epochs=1), images[:200],
                                         labels[:200], progress=False)
    assert isinstance(classifier, DigitsClassifier) and not classifier.training
    assert 0.0 <= stats["test_accuracy"] <= 1.0 and stats["num_train"] + stats["num_test"] == 200


_KILLED_TRAINING = """
import sys, torch
torch.set_num_threads(1)
from tools.train_reference import train_transformer
from tests.test_reference import _resume_config
from vq4dit.reference import digits_dataset
images, labels = digits_dataset(16)
train_transformer(_resume_config(), images[:64], labels[:64], progress=False, checkpoint=sys.argv[1])
"""


def _resume_config() -> ReferenceConfig:
    return _tiny_config(train_steps=400, ema_start=2, warmup_steps=2)


def test_training_killed_with_sigkill_resumes_to_the_same_weights(digits, tmp_path):
    """The shared loop's checkpoint (tools/diffusion_training.py): a run killed with SIGKILL mid-way
    and started again ends bit-identical to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    images, labels = digits
    checkpoint = tmp_path / "training.ckpt"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINING, str(checkpoint)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert checkpoint.exists(), "no checkpoint written"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < step < 400, step  # killed mid-way (the default writes every 100 steps)
    resumed, _ = train_transformer(_resume_config(), images[:64], labels[:64], progress=False, checkpoint=checkpoint)
    straight, _ = train_transformer(_resume_config(), images[:64], labels[:64], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
