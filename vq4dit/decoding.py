"""Hard-mode inference of ``VQLinear``: dense weights decoded from codes, chunk by chunk inside
``forward`` (``decode``, low memory) or once and kept (``cached``, FP speed).

``decode`` never holds more than one chunk of one layer's dense weight: the packed model's
memory is the codes plus a few MiB. On the CPU the chunks reuse one per-thread workspace.
"""

from __future__ import annotations

import threading
from typing import Literal, get_args

import torch

from . import kernels
from .codewords import WIDE_ROW_DTYPES

InferenceMode = Literal["decode", "cached"]
INFERENCE_MODES: tuple[str, ...] = get_args(InferenceMode)

# ``decode`` mode materialises about this many weights at a time (8 MiB in fp32; DiT-XL's 6912x1152
# in 4 chunks), whatever the layer size. On XL w2 (batch 4, glibc with a fixed mmap threshold, so
# that peaks are reproducible) the peak RSS is 940 MiB with whole layers, 935 with 1 << 21, 931 with
# 1 << 20: activations, not decoded weights, set the peak. Narrower chunks slow wide-input matmuls
# (ff.net.2 at 1024 tokens: 1 << 20 ~15 % slower); at 1 << 21 an XL block's Linears time as whole.
DECODE_CHUNK_ELEMENTS = 1 << 21


_WORKSPACE = threading.local()  # per thread: {(dtype, role): flat CPU buffer} reused by decode chunks


def _cpu_workspace(dtype: torch.dtype, role: str, numel: int) -> torch.Tensor:
    """A per-thread flat CPU buffer of ``numel`` elements, reused by every decode chunk of every
    layer. A fresh multi-MiB tensor per chunk is mmapped by glibc and page-faulted on each call:
    4 XL w2 blocks at batch 1 took 1.39x the FP CPU time with ~13k minor faults per block, 1.10x
    with this workspace (no faults)."""
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    buffer = buffers.get((dtype, role))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buffers[(dtype, role)] = buffer = torch.empty(numel, dtype=dtype, device="cpu")
    return buffer[:numel]


