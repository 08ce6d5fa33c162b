"""The shipped RGB reference DiT (issue 17's second suite model), its data and its classifier."""

import pytest
import torch

from vq4dit import load_dit
from vq4dit.reference import classifier_accuracy
from vq4dit.rgb_reference import (
    RGB_NUM_CLASSES,
    load_rgb_reference_classifier,
    rgb_patches_dataset,
    rgb_patches_split,
)
from vq4dit.sampling import Diffusion


@pytest.fixture(scope="module")
def patches():
    return rgb_patches_dataset(16)


def test_patches_are_rgb_classes_with_a_disjoint_split(patches):
    images, labels, bands = patches
    assert images.shape[1:] == (3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert labels.unique().tolist() == list(range(RGB_NUM_CLASSES))
    train, test = rgb_patches_split(bands)
    assert len(train) + len(test) == len(images) and not set(train.tolist()) & set(test.tolist())
    assert labels[test].unique().numel() == RGB_NUM_CLASSES  # every class is tested


def test_shipped_model_is_a_wide_deep_class_conditional_dit():
    model = load_dit("rgb_reference")
    config = model.config
    assert config.num_attention_heads * config.attention_head_dim >= 192 and config.num_layers >= 8
    assert config.in_channels == 3 and config.out_channels == 6  # learned sigma
    assert config.norm_type == "ada_norm_zero"
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 1001  # 1000 labels + the null class of classifier-free guidance
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shipped_classifier_separates_held_out_patches(patches):
    """Measured 0.871 (chance 0.125); most errors: lake patches taken for the left tree, whose box
    also holds some water (vq4dit/rgb_reference.py REGIONS 2 and 7)."""
    images, labels, bands = patches
    _, test = rgb_patches_split(bands)
    assert classifier_accuracy(load_rgb_reference_classifier(), images[test], labels[test]) > 0.85


@torch.no_grad()
def test_shipped_model_predicts_the_noise_of_real_patches(patches):
    """Trained, not random: at t = 500 its eps prediction beats predicting zero by far."""
    images, labels, _ = patches
    model, diffusion = load_dit("rgb_reference"), Diffusion(1000, 1000)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(images), (64,), generator=generator)
    x0, t = images[index], torch.full((64,), 500)
    noise = torch.randn(x0.shape, generator=generator)
    eps = model(diffusion.q_sample(x0, t, noise), timestep=diffusion.timesteps[t], class_labels=labels[index]).sample[:, :3]
    assert float((eps - noise).pow(2).mean()) < 0.3 * float(noise.pow(2).mean())


def test_train_py_test_scores_the_rgb_reference_with_its_own_classifier(tmp_path):
    from train import cli_main

    cli = cli_main([
        "test", "--config", "configs/rgb_reference.yaml", "--model.evaluation.model=fp",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.num_trajectories=1", "--data.val_trajectories=1", "--data.num_steps=2",
        "--data.eval_samples=16", "--data.eval_batch_size=16", "--data.eval_num_steps=2",
    ])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"test/class_accuracy", "test/fid", "test/precision", "test/recall"} <= set(metrics)
    assert 0.0 <= metrics["test/class_accuracy"] <= 1.0 and metrics["test/fid"] > 0.0
    assert cli.model.evaluation.features == "classifier" and cli.model.evaluation.real_images == "rgb_patches"
