"""VQLinear modes and mutators, optimizer-state shrinking, persistence, model patching."""

import pytest
import torch
from torch import nn

from vq4dit.layers import VQLinear, replace_in_optimizer_

from vq4dit.quantize import quantize_, vq_layers
from vq4dit.vq_config import VQConfig


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(64, 48)


def small_config(n=2, **kw):
    return VQConfig(codebook_size=16, subvector_dim=4, num_candidates=n, **kw)


def test_from_linear_soft_state(linear):
    layer = VQLinear.from_linear(linear, small_config(n=3))
    assert layer.num_soft == layer.num_subvectors == 48 * 64 // 4
    assert layer.candidates.shape == (768, 3) and layer.candidates.dtype == torch.uint8
    assert torch.equal(layer.codes, layer.candidates[:, 0])  # candidate 0 = nearest = k-means code
    ratios = layer.ratios()
    assert torch.all(ratios[:, 0] >= ratios[:, 1]) and torch.all(ratios[:, 1] >= ratios[:, 2])
    # reconstruction error is bounded and the bias is carried over exactly
    rel = (layer.weight() - linear.weight).pow(2).sum() / linear.weight.pow(2).sum()
    assert rel < 0.3
    assert torch.equal(layer.bias, linear.bias)
    assert "k=16" in repr(layer) and "hard=0.0%" in repr(layer)


def test_plain_vq_n1_is_hard_and_nearest(linear):
    layer = VQLinear.from_linear(linear, small_config(n=1))
    assert layer.is_hard and layer.hard_fraction == 1.0
    points = linear.weight.detach().reshape(-1, 4)
    dists = torch.cdist(points, layer.codebook.detach())
    assert torch.equal(layer.codes.long(), dists.argmin(dim=1))


def test_soft_one_hot_equals_hard_path_exactly(linear):
    layer = VQLinear.from_linear(linear, small_config(n=3))
    torch.manual_seed(1)
    layer.candidate_logits.data = torch.randn_like(layer.candidate_logits) * 3
    winner = layer.candidate_logits.argmax(dim=1)
    x = torch.randn(7, 64)
    # one-hot ratios on the soft path ...
    one_hot = torch.full_like(layer.candidate_logits, -1e4).scatter_(1, winner.unsqueeze(1), 1e4)
    layer.candidate_logits.data = one_hot.clone()
    soft_out = layer(x)
    # ... equal the hard path after finalize (argmax codes), bit for bit
    layer.finalize_()
    assert layer.is_hard and layer.candidate_logits.shape[0] == 0
    assert torch.equal(layer(x), soft_out)


@pytest.mark.parametrize("n", [2, 3])
def test_finalize_hardens_rows_with_nonfinite_ratios(linear, n):
    layer = VQLinear.from_linear(linear, small_config(n=n))
    torch.manual_seed(1)
    logits = torch.randn_like(layer.candidate_logits)
    nan, inf = float("nan"), float("inf")
    logits[0, 0] = nan  # one NaN poisons the softmax of its row
    logits[1, -1] = nan
    logits[2] = inf  # inf - inf
    logits[3, 1] = inf
    logits[4] = -inf  # every candidate pruned
    logits[5] = nan
    layer.candidate_logits.data = logits
    first, best = layer.candidates[:, 0].clone(), layer.candidates.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    broken = ~layer.ratios().isfinite().all(dim=1)  # harden_rows_ alone would leave these soft
    assert broken[[0, 1, 2, 4, 5]].all() and not broken[6:].any()  # row 3: finite for n = 2 (sigmoid)
    layer.finalize_()
    assert layer.is_hard and layer.candidate_logits.shape == (0, n)
    assert torch.equal(layer.codes, torch.where(broken, first, best))  # finite rows: the argmax, as before
    assert layer(torch.randn(3, 64)).isfinite().all()


