"""Image-quality metrics of generated samples with a pluggable feature network.

All metrics take images as float ``[B, C, H, W]`` in [0, 1] (C = 1 or 3) and are torchmetrics
``Metric`` objects, so they accumulate over batches and synchronise across DDP ranks.

- FID (torchmetrics ``FrechetInceptionDistance``) against a set of real images, and against the
  FP model's samples (no real set needed: how far the quantized distribution moved).
- Inception Score (torchmetrics ``InceptionScore``) from the feature network's class logits.
- Improved precision / recall (Kynkaenniemi et al. 2019, k-NN manifolds, k = 3).
- Class accuracy of the samples (the requested label vs the classifier's argmax).
- Pixel MSE to the FP model's samples under identical noise, in [-1, 1] pixel units.

Feature networks: the shipped digits classifier (offline, the reference model's "digits-FID"), or
Inception-v3 through torch-fidelity when the user has it installed (DiT on ImageNet). torch-fidelity
and torchvision are never dependencies: installing them replaces the torch build on some machines.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.utilities.data import dim_zero_cat


class ClassifierFeatures(nn.Module):
    """Wrap a reference classifier (digits, or the RGB reference's) as a torchmetrics feature network.

    Input ``[B, C, H, W]`` in [0, 1] (3 channels are averaged to gray for a 1-channel classifier); output the penultimate
    features ``[B, F]`` (``output="features"``) or the class logits ``[B, K]`` (``"logits"``).
    """

    def __init__(self, classifier: nn.Module, output: str = "features") -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.output = output
        self.num_features = classifier.num_features if output == "features" else classifier.num_classes

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        super().train(mode)
        self.classifier.eval()  # torchmetrics may call .train(); batch norm must stay frozen
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[1] == 3 and getattr(self.classifier, "in_channels", 1) == 1:  # RGB into a gray classifier
            images = images.mean(dim=1, keepdim=True)
        pixels = images * 2.0 - 1.0
        return (self.classifier.features(pixels) if self.output == "features" else self.classifier(pixels)).double()


class InceptionFeatures(nn.Module):
    """Inception-v3 (torch-fidelity's FID network) on ``[B, 3, H, W]`` images in [0, 1].

    ``output="features"``: the 2048-d pool features (FID, precision/recall); ``"logits"``: the
    1008-way logits (Inception Score). Needs ``torch-fidelity`` (and its weights, downloaded on
    first use); a clear ``ValueError`` says what to install when it is missing.
    """

    def __init__(self, output: str = "features") -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            feature = "2048" if output == "features" else "logits_unbiased"
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature])
        except (ImportError, ModuleNotFoundError, RuntimeError) as error:
            raise ValueError(
                "Inception features need torch-fidelity: `pip install torch-fidelity` on a machine where it "
                "keeps your torch build (it pulls torchvision; check `pip install --dry-run` first). "
                "Offline alternative for the digits model: metrics_features=classifier. "
                f"(import failed: {error})"
            ) from error
        self.num_features = 2048 if output == "features" else 1008

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).double()


def feature_networks(kind: str, classifier: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    """``(features, logits)`` networks for ``kind`` = ``classifier`` or ``inception``."""
    if kind == "classifier":
        if classifier is None:
            raise ValueError("metrics_features=classifier needs a classifier (only the reference model ships one)")
        return ClassifierFeatures(classifier, "features"), ClassifierFeatures(classifier, "logits")
    if kind == "inception":
        return InceptionFeatures("features"), InceptionFeatures("logits")
    raise ValueError(f"metrics features must be 'classifier' or 'inception', got {kind!r}")


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of every row of ``features [N, F]`` to its k-th nearest other row: ``[N]``."""
    radii = []
    for block in features.split(chunk):
        distances = torch.cdist(block, features)  # [b, N]; the row itself is at distance 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``queries [M, F]`` inside at least one ball ``(support [N, F], radii [N])``."""
    inside = []
    for block in queries.split(chunk):
        inside.append((torch.cdist(block, support) <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


class PrecisionRecall(Metric):
    """Improved precision and recall (Kynkaenniemi et al. 2019) of generated vs real features.

    Precision: fraction of generated samples inside the real k-NN manifold (fidelity); recall:
    fraction of real samples inside the generated manifold (diversity). Needs > k samples of each.
    """

    full_state_update = False

    def __init__(self, feature: nn.Module, k: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.feature, self.k = feature, k
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor, real: bool) -> None:
        features = self.feature(images).double()
        (self.real_features if real else self.fake_features).append(features)

    def compute(self) -> dict[str, torch.Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        if min(len(real), len(fake)) <= self.k:
            raise ValueError(f"precision/recall need more than k={self.k} real and generated samples")
        precision = manifold_coverage(fake, real, knn_radii(real, self.k))
        recall = manifold_coverage(real, fake, knn_radii(fake, self.k))
        return {"precision": torch.tensor(precision), "recall": torch.tensor(recall)}


class SampleMetrics(nn.Module):
    """Every metric of one set of generated samples, accumulated over batches.

    Args:
        features: feature network ``[B, C, H, W] in [0, 1] -> [B, F]`` with ``num_features``.
        logits: class-logit network (Inception Score, class accuracy); None skips both.
        real_images: ``[N, C, H, W]`` in [0, 1] (or uint8 in [0, 255]); None skips FID/precision/
            recall against real data.
        class_accuracy: report how often ``logits.argmax`` equals the requested label (only
            meaningful when the logits' classes are the model's classes, as for the digits model).
        inception_splits: splits of the Inception Score.
    """

    def __init__(
        self,
        features: nn.Module,
        logits: nn.Module | None = None,
        real_images: torch.Tensor | None = None,
        class_accuracy: bool = False,
        inception_splits: int = 10,
    ) -> None:
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore

        self.logits_net = logits
        self.has_real = real_images is not None
        self.class_accuracy = class_accuracy and logits is not None
        # FID against the FP model's samples: the real-feature slot holds the FP samples.
        self.fid_to_fp = FrechetInceptionDistance(feature=features, normalize=True)
        self.mse_to_fp = MeanMetric()
        self.accuracy = MeanMetric()
        self.inception = None
        if logits is not None:
            with warnings.catch_warnings():  # "will save all extracted features": [N, K] logits, small
                warnings.simplefilter("ignore", UserWarning)
                self.inception = InceptionScore(feature=logits, normalize=True, splits=inception_splits)
        if self.has_real:
            self.fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
            self.precision_recall = PrecisionRecall(features)
            real = real_images.float() / 255.0 if real_images.dtype == torch.uint8 else real_images.float()
            for chunk in real.split(512):
                self.fid.update(chunk, real=True)
                self.precision_recall.update(chunk, real=True)

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor, fp_images: torch.Tensor | None = None) -> None:
        """Add generated ``images [B, C, H, W]`` in [0, 1] for ``labels [B]`` (and the FP model's
        images for the same labels and noise, when comparing a quantized model)."""
        images = images.float().clamp(0, 1)
        if fp_images is not None:
            fp_images = fp_images.float().clamp(0, 1).to(images.device)
            self.fid_to_fp.update(images, real=False)
            self.fid_to_fp.update(fp_images, real=True)
            self.mse_to_fp.update(((images - fp_images) * 2.0).pow(2).mean(dim=(1, 2, 3)))
        if self.has_real:
            self.fid.update(images, real=False)
            self.precision_recall.update(images, real=False)
        if self.inception is not None:
            self.inception.update(images)
        if self.class_accuracy:
            predicted = self.logits_net(images).argmax(dim=1)
            self.accuracy.update((predicted == labels.to(predicted.device)).float())

    def compute(self) -> dict[str, float]:
        """Metric name -> value (only the metrics this configuration can compute)."""
        results: dict[str, float] = {}
        if self.class_accuracy:
            results["class_accuracy"] = self.accuracy.compute().item()
        if self.has_real:
            results["fid"] = self.fid.compute().item()
            results.update({k: v.item() for k, v in self.precision_recall.compute().items()})
        if self.inception is not None:
            with warnings.catch_warnings():  # the split std is undefined with one split: we report the mean
                warnings.simplefilter("ignore", UserWarning)
                results["inception_score"] = self.inception.compute()[0].item()
        if self.mse_to_fp.update_count:
            results["mse_to_fp"] = self.mse_to_fp.compute().item()
            results["fid_to_fp"] = self.fid_to_fp.compute().item()
        return results
