"""The soft reconstruction ``vq_weight`` (``vq4dit.soft``) as Triton kernels.

Same signature, values and gradients as ``vq4dit.soft.vq_weight`` (checked by
tests/test_kernels.py under the interpreter). Per soft row ``s`` with candidates ``c[s, m]`` and
logits ``l[s, m]`` (``-inf``: pruned):

    forward:   r = softmax(l[s]);  out[soft_rows[s]] = sum_m r_m codebook[c[s, m]]
    backward:  g = grad[soft_rows[s]];  dr_m = <g, codebook[c[s, m]]>
               dl[s, m] = r_m (dr_m - sum_j r_j dr_j);   dcodebook[c[s, m]] += r_m g

Everything is computed in float32 in registers; nothing ``[S, n, d]`` is ever written. Hard rows
come from the fused decode (forward) and ``index_add_`` (backward, as the PyTorch path). The
codebook gradient of soft rows is accumulated with float32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_triton import decode

BLOCK_SOFT = 128


@triton.jit
def _ratios(logits_ptr, rows, row_ok, NUM_CAND: tl.constexpr, CAND_P2: tl.constexpr):
    """Softmax over the candidates: ``[BLOCK, CAND_P2]`` float32 (padding columns 0) and the mask."""
    cand = tl.arange(0, CAND_P2)
    cand_ok = row_ok[:, None] & (cand[None, :] < NUM_CAND)
    logits = tl.load(logits_ptr + rows[:, None] * NUM_CAND + cand[None, :], mask=cand_ok,
                     other=float("-inf")).to(tl.float32)
    top = tl.where(row_ok, tl.max(logits, axis=1), 0.0)  # a row all -inf: NaN ratios, as torch.softmax
    exps = tl.exp(logits - top[:, None])
    exps = tl.where(cand[None, :] < NUM_CAND, exps, 0.0)
    total = tl.where(row_ok, tl.sum(exps, axis=1), 1.0)  # rows past the end: no 0 / 0
    return exps / total[:, None], cand, cand_ok


@triton.jit
def _soft_forward_kernel(codebook_ptr, logits_ptr, cand_ptr, soft_rows_ptr, out_ptr, num_soft,
                         DIM: tl.constexpr, DIM_P2: tl.constexpr, NUM_CAND: tl.constexpr,
                         CAND_P2: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # soft row numbers [BLOCK]
    row_ok = rows < num_soft
    ratios, cand, cand_ok = _ratios(logits_ptr, rows, row_ok, NUM_CAND, CAND_P2)  # [BLOCK, CAND_P2]
    index = tl.load(cand_ptr + rows[:, None] * NUM_CAND + cand[None, :], mask=cand_ok, other=0).to(tl.int64)
    cols = tl.arange(0, DIM_P2)
    col_ok = cols < DIM
    mask3 = cand_ok[:, :, None] & col_ok[None, None, :]
    words = tl.load(codebook_ptr + index[:, :, None] * DIM + cols[None, None, :], mask=mask3,
                    other=0.0).to(tl.float32)  # [BLOCK, CAND_P2, DIM_P2]
    mixed = tl.sum(words * ratios[:, :, None], axis=1)  # [BLOCK, DIM_P2]
    target = tl.load(soft_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mask2 = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + target[:, None] * DIM + cols[None, :], mixed.to(out_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _soft_backward_kernel(codebook_ptr, logits_ptr, cand_ptr, soft_rows_ptr, grad_ptr,
                          grad_logits_ptr, grad_codebook_ptr, num_soft,
                          DIM: tl.constexpr, DIM_P2: tl.constexpr, NUM_CAND: tl.constexpr,
                          CAND_P2: tl.constexpr, BLOCK: tl.constexpr,
                          NEED_LOGITS: tl.constexpr, NEED_CODEBOOK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < num_soft
    ratios, cand, cand_ok = _ratios(logits_ptr, rows, row_ok, NUM_CAND, CAND_P2)
    index = tl.load(cand_ptr + rows[:, None] * NUM_CAND + cand[None, :], mask=cand_ok, other=0).to(tl.int64)
    cols = tl.arange(0, DIM_P2)
    col_ok = cols < DIM
    target = tl.load(soft_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mask2 = row_ok[:, None] & col_ok[None, :]
    grad = tl.load(grad_ptr + target[:, None] * DIM + cols[None, :], mask=mask2, other=0.0).to(tl.float32)  # [BLOCK, DIM_P2]
    mask3 = cand_ok[:, :, None] & col_ok[None, None, :]
    if NEED_LOGITS:
        words = tl.load(codebook_ptr + index[:, :, None] * DIM + cols[None, None, :], mask=mask3,
                        other=0.0).to(tl.float32)
        dratio = tl.sum(words * grad[:, None, :], axis=2)  # [BLOCK, CAND_P2]
        dlogits = ratios * (dratio - tl.sum(ratios * dratio, axis=1)[:, None])
        tl.store(grad_logits_ptr + rows[:, None] * NUM_CAND + cand[None, :], dlogits, mask=cand_ok)
    if NEED_CODEBOOK:
        tl.atomic_add(grad_codebook_ptr + index[:, :, None] * DIM + cols[None, None, :],
                      ratios[:, :, None] * grad[:, None, :], mask=mask3)


def _launch_args(codebook: torch.Tensor, candidates: torch.Tensor) -> dict:
    dim, num_cand = codebook.shape[1], candidates.shape[1]
    return {"DIM": dim, "DIM_P2": triton.next_power_of_2(dim), "NUM_CAND": num_cand,
            "CAND_P2": triton.next_power_of_2(num_cand), "BLOCK": BLOCK_SOFT}


class VQWeightTriton(torch.autograd.Function):
    """``vq4dit.soft._VQWeight`` on Triton kernels (same arguments, same saved tensors)."""

    @staticmethod
    def forward(ctx, codebook, candidate_logits, codes, soft_rows, candidates):
        with torch.profiler.record_function("vq4dit::vq_weight_triton"), torch.autocast(codebook.device.type, enabled=False):
            ctx.save_for_backward(codebook, candidate_logits, codes, soft_rows, candidates)
            num_soft, num = soft_rows.numel(), codes.numel()
            dim = codebook.shape[1]
            if num_soft == num:  # every row soft: no hard row to decode
                out = torch.empty(num, dim, dtype=codebook.dtype, device=codebook.device)
            else:
                out = decode(codebook, codes)
            if num_soft:
                _soft_forward_kernel[(triton.cdiv(num_soft, BLOCK_SOFT),)](
                    codebook.detach().contiguous(), candidate_logits.detach().contiguous(),
                    candidates.contiguous(), soft_rows.contiguous(), out, num_soft,
                    **_launch_args(codebook, candidates))
            return out

    @staticmethod
    def backward(ctx, grad_flat):
        codebook, candidate_logits, codes, soft_rows, candidates = ctx.saved_tensors
        with torch.profiler.record_function("vq4dit::vq_weight_triton_backward"), \
                torch.autocast(codebook.device.type, enabled=False):
            grad_flat = grad_flat.to(codebook.dtype).contiguous()
            num_soft, all_soft = soft_rows.numel(), soft_rows.numel() == codes.numel()
            need_codebook, need_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and num_soft > 0
            grad_codebook = grad_logits = None
            if need_codebook:
                grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
                if not all_soft:  # hard rows: as the PyTorch path
                    grad_hard = grad_flat if not num_soft else grad_flat.index_fill(0, soft_rows.long(), 0.0)
                    grad_codebook.index_add_(0, codes.int(), grad_hard.float())
            if num_soft and (need_codebook or need_logits):
                if need_logits:
                    grad_logits = torch.empty(candidate_logits.shape, dtype=torch.float32, device=codebook.device)
                _soft_backward_kernel[(triton.cdiv(num_soft, BLOCK_SOFT),)](
                    codebook.detach().contiguous(), candidate_logits.detach().contiguous(),
                    candidates.contiguous(), soft_rows.contiguous(), grad_flat,
                    grad_logits if need_logits else grad_flat,  # unused pointer when not needed
                    grad_codebook if need_codebook else grad_flat, num_soft,
                    NEED_LOGITS=need_logits, NEED_CODEBOOK=need_codebook,
                    **_launch_args(codebook, candidates))
                if need_logits:
                    grad_logits = grad_logits.to(candidate_logits.dtype)
            if grad_codebook is not None:
                grad_codebook = grad_codebook.to(codebook.dtype)
        return grad_codebook, grad_logits, None, None, None


def vq_weight(codebook, codes, soft_rows, candidates, candidate_logits) -> torch.Tensor:
    """``vq4dit.soft.vq_weight`` on the Triton kernels."""
    return VQWeightTriton.apply(codebook, candidate_logits, codes, soft_rows, candidates)
