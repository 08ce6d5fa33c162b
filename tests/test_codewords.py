"""VQ math: config validation, k-means quality and determinism, candidates, reconstruction."""

import math

import pytest
import torch

from vq4dit.kmeans import kmeans
from vq4dit.vq_config import VQConfig
from vq4dit.codewords import index_dtype, init_candidate_logits, nearest_codewords, relative_error, to_subvectors
from vq4dit.soft import ratio_regularizer, soft_reconstruct


def test_presets_match_official_code():
    w2, w3 = VQConfig.preset("w2"), VQConfig.preset("w3")
    assert (w2.codebook_size, w2.subvector_dim, w2.nominal_bits_per_weight) == (256, 4, 2.0)
    assert (w3.codebook_size, w3.subvector_dim, w3.nominal_bits_per_weight) == (64, 2, 3.0)
    assert VQConfig.from_bits(3) == w3
    assert VQConfig(codebook_size=4096, subvector_dim=4).nominal_bits_per_weight == 3.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"codebook_size": 100}, "power of two"),
        ({"codebook_size": 1}, "power of two"),
        ({"subvector_dim": 0}, "subvector_dim"),
        ({"num_candidates": 0}, "num_candidates"),
        ({"codebook_size": 4, "num_candidates": 5}, "cannot exceed"),
        ({"ratio_init": "random"}, "ratio_init"),
    ],
)
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VQConfig(**kwargs)


def test_invalid_for_layer_raises():
    with pytest.raises(ValueError, match="does not divide in_features=6"):
        VQConfig(subvector_dim=4).validate_for(8, 6)
    with pytest.raises(ValueError, match="exceeds the number of sub-vectors"):
        VQConfig(codebook_size=256, subvector_dim=4).validate_for(8, 16)
    with pytest.raises(ValueError, match="bits must be 2 or 3"):
        VQConfig.from_bits(4)
    with pytest.raises(ValueError, match="unknown VQ preset"):
        VQConfig.preset("w5")


def test_index_dtype_is_smallest():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(2**15) == torch.int16
    assert index_dtype(2**16) == torch.int32


def test_subvectors_are_row_contiguous():
    weight = torch.arange(24.0).reshape(3, 8)
    pieces = to_subvectors(weight, 4)
    assert pieces.shape == (6, 4)
    assert torch.equal(pieces[1], weight[0, 4:8])
    assert torch.equal(pieces[2], weight[1, :4])


def test_nearest_codewords_matches_brute_force():
    torch.manual_seed(0)
    points, codebook = torch.randn(5000, 4), torch.randn(64, 4)
    idx, dist = nearest_codewords(points, codebook, 3)
    brute = torch.cdist(points, codebook).pow(2)
    ref_dist, ref_idx = brute.topk(3, dim=1, largest=False)
    # computed in row blocks as |p|^2 - 2 p.c + |c|^2, brute force by cdist: rounding may differ, so a
    # different index is allowed only on a near tie (its brute-force distance equals the best's)
    torch.testing.assert_close(brute.gather(1, idx), ref_dist, rtol=1e-5, atol=1e-4)
    assert (idx != ref_idx).float().mean() < 1e-3
    assert torch.allclose(dist, ref_dist, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kmeans_recovers_separated_clusters(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(1)
    centers = torch.randn(16, 2, generator=generator) * 10
    points = centers.repeat_interleave(200, 0) + 0.01 * torch.randn(3200, 2, generator=generator)
    codebook = kmeans(points, 16, iters=10, backend=backend)
    # every true center has a codeword within noise distance
    assert torch.cdist(centers, codebook).min(dim=1).values.max() < 0.05


def test_kmeans_deterministic_and_backends_agree():
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    points = torch.randn(20000, 4)
    a = kmeans(points, 64, iters=5, seed=3, backend="torch")
    b = kmeans(points, 64, iters=5, seed=3, backend="torch")
    c = kmeans(points, 64, iters=5, seed=3, backend="faiss")
    assert torch.equal(a, b)
    idx_a, _ = nearest_codewords(points, a)
    idx_c, _ = nearest_codewords(points, c)
    assert relative_error(points, c[idx_c[:, 0]]) == pytest.approx(relative_error(points, a[idx_a[:, 0]]), rel=1e-3)


def test_kmeans_beats_random_codebook_and_reseeds_empty_clusters():
    torch.manual_seed(0)
    points = 0.02 * torch.distributions.StudentT(3.0).sample((20000, 4))
    codebook = kmeans(points, 256, iters=10, backend="torch")
    idx, _ = nearest_codewords(points, codebook)
    err = relative_error(points, codebook[idx[:, 0]])
    random_cb = points[torch.randperm(points.shape[0])[:256]]
    idx_r, _ = nearest_codewords(points, random_cb)
    assert err < 0.8 * relative_error(points, random_cb[idx_r[:, 0]])
    # duplicated points: fewer distinct values than k must not leave NaN or dead codewords
    few = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]).repeat(50, 1)
    cb = kmeans(few, 4, iters=3, backend="torch")
    assert torch.isfinite(cb).all()


