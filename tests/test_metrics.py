"""Metrics of generated samples: k-NN precision/recall, FID / IS / accuracy on real digits."""

import pytest
import torch

from vq4dit.metrics import PrecisionRecall, SampleMetrics, feature_networks, knn_radii, manifold_coverage
from vq4dit.reference import digits_dataset, load_reference_classifier


class Identity(torch.nn.Module):
    num_features = 2

    def forward(self, x):
        return x.flatten(1).double()


def test_knn_radii_match_brute_force():
    points = torch.randn(50, 3, dtype=torch.float64)
    distances = torch.cdist(points, points)
    expected = distances.sort(dim=1).values[:, 3]  # column 0 is the point itself
    assert torch.allclose(knn_radii(points, 3, chunk=7), expected)


def test_manifold_coverage_counts_points_inside_balls():
    support = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    radii = torch.tensor([1.0, 2.0], dtype=torch.float64)
    queries = torch.tensor([[0.5, 0.0], [11.5, 0.0], [5.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert manifold_coverage(queries, support, radii) == pytest.approx(0.5)


def test_precision_recall_same_vs_shifted_and_collapsed():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=generator)
    same = torch.randn(400, 2, generator=generator)
    metric = PrecisionRecall(Identity())
    metric.update(real, real=True)
    metric.update(same, real=False)
    result = metric.compute()
    assert result["precision"] > 0.9 and result["recall"] > 0.9

    far = PrecisionRecall(Identity())
    far.update(real, real=True)
    far.update(same + 6.0, real=False)
    assert far.compute()["precision"] < 0.05

    collapsed = PrecisionRecall(Identity())  # mode collapse: faithful but not diverse
    collapsed.update(real, real=True)
    collapsed.update(same * 0.05, real=False)
    result = collapsed.compute()
    assert result["precision"] > 0.9 and result["recall"] < 0.3


def test_precision_recall_needs_more_than_k_samples():
    metric = PrecisionRecall(Identity(), k=3)
    metric.update(torch.randn(3, 2), real=True)
    metric.update(torch.randn(10, 2), real=False)
    with pytest.raises(ValueError, match="more than k=3"):
        metric.compute()


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_dataset()
    return (images + 1) / 2, labels  # [0, 1]


def digit_metrics(real):
    features, logits = feature_networks("classifier", load_reference_classifier())
    return SampleMetrics(features, logits, real_images=real, class_accuracy=True, inception_splits=1)


def test_sample_metrics_real_digits_score_well_and_noise_badly(digits):
    images, labels = digits
    real, held_out, held_labels = images[:900], images[900:1400], labels[900:1400]
    good = digit_metrics(real)
    good.update(held_out, held_labels, fp_images=held_out)
    result = good.compute()
    assert result["class_accuracy"] > 0.95
    assert result["fid"] < 5.0
    assert result["precision"] > 0.6 and result["recall"] > 0.6
    assert result["inception_score"] > 3.0
    assert result["mse_to_fp"] == 0.0 and abs(result["fid_to_fp"]) < 1e-3

    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    bad = digit_metrics(real)
    bad.update(noise, held_labels, fp_images=held_out)
    worse = bad.compute()
    assert worse["class_accuracy"] < 0.3
    assert worse["fid"] > 20 * result["fid"] and worse["fid_to_fp"] > 50
    assert worse["precision"] < 0.2 and worse["inception_score"] < result["inception_score"]
    # MSE to FP in [-1, 1] pixel units: 4x the MSE in [0, 1]
    assert worse["mse_to_fp"] == pytest.approx(4 * (noise - held_out).pow(2).mean().item(), rel=1e-5)


def test_sample_metrics_without_real_images_or_fp(digits):
    images, labels = digits
    metrics = digit_metrics(None)
    metrics.update(images[:100].repeat(1, 3, 1, 1), labels[:100])  # 3-channel input is averaged to gray
    result = metrics.compute()
    assert set(result) == {"class_accuracy", "inception_score"}
    assert result["class_accuracy"] > 0.95


def test_feature_network_choices():
    with pytest.raises(ValueError, match="needs a classifier"):
        feature_networks("classifier", None)
    with pytest.raises(ValueError, match="classifier' or 'inception"):
        feature_networks("clip")


def test_inception_without_torch_fidelity_says_what_to_install():
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install torch-fidelity"):
        feature_networks("inception")
