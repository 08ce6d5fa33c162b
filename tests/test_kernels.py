"""The Triton kernels (vq4dit.kernels) against the PyTorch path: values and gradients of the soft
reconstruction, the fused hard decode, the backend switch.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before any
kernel is defined); with CUDA and the interpreter off they run on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before vq4dit.kernels.* defines its kernels

import pytest

triton = pytest.importorskip("triton")

from vq4dit import kernels  # noqa: E402
from vq4dit.kernels.decode_triton import decode  # noqa: E402
from vq4dit.kernels.soft_triton import vq_weight as triton_vq_weight  # noqa: E402
from vq4dit.layers import VQLinear  # noqa: E402
from vq4dit.soft import vq_weight  # noqa: E402
from vq4dit.vq_config import VQConfig  # noqa: E402

DEVICE = "cpu" if kernels.interpreter_on() else "cuda"


@pytest.fixture(autouse=True)
def _torch_backend():
    kernels.set_backend("torch")
    yield
    kernels.set_backend("torch")


def make_layer_tensors(num_rows, k, d, n, soft_fraction, pruned, dtype, code_dtype=torch.uint8, seed=0):
    """Random codebook [k, d], codes [N], ascending soft_rows [S], candidates [S, n], logits [S, n]
    (``pruned``: some non-best logits set to -inf)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g).to(dtype)
    codes = torch.randint(0, k, (num_rows,), generator=g).to(code_dtype)
    num_soft = round(num_rows * soft_fraction)
    soft_rows = torch.randperm(num_rows, generator=g)[:num_soft].sort().values.int()
    candidates = torch.argsort(torch.rand(num_soft, k, generator=g), dim=1)[:, :n].to(code_dtype)  # distinct per row
    logits = torch.randn(num_soft, n, generator=g) * 2
    if pruned and n > 1:
        dead = torch.rand(num_soft, n, generator=g) < 0.3
        dead[:, 0] = False
        logits[dead] = float("-inf")
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(codebook), to(codes), to(soft_rows), to(candidates), to(logits)


def run(fn, codebook, codes, soft_rows, candidates, logits, seed=1):
    """Forward, then backward of a fixed random weighting: (value, d codebook, d logits)."""
    codebook = codebook.clone().requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    out = fn(codebook, codes, soft_rows, candidates, logits)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    (out.float() * weights.float()).sum().backward()
    return out.detach(), codebook.grad, logits.grad


@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("soft_fraction", [0.0, 0.4, 1.0])
def test_soft_reconstruction_matches_torch_fp32(d, n, soft_fraction):
    tensors = make_layer_tensors(300, 16, d, n, soft_fraction, pruned=True, dtype=torch.float32)
    want = run(vq_weight, *tensors)
    got = run(triton_vq_weight, *tensors)
    for name, a, b in zip(("value", "grad codebook", "grad logits"), got, want):
        if b is None or (b.numel() == 0):
            assert a is None or a.numel() == 0, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_hard_rows_are_bit_identical_and_pruned_logits_get_zero_gradient():
    codebook, codes, soft_rows, candidates, logits = make_layer_tensors(200, 32, 4, 3, 0.5, pruned=True, dtype=torch.float32)
    value, _, grad_logits = run(triton_vq_weight, codebook, codes, soft_rows, candidates, logits)
    hard = torch.ones(200, dtype=torch.bool, device=DEVICE)
    hard[soft_rows.long()] = False
    assert torch.equal(value[hard], codebook[codes.long()][hard])
    dead = torch.isinf(logits)
    assert dead.any() and torch.all(grad_logits[dead] == 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's -inf - -inf
def test_all_pruned_row_gives_nan_like_torch():
    codebook, codes, soft_rows, candidates, logits = make_layer_tensors(40, 8, 2, 2, 1.0, pruned=False, dtype=torch.float32)
    logits[3] = float("-inf")
    want = vq_weight(codebook, codes, soft_rows, candidates, logits)
    got = triton_vq_weight(codebook, codes, soft_rows, candidates, logits)
    assert torch.isnan(got[3]).all() and torch.isnan(want[3]).all()
    keep = torch.arange(40, device=DEVICE) != 3
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("code_dtype", [torch.uint8, torch.int16, torch.int32])
def test_soft_reconstruction_code_dtypes(code_dtype):
    tensors = make_layer_tensors(100, 64, 2, 2, 0.5, pruned=False, dtype=torch.float32, code_dtype=code_dtype)
    for a, b in zip(run(triton_vq_weight, *tensors), run(vq_weight, *tensors)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [2, 4])
def test_soft_reconstruction_bf16_codebook(d):
    """bf16 codebook: the PyTorch path rounds after each candidate and accumulates the codebook
    gradient in bf16; the kernel works in fp32 and rounds once (the interpreter truncates fp32 ->
    bf16 instead of rounding). Both are compared with the fp32 computation on the same inputs:
    the kernel within bf16 rounding, and never further off than the PyTorch path."""
    tensors = make_layer_tensors(256, 16, d, 2, 0.6, pruned=True, dtype=torch.bfloat16)
    exact = run(vq_weight, tensors[0].float(), *tensors[1:])
    want = run(vq_weight, *tensors)
    got = run(triton_vq_weight, *tensors)
    for name, a, b, ref in zip(("value", "grad codebook", "grad logits"), got, want, exact):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), ref.float(), rtol=2 ** -6, atol=1e-2, msg=name)
        assert (a.float() - ref).abs().max() <= (b.float() - ref).abs().max() + 1e-2, name


