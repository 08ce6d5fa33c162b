"""The shipped digits reference DiT and digits classifier: loading and public helpers.

The quantization code needs a real *trained* DiT that runs on a CPU in seconds. ``vq4dit/assets/reference/``
ships one, trained from scratch by ``tools/train_reference.py`` on scikit-learn's offline digits
(8x8, upsampled to 16x16, pixel space, no VAE):

* ``transformer/``: a diffusers ``DiTTransformer2DModel`` (EMA weights) of the DiT family:
  adaLN-Zero, patch 2, 1000-entry label table + null class 1000 (classifier-free guidance works as in
  ``DiTPipeline``; only labels 0-9 are used), learned sigma (channel 0 = eps, channel 1 = variance
  interpolation value ``v`` in [-1, 1], the convention of :class:`vq4dit.sampling.Diffusion`).
* ``classifier.safetensors`` + ``classifier.json``: a small CNN with ``features(x)`` (penultimate
  layer) for a digits-FID and for judging samples.
* ``training.json`` (settings, losses, accuracies, wall time) and ``samples_fp.png``.

Sample it with :func:`vq4dit.sampling.sample` and ``SamplerConfig(clip_denoised=True)`` (pixel space).
Training and re-evaluation: ``python tools/train_reference.py {train,evaluate} ...``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import NULL_CLASS, SamplerConfig, sample

__all__ = ["ASSETS_DIR", "NUM_CLASSES", "NULL_CLASS", "DigitsClassifier", "classifier_accuracy", "digits_dataset",
           "digits_split", "disable_label_dropout_", "load_reference_classifier", "load_reference_model",
           "sample_class_accuracy"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "reference"
NUM_CLASSES = 10

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def digits_dataset(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits, bilinearly resized to ``size x size`` and scaled to [-1, 1].

    Returns:
        ``images`` float32 ``[N, 1, size, size]`` in [-1, 1] and ``labels`` int64 ``[N]``.
    """
    from sklearn.datasets import load_digits

    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


def digits_split(
    labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified train/test split: ``(train_indices, test_indices)``, both sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        num_test = round(len(members) * test_fraction)
        test.append(members[:num_test])
        train.append(members[num_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def disable_label_dropout_(model: nn.Module) -> nn.Module:
    """Switch off the per-block label dropout of diffusers' label embedders (in place).

    diffusers drops labels inside every block's ``LabelEmbedding`` independently in train mode; the
    reference model instead drops a sample's label for all blocks at once in the training loop.
    The 1001-row table (null row 1000) is kept.
    """
    from diffusers.models.embeddings import LabelEmbedding

    found = 0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            found += 1
    if not found:
        raise ValueError("no LabelEmbedding found: not a class-conditional DiT")
    return model


# ---------------------------------------------------------------------------------------------
# The digits classifier (feature network of the digits-FID)
# ---------------------------------------------------------------------------------------------


class DigitsClassifier(nn.Module):
    """Small CNN for ``size x size`` images in [-1, 1] (digits: 1 channel; the RGB reference: 3);
    ``features`` is the penultimate activation."""

    def __init__(self, channels: int = 32, feature_dim: int = 128, num_classes: int = NUM_CLASSES, size: int = 16,
                 in_channels: int = 1):
        super().__init__()
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self.channels, self.feature_dim, self.num_classes, self.size = channels, feature_dim, num_classes, size
        self.in_channels = in_channels
        wide = 2 * channels

        def conv(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

        self.body = nn.Sequential(
            conv(in_channels, channels), conv(channels, channels), nn.MaxPool2d(2),  # [B, c, size/2, size/2]
            conv(channels, wide), conv(wide, wide), nn.MaxPool2d(2),  # [B, 2c, size/4, size/4]
            nn.Flatten(),
            nn.Linear(wide * (size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim  # read by torchmetrics' FID with a custom feature module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images ``[B, in_channels, size, size]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.dropout(self.features(x)))

    def architecture(self) -> dict:
        """Constructor arguments (saved as ``classifier.json``)."""
        architecture = {"channels": self.channels, "feature_dim": self.feature_dim, "num_classes": self.num_classes,
                        "size": self.size}
        if self.in_channels != 1:
            architecture["in_channels"] = self.in_channels
        return architecture


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``classifier`` (put in eval mode) on ``images``."""
    classifier.eval()
    predictions = torch.cat([classifier(chunk).argmax(1) for chunk in images.split(512)])
    return (predictions == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Loading, evaluation and artefacts
# ---------------------------------------------------------------------------------------------


def load_reference_model(path: str | Path = ASSETS_DIR):
    """The reference ``DiTTransformer2DModel`` in ``path`` (default: the shipped one, as
    ``load_dit("reference")``) in eval mode, float32, CPU, label dropout off."""
    from .models import load_dit

    return disable_label_dropout_(load_dit(Path(path) / "transformer"))


def load_reference_classifier(path: str | Path = ASSETS_DIR) -> DigitsClassifier:
    """The shipped digits classifier in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    architecture = json.loads((path / "classifier.json").read_text())["architecture"]
    classifier = DigitsClassifier(**architecture)
    classifier.load_state_dict(load_file(path / "classifier.safetensors"))
    return classifier.eval()


@torch.no_grad()
def sample_class_accuracy(
    model: nn.Module,
    classifier: nn.Module,
    per_class: int = 50,
    num_steps: int = 100,
    guidance_scale: float = 1.0,
    method: str = "ddpm",
    seed: int = 0,
) -> tuple[float, torch.Tensor]:
    """Fraction of generated digits that the classifier assigns to the requested class.

    Samples with :func:`vq4dit.sampling.sample` (learned variance, ``clip_denoised=True``); sample
    ``n`` uses seed ``seed * 10 * per_class + n``.

    Returns:
        ``(accuracy, samples [10 * per_class, 1, H, W])``, samples ordered class-major.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    seeds = [seed * len(labels) + n for n in range(len(labels))]
    config = SamplerConfig(sampler=method, num_steps=num_steps, guidance_scale=guidance_scale, clip_denoised=True)
    images = sample(model, labels, seeds, config).clamp(-1.0, 1.0)
    return classifier_accuracy(classifier, images, labels), images