def test_harden_rows_moves_only_confident_rows_and_shrinks(linear):
    layer = VQLinear.from_linear(linear, small_config(n=2))
    logits = torch.zeros_like(layer.candidate_logits)
    logits[:100, 1] = 10.0  # 100 rows confidently on candidate 1
    layer.candidate_logits.data = logits
    second = layer.candidates[:100, 1].clone()
    before = layer.num_soft
    reindex = layer.harden_rows_(0.99)
    assert layer.num_soft == before - 100
    assert layer.candidate_logits.shape == (before - 100, 2)
    assert torch.equal(layer.codes[:100], second)
    assert reindex.rows.numel() == before - 100
    assert torch.equal(layer.soft_rows, torch.arange(100, before, dtype=torch.int32))
    with pytest.raises(ValueError):
        layer.harden_rows_(1.5)


def test_prune_candidates_really_shrinks(linear):
    layer = VQLinear.from_linear(linear, small_config(n=3))
    s = layer.num_soft
    logits = torch.zeros(s, 3)
    logits[:, 2] = -10.0  # third candidate dead everywhere
    logits[:10, 1] = -10.0  # rows 0..9 keep a single live candidate -> hard
    layer.candidate_logits.data = logits
    layer.prune_candidates_(floor=0.01)
    assert layer.active_candidates == 2 and layer.config.num_candidates == 3
    assert layer.num_soft == s - 10
    assert torch.isfinite(layer.candidate_logits).all()
    # mixed: some rows keep 3, others 2 -> width stays 3 with -inf marking pruned entries
    layer2 = VQLinear.from_linear(linear, small_config(n=3))
    logits = torch.zeros(layer2.num_soft, 3)
    logits[::2, 2] = -10.0
    layer2.candidate_logits.data = logits
    w_before = layer2.weight().detach()
    layer2.prune_candidates_(floor=0.01)
    assert layer2.active_candidates == 3
    assert torch.isinf(layer2.candidate_logits[::2, 2]).all()
    # pruning a ~0 ratio barely changes the weight
    assert torch.allclose(layer2.weight(), w_before, atol=1e-4)


def test_gradients_and_optimizer_state_shrink(linear):
    layer = VQLinear.from_linear(linear, small_config(n=2))
    opt = torch.optim.RMSprop([layer.candidate_logits, layer.codebook], lr=1e-2, alpha=0.9)
    x = torch.randn(8, 64)
    loss = layer(x).pow(2).mean()
    loss.backward()
    assert layer.candidate_logits.grad is not None and layer.candidate_logits.grad.abs().sum() > 0
    assert layer.codebook.grad is not None
    opt.step()
    square_avg = opt.state[layer.candidate_logits]["square_avg"].clone()
    logits = layer.candidate_logits.data.clone()
    logits[:5, 0] = 20.0
    layer.candidate_logits.data = logits
    old = layer.candidate_logits
    reindex = layer.harden_rows_(0.99)
    replace_in_optimizer_(opt, old, layer.candidate_logits, reindex)
    assert opt.state[layer.candidate_logits]["square_avg"].shape == layer.candidate_logits.shape
    assert torch.equal(opt.state[layer.candidate_logits]["square_avg"], square_avg[5:])
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    opt.step()  # shapes agree: no error


def test_state_dict_round_trip_after_shrinking(linear):
    layer = VQLinear.from_linear(linear, small_config(n=3))
    layer.candidate_logits.data[:50, 0] = 30.0
    layer.harden_rows_(0.99)
    fresh = VQLinear.from_linear(linear, small_config(n=3))
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert fresh.num_soft == layer.num_soft
    assert torch.equal(fresh(x), layer(x))
    hard = VQLinear(64, 48, small_config(n=3))  # empty hard skeleton takes a soft state too
    hard.load_state_dict(layer.state_dict())
    assert torch.equal(hard(x), layer(x))


def test_bf16_autocast_forward(linear):
    layer = VQLinear.from_linear(linear, small_config())
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), layer(x), atol=0.1)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)])
        self.head = nn.Linear(32, 8)