def test_logits_only_gradient_frozen_codebook():
    """The soft phase of calibration (codebook frozen): only the logits get a gradient."""
    codebook, codes, soft_rows, candidates, logits = make_layer_tensors(128, 16, 4, 2, 1.0, pruned=False, dtype=torch.float32)
    outs = []
    for fn in (vq_weight, triton_vq_weight):
        lg = logits.clone().requires_grad_(True)
        fn(codebook, codes, soft_rows, candidates, lg).square().sum().backward()
        outs.append(lg.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("code_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("d", [2, 4])
def test_fused_decode_is_the_gather(dtype, code_dtype, d):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, d, generator=g).to(DEVICE)
    codes = torch.randint(0, 64, (1000,), generator=g).to(code_dtype).to(DEVICE)
    want = codebook.to(dtype)[codes.long()]
    assert torch.equal(decode(codebook, codes, dtype=dtype), want)
    out = torch.empty(1000 * d, dtype=dtype, device=DEVICE)
    got = decode(codebook.to(dtype), codes, out=out)
    assert torch.equal(got, want) and got.data_ptr() == out.data_ptr()


def test_backend_switch_routes_layer_and_decode(monkeypatch):
    """With the Triton backend a VQLinear's weight, gradient and hard decode go through the kernels
    and agree with the PyTorch backend."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16).to(DEVICE)
    layer = VQLinear.from_linear(linear, VQConfig(codebook_size=16, subvector_dim=4, num_candidates=2, kmeans_iters=2))
    x = torch.randn(5, 32, device=DEVICE)
    import vq4dit.kernels.decode_triton as decode_module
    import vq4dit.kernels.soft_triton as soft_module

    soft_calls = []
    real_soft = soft_module.vq_weight
    monkeypatch.setattr(soft_module, "vq_weight", lambda *a: soft_calls.append(1) or real_soft(*a))
    results = {}
    for name in ("torch", "triton"):
        kernels.set_backend(name)
        layer.zero_grad(set_to_none=True)
        layer.codebook.requires_grad_(True)
        y = layer(x)
        y.square().sum().backward()
        results[name] = (y.detach(), layer.codebook.grad.clone(), layer.candidate_logits.grad.clone())
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(soft_calls) == 1  # the torch backend never reached the kernels
    calls = []
    real = decode_module.decode
    monkeypatch.setattr(decode_module, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer.finalize_()
    with torch.no_grad():
        kernels.set_backend("torch")
        want = layer(x)
        kernels.set_backend("triton")
        got = layer(x)
    assert calls and torch.equal(got, want)


def test_backend_selection_errors(monkeypatch):
    with pytest.raises(ValueError, match="VQ4DIT_KERNELS"):
        kernels.set_backend("cuda")
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install"):
        kernels.use_triton(True)
    kernels.use_triton(False)
    assert kernels.backend() == "torch"
