"""Hard ``VQLinear`` inference modes: ``decode`` (low memory) and ``cached`` (dense weight kept)."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import vq4dit.decoding as vq_decoding
from vq4dit.decoding import gather_codewords
from vq4dit.export import load_quantized, save_quantized
from vq4dit.models import load_dit
from vq4dit.layers import VQLinear
from vq4dit.quantize import quantize_, set_inference_mode_, vq_layers
from vq4dit.vq_config import VQConfig


def hard_layer(out_features=48, in_features=64, k=16, d=4, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return VQLinear.from_linear(linear, VQConfig(codebook_size=k, subvector_dim=d, num_candidates=1, kmeans_iters=2))


def reference(layer: VQLinear, x: torch.Tensor) -> torch.Tensor:
    """The calibration path: differentiable dense weight, plain F.linear."""
    bias = None if layer.bias is None else layer.bias.detach()
    return F.linear(x, layer.weight().detach(), bias)


def infer(layer: nn.Module, *args, **kwargs):
    with torch.no_grad():
        return layer(*args, **kwargs)


class WeightOperands(TorchFunctionMode):
    """Records the weight operand of every F.linear / torch.mm / torch.addmm call."""

    def __init__(self):
        super().__init__()
        self.weights, self.funcs = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, torch.mm, torch.addmm):
            self.weights.append(args[2] if func is torch.addmm else args[1])
            self.funcs.append(func)
        return func(*args, **kwargs)


def storage_owner(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor owning the memory of a view (``_base``), else the tensor itself."""
    return tensor._base if tensor._base is not None else tensor


# ---------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("k,d", [(256, 4), (64, 2), (16, 8), (16, 3), (4, 1)])
def test_gather_codewords_is_codebook_indexing(k, d, dtype):
    codebook = torch.randn(k, d).to(dtype)  # wide-element views for 2..16-byte codewords, row gather else
    codes = torch.randint(0, k, (1000,), dtype=torch.uint8 if k <= 256 else torch.int16)
    assert torch.equal(gather_codewords(codebook, codes), codebook[codes.long()])


@pytest.mark.parametrize("k,d,bias", [(16, 4, True), (64, 2, False), (16, 8, True)])
@pytest.mark.parametrize("mode", ["decode", "cached"])
def test_modes_equal_the_calibration_path_exactly(k, d, bias, mode):
    layer = hard_layer(k=k, d=d, bias=bias)
    layer.set_inference_mode_(mode)
    x = torch.randn(2, 5, 64)
    assert torch.equal(infer(layer, x), reference(layer, x))
    assert torch.equal(infer(layer, x), reference(layer, x))  # second call: cached weight reused
    assert torch.equal(layer.decode_weight(), layer.weight())


def test_decode_in_other_dtypes_and_autocast_equals_calibration_path():
    layer = hard_layer()
    x = torch.randn(3, 64)
    for dtype in (torch.float64, torch.bfloat16):
        expected = F.linear(x.to(dtype), layer.weight().detach().to(dtype), layer.bias.detach().to(dtype))
        assert torch.equal(infer(layer, x.to(dtype)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)  # grad mode, trainable codebook: the calibration path
        decoded = infer(layer, x)
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, expected)


