"""Soft assignment: candidate ratios, the weighted-average reconstruction of the sub-vectors
(paper Eq. 7) and the ratio regulariser (Eq. 9-10), differentiable at O(1) extra memory.

Custom autograd functions keep only the layer's own tensors for the backward and recompute the
cheap O(S n d) ratios and gathers there; ``S`` soft sub-vectors, ``n`` candidates, ``d`` dims.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import kernels
from .codewords import WIDE_ROW_DTYPES
RegularizerKind = Literal["paper", "official"]



def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table [k, d]`` rows at ``index [S]`` (int32/int64): ``[S, d]``, bit-identical to
    ``index_select``; rows are viewed as one wide element unless autograd needs the table."""
    wide = WIDE_ROW_DTYPES.get(table.shape[1] * table.element_size())
    if wide is None or (torch.is_grad_enabled() and table.requires_grad):
        return table.index_select(0, index)
    words = table.detach().contiguous().view(-1).view(wide)  # [k]
    return words.index_select(0, index).view(table.dtype).view(-1, table.shape[1])


def _candidate_ratios_t(candidate_logits: torch.Tensor) -> torch.Tensor:
    """Ratios, transposed: ``[n, S]`` float32 (contiguous per candidate).

    A softmax over rows of width 2-4 runs ~25x slower on the CPU than over S contiguous columns,
    hence the transpose; for n = 2 the softmax is the sigmoid of the logit difference.
    """
    logits = candidate_logits.float()
    if logits.shape[1] == 2:
        difference = logits[:, 0] - logits[:, 1]
        return torch.sigmoid(torch.stack([difference, -difference]))
    return torch.softmax(logits.t().contiguous(), dim=0)


def candidate_ratios(candidate_logits: torch.Tensor) -> torch.Tensor:
    """Softmax of ``candidate_logits [S, n]`` over the candidates: ratios ``[S, n]`` (float32,
    a transposed view; see ``_candidate_ratios_t``)."""
    return _candidate_ratios_t(candidate_logits).t()


def _mix_candidates(codebook: torch.Tensor, index: torch.Tensor, ratios_t: torch.Tensor) -> torch.Tensor:
    """``sum_m ratios_t[m, s] * codebook[index[s, m]]``: ``[S, d]`` in the codebook's dtype.

    One ``[S, d]`` gather per candidate instead of an ``[S, n, d]`` tensor (``index [S, n]`` int32).
    """
    ratios_t = ratios_t.to(codebook.dtype)
    mixed = _gather_rows(codebook, index[:, 0]) * ratios_t[0].unsqueeze(1)
    for m in range(1, index.shape[1]):
        mixed.addcmul_(_gather_rows(codebook, index[:, m]), ratios_t[m].unsqueeze(1))
    return mixed


def soft_reconstruct(
    codebook: torch.Tensor, candidates: torch.Tensor, candidate_logits: torch.Tensor
) -> torch.Tensor:
    """Weighted average of candidate codewords (paper Eq. 7): ``[S, d]``.

    Args:
        codebook: ``[k, d]``.
        candidates: ``[S, n]`` codeword indices (any integer dtype).
        candidate_logits: ``[S, n]``; ratios = softmax over the candidates.
    """
    return _mix_candidates(codebook, candidates.int(), _candidate_ratios_t(candidate_logits))