def gather_codewords(codebook: torch.Tensor, codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``codebook[codes]`` without autograd: ``codebook [k, d]``, ``codes [N]`` (any integer dtype)
    -> ``[N, d]`` in the codebook's dtype, bit-identical to ``codebook[codes.long()]``.

    Each codeword is viewed as one wide element (``d * itemsize`` bytes, e.g. 16 B for d=4 fp32)
    and the codes are widened to int32 only (``index_select`` needs int32/int64), never to int64.
    ``out``: optional contiguous ``[N * d]`` buffer of the codebook's dtype to write into.
    With the Triton backend (``vq4dit.kernels``) CUDA tensors take the fused decode kernel.
    """
    if kernels.runs_triton(codebook):
        from .kernels.decode_triton import decode

        return decode(codebook, codes, out=out)
    index = codes if codes.dtype in (torch.int32, torch.int64) else codes.to(torch.int32)
    codebook = codebook.detach().contiguous()
    num, dim = index.numel(), codebook.shape[1]
    out = torch.empty(num * dim, dtype=codebook.dtype, device=codebook.device) if out is None else out
    wide = WIDE_ROW_DTYPES.get(dim * codebook.element_size())
    if wide is None:  # e.g. d=8 fp32 (32 B): plain row gather
        return torch.index_select(codebook, 0, index, out=out.view(num, dim))
    torch.index_select(codebook.view(-1).view(wide), 0, index, out=out.view(wide))  # [N] wide words
    return out.view(num, dim)


def _version(tensor: torch.Tensor) -> int:
    """In-place write counter (inference tensors have none: -1)."""
    return -1 if tensor.is_inference() else tensor._version


class HardDecoding:
    """The inference modes of a hard ``VQLinear`` (a mixin: it uses the layer's ``codebook``,
    ``codes``, ``bias``, ``row_scales``, ``in_features``/``out_features``, ``num_soft``, ``inference_mode``,
    ``decode_chunk_elements`` and the non-persistent ``cached_weight`` buffer)."""

    @torch.no_grad()
    def decode_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[out, in]`` of a hard layer, decoded directly in ``dtype`` (default: the
        codebook's) from the compact codes; no autograd. Equals ``weight().to(dtype)`` bit for bit."""
        if self.num_soft:
            raise ValueError(f"decode_weight needs a hard layer; {self.num_soft} rows are soft (finalize_() first)")
        if self.row_scales is not None:  # scaled in the codebook's dtype, as weight() does
            weight = gather_codewords(self.codebook, self.codes).view(self.out_features, self.in_features)
            weight = weight * self.row_scales.detach().unsqueeze(1).to(weight.dtype)
            return weight if dtype is None else weight.to(dtype)
        codebook = self.codebook if dtype is None else self.codebook.to(dtype)
        return gather_codewords(codebook, self.codes).view(self.out_features, self.in_features)

    def set_inference_mode_(self, mode: InferenceMode) -> None:
        """``decode`` (low memory) or ``cached`` (dense weight kept); leaving ``cached`` frees the cache."""
        if mode not in INFERENCE_MODES:
            raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
        self.inference_mode = mode
        if mode != "cached":
            self.clear_cached_weight_()

    def clear_cached_weight_(self) -> None:
        """Drop the cached dense weight (rebuilt on the next ``cached`` forward)."""
        self.cached_weight = None
        self._cache_key = self._cache_codebook = None

    def _current_key(self) -> tuple:
        scales = self.row_scales
        scale_key = () if scales is None else (scales.data_ptr(), _version(scales), scales.detach().sum().item())
        return (self.codebook.data_ptr(), _version(self.codebook), self.codes.data_ptr(), _version(self.codes), *scale_key)

    def _dense_cached(self) -> torch.Tensor:
        """The cached dense weight ``[out, in]`` (codebook dtype), re-decoded whenever the codebook
        or codes changed since it was built (pointers, in-place write counters, codebook values)."""
        cached = self.cached_weight
        valid = (
            cached is not None and self._cache_key == self._current_key()
            and not (cached.is_inference() and not torch.is_inference_mode_enabled())  # unusable outside
            and torch.equal(self._cache_codebook, self.codebook.detach())  # catches codebook.data writes
        )
        if not valid:
            self.clear_cached_weight_()  # free the stale weight before decoding the new one
            self.cached_weight = self.decode_weight()
            self._cache_key = self._current_key()
            self._cache_codebook = self.codebook.detach().clone()
        return self.cached_weight

    @torch.no_grad()
    def _decode_linear(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``decode`` mode: ``x [..., in] -> [..., out]`` in ``dtype``, decoding the weight in chunks
        of output rows (at most ``decode_chunk_elements`` weights, rounded up to 64 rows) whose
        matmul writes straight into its column slice of the output. On the CPU every chunk reuses
        one per-thread workspace (no allocation, no page faults); elsewhere each chunk is freed."""
        x2d = x.reshape(-1, self.in_features).to(dtype)  # [T, in]
        out = torch.empty(x2d.shape[0], self.out_features, dtype=dtype, device=x.device)  # [T, out]
        codebook = self.codebook.detach().to(dtype)
        codes = self.codes.view(self.out_features, -1)  # [out, in / d]
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        scales = None if self.row_scales is None else self.row_scales.detach().to(dtype)
        num_chunks = -(-self.out_features * self.in_features // max(self.decode_chunk_elements, 1))  # ceil
        rows_per_chunk = -(-self.out_features // num_chunks)
        rows = min(self.out_features, -(-rows_per_chunk // 64) * 64)  # a multiple of 64: gemm-friendly
        on_cpu = x.device.type == "cpu"
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            chunk_codes = codes[start:stop].reshape(-1)  # [rows * in / d]
            buffer = None
            if on_cpu:
                chunk_codes = _cpu_workspace(torch.int32, "codes", chunk_codes.numel()).copy_(chunk_codes)
                buffer = _cpu_workspace(dtype, "weight", (stop - start) * self.in_features)
            weight = gather_codewords(codebook, chunk_codes, out=buffer).view(-1, self.in_features)
            if scales is not None:
                weight.mul_(scales[start:stop].unsqueeze(1))
            if bias is None:
                torch.mm(x2d, weight.t(), out=out[:, start:stop])
            else:
                torch.addmm(bias[start:stop], x2d, weight.t(), out=out[:, start:stop])
        return out.view(*x.shape[:-1], self.out_features)