def test_chunked_decode_matches_and_never_holds_more_than_a_chunk():
    layer = hard_layer(out_features=200, in_features=128, bias=True)
    x = torch.randn(6, 128)
    whole = infer(layer, x)  # one chunk
    layer.decode_chunk_elements = 64 * 128  # rows in chunks of 64: 64, 64, 64, 8
    with WeightOperands() as seen:
        chunked = infer(layer, x)
    assert [w.shape for w in seen.weights] == [(128, 64)] * 3 + [(128, 8)]  # weight.t() of each chunk
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, reference(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["decode", "cached"])
def test_decode_mode_keeps_no_dense_weight_between_calls(mode):
    layer = hard_layer(out_features=200, in_features=128)
    layer.decode_chunk_elements = 64 * 128  # 4 chunks
    layer.set_inference_mode_(mode)
    with WeightOperands() as seen:
        infer(layer, torch.randn(4, 128))
    owners = [weakref.ref(storage_owner(w)) for w in seen.weights]
    seen.weights.clear()
    workspace = {buffer.data_ptr() for buffer in vq_decoding._WORKSPACE.buffers.values()}
    alive = [ref() for ref in owners if ref() is not None and ref().data_ptr() not in workspace]
    tensors = [*layer.parameters(), *layer.buffers(), *(v for v in vars(layer).values() if torch.is_tensor(v))]
    if mode == "decode":  # only the reused per-thread chunk workspace survives, never a layer's weight
        assert alive == [] and len(owners) == 4
        assert layer.cached_weight is None and max(t.numel() for t in tensors) < 200 * 128
    else:
        assert [t.numel() for t in alive] == [200 * 128] and layer.cached_weight.shape == (200, 128)


# --------------------------------------------------------------------------------------- cache


def test_cached_weight_is_not_saved():
    layer = hard_layer()
    keys = set(layer.state_dict())
    layer.set_inference_mode_("cached")
    infer(layer, torch.randn(2, 64))
    assert layer.cached_weight is not None and set(layer.state_dict()) == keys
    assert not any("cached" in key for key in keys)
    clone = hard_layer(seed=1)
    clone.load_state_dict(layer.state_dict())
    assert clone.cached_weight is None


def test_cache_follows_codebook_and_code_changes():
    layer = hard_layer()
    layer.set_inference_mode_("cached")
    x = torch.randn(3, 64)
    infer(layer, x)
    changes = [
        lambda: layer.codebook.data.mul_(2),  # .data: no version bump, caught by the value check
        lambda: layer.codebook.add_(0.5),  # in place under no_grad (as an optimizer step)
        lambda: layer.codes.__setitem__(slice(0, 100), (layer.codes[:100] + 1) % 16),
        lambda: setattr(layer.codebook, "data", torch.randn(16, 4)),  # new storage
        lambda: layer.load_state_dict(hard_layer(seed=2).state_dict()),
    ]
    for change in changes:
        before = layer.cached_weight.clone()
        with torch.no_grad():
            change()
        out = infer(layer, x)
        assert torch.equal(out, reference(layer, x))
        assert not torch.equal(layer.cached_weight, before)


def test_cache_dropped_by_to_mode_change_and_soft_state():
    layer = hard_layer()
    layer.set_inference_mode_("cached")
    x = torch.randn(3, 64)
    infer(layer, x)
    layer.to(torch.float64)  # moving/casting drops the cache instead of converting it
    assert layer.cached_weight is None
    assert torch.equal(infer(layer, x.double()), reference(layer, x.double()))
    assert layer.cached_weight.dtype == torch.float64
    layer.set_inference_mode_("decode")
    assert layer.cached_weight is None
    with pytest.raises(ValueError, match="inference mode"):
        layer.set_inference_mode_("dense")


def test_cache_invalidated_when_finalize_hardens_soft_rows():
    torch.manual_seed(0)
    layer = VQLinear.from_linear(nn.Linear(64, 48), VQConfig(codebook_size=16, subvector_dim=4, num_candidates=2))
    layer.set_inference_mode_("cached")
    x = torch.randn(3, 64)
    soft_state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert torch.equal(infer(layer, x), reference(layer, x)) and layer.cached_weight is None  # soft: no cache
    layer.finalize_()
    hard_out = infer(layer, x)
    assert torch.equal(hard_out, reference(layer, x)) and layer.cached_weight is not None
    layer.load_state_dict(soft_state)  # back to soft rows: cache gone, soft path again
    assert layer.cached_weight is None and not layer.is_hard
    soft_out = infer(layer, x)
    assert torch.equal(soft_out, reference(layer, x)) and not torch.equal(soft_out, hard_out)
    with pytest.raises(ValueError, match="soft"):
        layer.decode_weight()


