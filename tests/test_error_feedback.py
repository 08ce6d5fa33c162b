"""Error feedback when assigning candidates (GPTQ / GPTVQ, ``VQConfig.error_feedback``)."""

import pytest
import torch

from vq4dit import VQConfig, load_dit
from vq4dit.codewords import nearest_codewords, to_subvectors
from vq4dit.engine import input_second_moments, with_null_labels
from vq4dit.error_feedback import error_feedback_assign
from vq4dit.kmeans import kmeans
from vq4dit.layers import VQLinear


def correlated_inputs(features: int, count: int = 4096, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(features) + 0.5 * torch.randn(features, features, generator=generator) / features**0.5
    return torch.randn(count, features, generator=generator) @ mixing


def output_error(x: torch.Tensor, weight: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((x @ (approximation - weight).t()).pow(2).mean() / (x @ weight.t()).pow(2).mean())


@pytest.mark.parametrize("d", [1, 2, 4])
def test_feedback_lowers_the_layer_output_error(d):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = correlated_inputs(64)
    hessian = x.t() @ x / x.shape[0]
    plain = VQLinear.from_linear(linear, VQConfig(codebook_size=16, subvector_dim=d, num_candidates=1), "l")
    fed = VQLinear.from_linear(linear, VQConfig(codebook_size=16, subvector_dim=d, num_candidates=1, error_feedback=True),
                               "l", hessian)
    assert torch.equal(plain.codebook, fed.codebook)  # same k-means: only the assignment differs
    plain_error, fed_error = (output_error(x, linear.weight, layer.weight()) for layer in (plain, fed))
    assert fed_error < 0.95 * plain_error, (fed_error, plain_error)


def test_without_correlations_feedback_is_the_nearest_codeword():
    torch.manual_seed(0)
    weight = torch.randn(32, 16)
    codebook = kmeans(to_subvectors(weight, 2), 8, 10, 0)
    fed, _ = error_feedback_assign(weight, codebook, torch.eye(16), num_nearest=2)
    nearest, _ = nearest_codewords(to_subvectors(weight, 2), codebook, 2)
    assert torch.equal(fed, nearest)


def test_feedback_needs_the_full_second_moments():
    config = VQConfig(codebook_size=4, subvector_dim=2, error_feedback=True)
    with pytest.raises(ValueError, match="error_feedback needs input_weights"):
        VQLinear.from_linear(torch.nn.Linear(8, 8), config, "l", torch.ones(8))
    with pytest.raises(ValueError, match="hessian"):
        error_feedback_assign(torch.randn(4, 8), torch.randn(4, 2), torch.eye(6))


def test_full_second_moments_have_the_diagonal_of_the_plain_ones():
    torch.manual_seed(0)
    model = load_dit("tiny").eval()
    names = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"]
    batches = [with_null_labels(torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([3, 9]))]
    diagonal = input_second_moments(model, names, batches)
    full = input_second_moments(model, names, batches, full={names[1]})
    assert torch.equal(full[names[0]], diagonal[names[0]])
    assert full[names[1]].shape == (256, 256)
    torch.testing.assert_close(full[names[1]].diagonal(), diagonal[names[1]], rtol=1e-5, atol=1e-7)
    assert torch.allclose(full[names[1]], full[names[1]].t())