def test_quantize_include_exclude_overrides():
    torch.manual_seed(0)
    model = TwoBlocks()
    names = quantize_(
        model,
        small_config(),
        include=["blocks.*"],
        exclude=["blocks.1.2"],
        overrides={"blocks.0.*": {"codebook_size": 32}},
        progress=False,
    )
    assert names == ["blocks.0.0", "blocks.0.2", "blocks.1.0"]
    layers = vq_layers(model)
    assert set(layers) == set(names)
    assert layers["blocks.0.0"].config.codebook_size == 32
    assert layers["blocks.1.0"].config.codebook_size == 16
    assert type(model.head) is nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear layer matched"):
        quantize_(TwoBlocks(), small_config(), include=["nothing.*"], progress=False)
    with pytest.raises(ValueError, match="head: subvector_dim=3 does not divide"):
        quantize_(TwoBlocks(), small_config(), include=["head"], overrides={"head": {"subvector_dim": 3}}, progress=False)


def test_row_scales_normalise_rows_and_round_trip(tmp_path):
    """Rows of very different magnitude share one codebook once divided by their RMS; the scales
    are part of the weight, of every inference mode, of bits/weight and of the packed file."""
    from vq4dit.export import load_quantized, save_quantized
    from vq4dit.models import load_dit
    from vq4dit.quantize import finalize_model_, set_inference_mode_

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 0, 32).unsqueeze(1))  # rows 100x apart in scale
    plain = VQLinear.from_linear(linear, VQConfig(codebook_size=16, subvector_dim=2, num_candidates=1))
    scaled = VQLinear.from_linear(linear, VQConfig(codebook_size=16, subvector_dim=2, num_candidates=1, row_scale=True))
    def row_error(layer):  # relative error per row, worst row
        return ((layer.weight() - linear.weight).norm(dim=1) / linear.weight.norm(dim=1)).max().item()
    assert row_error(scaled) < 0.5 * row_error(plain)
    assert scaled.bits_per_weight() == pytest.approx(plain.bits_per_weight() + 16 / 64)
    x = torch.randn(5, 64)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, scaled.weight(), scaled.bias)
        for mode in ("decode", "cached"):
            scaled.set_inference_mode_(mode)
            torch.testing.assert_close(scaled(x), reference, rtol=1e-6, atol=1e-6)

    model = load_dit("tiny")
    quantize_(model, VQConfig(codebook_size=16, subvector_dim=2, row_scale=True), progress=False)
    finalize_model_(model)
    save_quantized(model, tmp_path / "packed")
    loaded = load_quantized(tmp_path / "packed")
    for name, layer in vq_layers(loaded).items():
        assert torch.equal(layer.row_scales, vq_layers(model)[name].row_scales)  # FP16-exact after finalize
    set_inference_mode_(loaded, "decode")
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 999]))
    from diffusers import DiTTransformer2DModel

    stock = DiTTransformer2DModel.from_pretrained(tmp_path / "packed")  # the diffusers backend reads scales too
    with torch.no_grad():
        a = model(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample
        b = loaded(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample
        c = stock(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(b, c)


def test_codebook_in_weight_units_is_the_same_layer_and_trains_in_weight_units():
    """``codebook_units="weight"``: the same start weight bit for bit, the codewords at the weight's
    magnitude and the scales about 1, so one RMSprop step moves the weight ~1/scale times further
    than with codewords in the scaled rows' units."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.mul_(0.05 * torch.logspace(-1, 0, 32).unsqueeze(1))
    base = VQConfig(codebook_size=16, subvector_dim=2, num_candidates=1, row_scale=True)
    scaled = VQLinear.from_linear(linear, base)
    weight = VQLinear.from_linear(linear, base.with_overrides(codebook_units="weight"))
    assert torch.equal(scaled.weight(), weight.weight())
    assert 0.3 < weight.row_scales.detach().log2().mean().exp2() < 3  # relative scales
    assert scaled.codebook.abs().mean() > 5 * weight.codebook.abs().mean()  # codewords of about 1 vs the weight's
    x = torch.randn(64, 64)
    moved = []
    for layer in (scaled, weight):
        start = layer.weight().detach().clone()
        layer.row_scales.requires_grad_(False)
        optimizer = torch.optim.RMSprop([layer.codebook], lr=1e-4, alpha=0.9)
        layer(x).pow(2).sum().backward()
        optimizer.step()
        moved.append((layer.weight().detach() - start).abs().mean().item())
    assert moved[1] > 5 * moved[0]
    with pytest.raises(ValueError, match="codebook_units"):
        VQConfig(codebook_units="rows")