# ----------------------------------------------------------------------------------- gradients


def test_gradients_flow_in_calibration_mode():
    torch.manual_seed(0)
    layer = VQLinear.from_linear(nn.Linear(64, 48), VQConfig(codebook_size=16, subvector_dim=4, num_candidates=2))
    layer.set_inference_mode_("cached")  # must not matter while soft or training
    layer(torch.randn(5, 64)).pow(2).sum().backward()
    assert layer.candidate_logits.grad.abs().sum() > 0 and layer.codebook.grad.abs().sum() > 0
    layer.finalize_()
    grads = {}
    for mode in ("decode", "cached"):
        layer.set_inference_mode_(mode)
        layer.zero_grad()
        layer(torch.randn(5, 64, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        grads[mode] = (layer.codebook.grad.clone(), layer.bias.grad.clone())
        assert layer.cached_weight is None  # a trained codebook is never served from a cache
    assert grads["decode"][0].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(grads["decode"], grads["cached"]))
    # codebook frozen, bias trained (and input gradients): the autograd path still serves them
    layer.codebook.requires_grad_(False)
    layer.zero_grad()
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_quantized():
    torch.manual_seed(0)
    model = load_dit("tiny")
    quantize_(model, VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=2), progress=False)
    return model


def dit_forward(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model(x, timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 1000])).sample


def test_set_inference_mode_on_a_dit(tiny_quantized):
    model = tiny_quantized
    expected = dit_forward(model).detach()  # grad mode: the calibration path
    for mode in ("cached", "decode", "cached"):
        assert set_inference_mode_(model, mode) == len(vq_layers(model)) == 14
        assert all(layer.inference_mode == mode for layer in vq_layers(model).values())
        assert torch.equal(infer(dit_forward, model), expected)
        assert all((layer.cached_weight is not None) == (mode == "cached") for layer in vq_layers(model).values())
    with pytest.raises(ValueError, match="inference mode"):
        set_inference_mode_(model, "fast")
    with pytest.raises(ValueError, match="no VQLinear"):
        set_inference_mode_(nn.Sequential(nn.Linear(2, 2)), "decode")


def test_loaded_packed_model_runs_in_both_modes(tiny_quantized, tmp_path):
    expected = infer(dit_forward, tiny_quantized)
    loaded = load_quantized(save_quantized(tiny_quantized, tmp_path / "tiny-vq"))
    assert all(layer.inference_mode == "decode" for layer in vq_layers(loaded).values())
    assert torch.equal(infer(dit_forward, loaded), expected)
    set_inference_mode_(loaded, "cached")
    assert torch.equal(infer(dit_forward, loaded), expected)
    assert all(layer.cached_weight is not None for layer in vq_layers(loaded).values())
    with torch.inference_mode():
        assert torch.equal(dit_forward(loaded), expected)


def test_frozen_model_uses_the_inference_path_even_in_grad_mode():
    layer = hard_layer().requires_grad_(False)
    x = torch.randn(3, 64)
    with WeightOperands() as seen:
        out = layer(x)  # grad mode on, but nothing needs a gradient
    assert not out.requires_grad and torch.equal(out, reference(layer, x))
    assert seen.funcs == [torch.addmm]  # the decode path, not F.linear on the autograd weight()
    layer.bias.requires_grad_(True)
    with WeightOperands() as seen:
        assert layer(x).requires_grad
    assert seen.funcs == [F.linear]


def test_decode_after_inference_mode_calls():
    """Lightning's test/predict run under torch.inference_mode: a CPU decode workspace created
    there must stay usable by later no_grad forwards (it once became a read-only inference tensor)."""
    vq_decoding._WORKSPACE.__dict__.pop("buffers", None)  # the next decode allocates the workspace anew
    layer = hard_layer()
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        inside = layer(x)
    with torch.no_grad():
        outside = layer(x)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    torch.testing.assert_close(outside, reference(layer, x))