def test_kmeans_errors():
    with pytest.raises(ValueError, match="cannot make"):
        kmeans(torch.randn(10, 2), 16)
    with pytest.raises(ValueError, match="backend"):
        kmeans(torch.randn(100, 2), 4, backend="sklearn")


def test_ratio_init_inverse_distance_and_uniform():
    sq = torch.tensor([[1.0, 4.0], [0.25, 0.25]])
    ratios = torch.softmax(init_candidate_logits(sq, "inverse_distance"), dim=1)
    # r_0 = d_1 / (d_0 + d_1) for n = 2 (distances, not squared)
    assert ratios[0, 0] == pytest.approx(2.0 / 3.0, abs=1e-4)
    assert ratios[1, 0] == pytest.approx(0.5)
    uniform = torch.softmax(init_candidate_logits(sq, "uniform"), dim=1)
    assert torch.allclose(uniform, torch.full_like(uniform, 0.5))


def test_soft_reconstruct_is_weighted_average():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 3.0]])
    candidates = torch.tensor([[1, 2]], dtype=torch.uint8)
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    out = soft_reconstruct(codebook, candidates, logits)
    assert torch.allclose(out, torch.tensor([[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 3]]))


def test_ratio_regularizer_forms():
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    half = torch.full((2, 2), 0.5)
    for kind in ("paper", "official"):
        assert float(ratio_regularizer(one_hot, kind)) == 0.0
        assert float(ratio_regularizer(half, kind)) == pytest.approx(1.0 if kind == "paper" else 0.5)
    assert float(ratio_regularizer(torch.zeros(0, 2))) == 0.0
    with pytest.raises(ValueError):
        ratio_regularizer(half, "l1")
    assert math.isclose(float(ratio_regularizer(torch.tensor([[0.75, 0.25]]), "paper")), 0.5)


def test_confident_ratio_init_starts_near_the_nearest_candidate():
    from vq4dit.codewords import init_candidate_logits

    ratios = init_candidate_logits(torch.tensor([[0.1, 0.2, 0.3], [5.0, 5.0, 9.0]]), "confident").softmax(dim=1)
    torch.testing.assert_close(ratios, torch.tensor([[0.9, 0.05, 0.05]] * 2))
    two = init_candidate_logits(torch.tensor([[0.1, 0.2]]), "confident").softmax(dim=1)
    torch.testing.assert_close(two, torch.tensor([[0.9, 0.1]]))


def test_weighted_nearest_codewords_are_the_weighted_distances_of_every_pair():
    generator = torch.Generator().manual_seed(0)
    points, codebook = torch.randn(3000, 4, generator=generator), torch.randn(24, 4, generator=generator)
    weights = torch.rand(3000, 4, generator=generator) * 3
    every = ((points.unsqueeze(1) - codebook.unsqueeze(0)).pow(2) * weights.unsqueeze(1)).sum(2)  # [N, k]
    expected, expected_index = every.topk(3, dim=1, largest=False)
    index, distances = nearest_codewords(points, codebook, 3, weights)
    assert (index == expected_index).float().mean() > 0.999  # round-off may flip a near tie
    torch.testing.assert_close(distances, expected, rtol=1e-4, atol=1e-5)
    assert (distances >= 0).all()


def test_weighted_seeding_is_d2_sampling_under_the_weights():
    """A point far away along a heavily weighted dimension is always seeded; the same point far
    away along a dimension of weight ~0 never is."""
    from vq4dit.kmeans import _kmeans_plus_plus

    points = torch.zeros(200, 2)
    points[0], points[1] = torch.tensor([100.0, 0.0]), torch.tensor([0.0, 100.0])
    points[2:] += torch.randn(198, 2) * 0.01
    weights = torch.tensor([[1.0, 1e-8]]).expand(200, 2)
    for seed in range(5):
        seeded = _kmeans_plus_plus(points, 3, torch.Generator().manual_seed(seed), weights)
        rows = {tuple(row.tolist()) for row in seeded}
        assert (100.0, 0.0) in rows and (0.0, 100.0) not in rows


def test_lloyd_on_a_sample_stays_close_to_lloyd_on_every_point():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 2, generator=generator) * 5
    points = centres[torch.randint(0, 8, (40000,), generator=generator)] + torch.randn(40000, 2, generator=generator) * 0.3
    full, sampled = kmeans(points, 8, 10, 0, backend="torch"), kmeans(points, 8, 10, 0, backend="torch",
                                                                         lloyd_points_per_cluster=256)
    assert not torch.equal(full, sampled)  # the sample really changes the run
    error = lambda codebook: float(torch.cdist(points, codebook).min(1).values.pow(2).mean())  # noqa: E731
    assert error(sampled) < 1.05 * error(full)
    assert torch.equal(kmeans(points, 8, 10, 0, backend="torch", lloyd_points_per_cluster=10**6), full)  # no sample