def _soft_mix(codebook: torch.Tensor, index: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """The soft rows' forward: ratios and weighted candidates, ``[S, d]`` (``index [S, n]`` int32).
    A module-level name: ``benchmarks/throughput.py --compile`` swaps in a ``torch.compile`` of it."""
    return _mix_candidates(codebook, index, _candidate_ratios_t(candidate_logits))


def _soft_logits_grad(grad_soft: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor,
                      candidate_logits: torch.Tensor) -> torch.Tensor:
    """d loss / d logits ``[S, n]`` of the soft rows from their output gradient ``grad_soft [S, d]``:
    d loss / d ratio_m = <grad, codeword_m>, then the softmax Jacobian (swappable as ``_soft_mix``)."""
    ratios_t = _candidate_ratios_t(candidate_logits)  # [n, S]
    dratio = torch.stack([
        torch.einsum("sd,sd->s", grad_soft, _gather_rows(codebook, index[:, m])).float()
        for m in range(index.shape[1])
    ])  # [n, S]
    dlogits = ratios_t * (dratio - (ratios_t * dratio).sum(0, keepdim=True))
    return dlogits.t().contiguous().to(candidate_logits.dtype)


class _VQWeight(torch.autograd.Function):
    """Dense sub-vectors ``[N, d]`` of a VQ layer: hard rows ``codebook[codes]``, soft rows the
    ratio-weighted candidates (Eq. 7), without keeping intermediates for the backward.

    Plain autograd (gather, softmax, einsum, index_copy) keeps, per layer until the backward, the
    gathered candidates ``[S, n, d]``, the ratios ``[S, n]`` and an int64 copy of ``soft_rows``:
    with n = 2, 48 bytes per sub-vector at w2 and 32 at w3, i.e. 8.0 / 10.7 GB on DiT-XL/2. This
    saves only references to the layer's own tensors and recomputes the cheap O(S n d) ratios and
    gathers in the backward.
    """

    @staticmethod
    def forward(ctx, codebook, candidate_logits, codes, soft_rows, candidates):
        # autocast off: the mix is exact float32 work (einsum would otherwise run in bf16)
        with torch.profiler.record_function("vq4dit::vq_weight"), torch.autocast(codebook.device.type, enabled=False):
            ctx.save_for_backward(codebook, candidate_logits, codes, soft_rows, candidates)
            num_soft = soft_rows.numel()
            if num_soft == 0:
                return _gather_rows(codebook, codes.int())
            mixed = _soft_mix(codebook, candidates.int(), candidate_logits)
            if num_soft == codes.numel():  # every row soft: soft_rows is 0..N-1 (kept ascending)
                return mixed
            flat = _gather_rows(codebook, codes.int())
            return flat.index_copy_(0, soft_rows.long(), mixed)

    @staticmethod
    def backward(ctx, grad_flat):
        codebook, candidate_logits, codes, soft_rows, candidates = ctx.saved_tensors
        with torch.profiler.record_function("vq4dit::vq_weight_backward"), \
                torch.autocast(codebook.device.type, enabled=False):
            grad_flat = grad_flat.to(codebook.dtype)
            num_soft, all_soft = soft_rows.numel(), soft_rows.numel() == codes.numel()
            grad_codebook = grad_logits = None
            if ctx.needs_input_grad[0]:
                grad_codebook = torch.zeros_like(codebook)
                if not all_soft:  # hard rows: each sub-vector's gradient goes to its code
                    grad_hard = grad_flat
                    if num_soft:
                        grad_hard = grad_flat.index_fill(0, soft_rows.long(), 0.0)
                    grad_codebook.index_add_(0, codes.int(), grad_hard)
            if num_soft:
                grad_soft = grad_flat if all_soft else grad_flat.index_select(0, soft_rows)  # [S, d]
                index = candidates.int()
                if ctx.needs_input_grad[1]:
                    grad_logits = _soft_logits_grad(grad_soft, codebook, index, candidate_logits)
                if grad_codebook is not None:
                    ratios_t = _candidate_ratios_t(candidate_logits)  # [n, S]
                    for m in range(index.shape[1]):
                        grad_codebook.index_add_(0, index[:, m], grad_soft * ratios_t[m].unsqueeze(1).to(grad_soft.dtype))
        return grad_codebook, grad_logits, None, None, None


def vq_weight(
    codebook: torch.Tensor,
    codes: torch.Tensor,
    soft_rows: torch.Tensor,
    candidates: torch.Tensor,
    candidate_logits: torch.Tensor,
) -> torch.Tensor:
    """The dense sub-vectors ``[N, d]`` of a (partly) soft VQ layer, differentiable in the
    codebook and the ratio logits at O(1) extra memory until the backward.

    Args:
        codebook: ``[k, d]``.
        codes: ``[N]`` codes, used for the hard rows.
        soft_rows: ``[S]`` ascending indices of the soft sub-vectors (S = N: all soft).
        candidates: ``[S, n]`` codeword indices of the soft rows.
        candidate_logits: ``[S, n]`` ratio logits of the soft rows (-inf = pruned candidate).

    With the Triton backend (``vq4dit.kernels``, ``VQ4DIT_KERNELS=triton``) CUDA tensors take the
    fused kernels of ``vq4dit.kernels.soft_triton`` (same values and gradients).
    """
    if kernels.runs_triton(codebook):
        from .kernels.soft_triton import vq_weight as triton_vq_weight

        return triton_vq_weight(codebook, codes, soft_rows, candidates, candidate_logits)
    return _VQWeight.apply(codebook, candidate_logits, codes, soft_rows, candidates)


def _penalty_value(ratios: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "paper":
        return (1.0 - (2.0 * ratios - 1.0).abs()).mean()
    return ratios.shape[1] * (ratios * (1.0 - ratios)).mean()


def _penalty_grad(ratios: torch.Tensor, kind: str, grad: torch.Tensor) -> torch.Tensor:
    """d penalty / d ratios (closed form), times the upstream ``grad``."""
    scale = grad / ratios.numel()
    if kind == "paper":  # d(1 - |2r - 1|)/dr = -2 sign(2r - 1)
        return torch.sign(2.0 * ratios - 1.0) * (-2.0 * scale)
    return (1.0 - 2.0 * ratios) * (ratios.shape[1] * scale)


class _RatioPenalty(torch.autograd.Function):
    """The ratio regulariser with a closed-form backward: autograd would keep ``1 - r`` (or
    ``2r - 1``) next to ``r``, one more ``[S, n]`` float32 tensor per soft layer until the backward."""

    @staticmethod
    def forward(ctx, ratios, kind):
        ctx.save_for_backward(ratios)
        ctx.kind = kind
        return _penalty_value(ratios, kind)

    @staticmethod
    def backward(ctx, grad):
        (ratios,) = ctx.saved_tensors
        return _penalty_grad(ratios, ctx.kind, grad), None


class _LogitPenalty(torch.autograd.Function):
    """The ratio regulariser taken from the logits: keeps nothing but the logits (a parameter)
    for the backward, where the ratios are recomputed (saves one ``[S, n]`` float32 per layer)."""

    @staticmethod
    def forward(ctx, candidate_logits, kind):
        ctx.save_for_backward(candidate_logits)
        ctx.kind = kind
        return _penalty_value(candidate_ratios(candidate_logits), kind)

    @staticmethod
    def backward(ctx, grad):
        (candidate_logits,) = ctx.saved_tensors
        ratios_t = _candidate_ratios_t(candidate_logits)  # [n, S]
        dratio = _penalty_grad(ratios_t.t(), ctx.kind, grad).t()  # [n, S]
        dlogits = ratios_t * (dratio - (ratios_t * dratio).sum(0, keepdim=True))  # softmax Jacobian
        return dlogits.t().contiguous().to(candidate_logits.dtype), None


def _check_regularizer(kind: str) -> None:
    if kind not in ("paper", "official"):
        raise ValueError(f"unknown ratio regularizer {kind!r}; expected 'paper' or 'official'")


def ratio_regularizer(ratios: torch.Tensor, kind: RegularizerKind = "paper") -> torch.Tensor:
    """Mean ratio penalty over ``ratios [S, n]``: 0 when one-hot, largest at 0.5.

    ``paper`` (Eq. 9): mean of ``1 - |2r - 1|``; ``official``: ``n * mean(r (1 - r))``.
    An empty input gives 0.
    """
    if ratios.numel() == 0:
        return ratios.new_zeros(())
    _check_regularizer(kind)
    return _RatioPenalty.apply(ratios, kind)


def logit_regularizer(candidate_logits: torch.Tensor, kind: RegularizerKind = "paper") -> torch.Tensor:
    """``ratio_regularizer(candidate_ratios(candidate_logits), kind)`` without keeping the ratios
    for the backward (1x the logits' memory less per soft layer: 2.7 GB on DiT-XL/2 at w3)."""
    if candidate_logits.numel() == 0:
        return candidate_logits.new_zeros((), dtype=torch.float32)
    _check_regularizer(kind)
    return _LogitPenalty.apply(candidate_logits, kind)
