"""Assignment with error feedback (GPTQ / GPTVQ): sub-vectors are assigned one column group at a
time, and each group's output error is compensated on the columns not assigned yet.

For one layer with input second moments ``H = E[x x^T]`` the output error of row ``w`` quantized
to ``q`` is ``(w - q)^T H (w - q)``. Assigning the ``d`` columns of group ``g`` and then moving the
remaining columns by the optimal brain surgeon update (through the upper Cholesky factor ``U`` of
``H^-1``) lets later codewords absorb earlier errors; within a group the codewords are chosen under
the metric ``sum_j (w_j - c_j)^2 / U_jj^2``, the error each column's quantization causes.

GPTQ updates column by column inside a group; the same update in closed form is one product per
group: the scaled errors of the group's columns are ``E_g = (W_g - Q_g) U_gg^-1`` (``U_gg`` the
group's ``d x d`` block of ``U``), and the later columns move by ``-E_g U_g,later``. Several
codebooks of one layer (the bit-allocation probe's options) share ``H``, its factor and the order,
so :func:`error_feedback_assign_many` runs them in one pass: one set of kernels per column group for
all of them (the work is launch-bound on a GPU: thousands of groups of small kernels).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .codewords import init_candidate_logits

# Options of one layer processed together while their distance block [options, out, k] stays below this.
_BATCH_BYTES = 1 << 29


@torch.no_grad()
def error_feedback_assign(
    weight: torch.Tensor, codebook: torch.Tensor, hessian: torch.Tensor, num_nearest: int = 1, damping: float = 0.01,
    order: str = "activation",
    ratio_init: str = "inverse_distance",
    block_columns: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of every sub-vector of ``weight`` chosen with error feedback across columns.

    Args:
        weight: ``[out, in]`` (already divided by its row scales, if any).
        codebook: ``[k, d]`` codewords, ``d`` dividing ``in``.
        hessian: ``[in, in]`` input second moments ``E[x x^T]`` of the layer.
        num_nearest: candidates ``n`` per sub-vector. The error fed forward is the one of the
            weight the layer starts calibration with: the nearest codeword for ``n = 1``, the
            candidates mixed by their initial ratios (``ratio_init``) for ``n > 1``, so the soft
            start is itself compensated.
        ratio_init: the initial ratios (:func:`vq4dit.codewords.init_candidate_logits`).
        block_columns: columns updated group by group before the rest gets one matrix product
            (the same result up to round-off; a speed setting).
        damping: added to the diagonal, as a fraction of its mean (GPTQ's 1 %).
        order: ``activation`` (groups by decreasing ``sum_j E[x_j^2]``, GPTQ's act-order: the
            large inputs are fixed first, the small ones absorb their errors; on the reference
            DiT 1.7x less output error than left to right, ``benchmarks/assignment.py``) or
            ``input`` (column groups left to right).

    Returns:
        ``(indices [out * in / d, n] int64, squared_distances [out * in / d, n])`` in the order of
        :func:`vq4dit.codewords.to_subvectors`, nearest first (distances in the group metric).
    """
    return error_feedback_assign_many(weight, [codebook], hessian, num_nearest, damping, order, ratio_init,
                                      block_columns)[0]


def _factor(hessian: torch.Tensor, d: int, damping: float, order: str, device: torch.device):
    """The processing order of the column groups ``[groups]``, the permuted columns ``[in]``, the
    upper Cholesky factor ``U [in, in]`` of the damped, permuted ``H^-1``, and the dead inputs ``[in]``."""
    in_features = hessian.shape[0]
    groups = in_features // d
    h = hessian.detach().float().to(device).clone()
    group_order = torch.arange(groups, device=device)
    if order == "activation":
        group_order = h.diagonal().view(groups, d).sum(1).argsort(descending=True, stable=True)
    columns = (group_order.view(-1, 1) * d + torch.arange(d, device=device)).flatten()
    h = h[columns][:, columns]  # processed left to right in this order
    dead = h.diagonal() <= 0  # an input that is always 0: any weight is exact
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return group_order, columns, upper, dead


@torch.no_grad()
def error_feedback_assign_many(
    weight: torch.Tensor, codebooks: Sequence[torch.Tensor], hessian: torch.Tensor, num_nearest: int = 1,
    damping: float = 0.01, order: str = "activation", ratio_init: str = "inverse_distance", block_columns: int = 128,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`error_feedback_assign` of one ``weight [out, in]`` with each of ``codebooks``
    (``[k_i, d]``, one ``d``, any ``k_i >= num_nearest``), computed together.

    Returns one ``(indices [out * in / d, n] int64, squared_distances [out * in / d, n])`` per codebook."""
    out_features, in_features = weight.shape
    d = codebooks[0].shape[1]
    if any(c.ndim != 2 or c.shape[1] != d for c in codebooks):
        raise ValueError("error feedback needs codebooks [k, d] of one d")
    if in_features % d or hessian.shape != (in_features, in_features):
        raise ValueError(f"error feedback needs in_features divisible by d={d} and hessian [{in_features}, {in_features}]")
    if order not in ("input", "activation"):
        raise ValueError(f"order must be 'input' or 'activation', got {order!r}")
    if min(c.shape[0] for c in codebooks) < num_nearest:
        raise ValueError(f"every codebook needs at least num_nearest={num_nearest} codewords")
    device = weight.device
    factor = _factor(hessian, d, damping, order, device)
    per_batch = max(1, _BATCH_BYTES // (4 * out_features * max(c.shape[0] for c in codebooks)))
    results = []
    for start in range(0, len(codebooks), per_batch):
        results += _assign_batch(weight, codebooks[start:start + per_batch], factor, num_nearest, ratio_init,
                                 block_columns)
    return results


def _assign_batch(weight: torch.Tensor, codebooks: Sequence[torch.Tensor], factor, num_nearest: int, ratio_init: str,
                  block_columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Error feedback of ``weight [out, in]`` with ``P`` codebooks at once (padded to the largest ``k``)."""
    group_order, columns, upper, dead = factor
    out_features, in_features = weight.shape
    device, d, count = weight.device, codebooks[0].shape[1], len(codebooks)
    groups, k_max = in_features // d, max(c.shape[0] for c in codebooks)
    work = weight.detach().float()[:, columns].unsqueeze(0).repeat(count, 1, 1)  # [P, out, in], processing order
    work[:, :, dead] = 0.0
    flat = work.view(count * out_features, in_features)
    codes = torch.zeros(count, k_max, d, device=device)
    padded = torch.zeros(count, k_max, dtype=torch.bool, device=device)
    for p, codebook in enumerate(codebooks):
        codes[p, : codebook.shape[0]] = codebook.float().to(device)
        padded[p, codebook.shape[0]:] = True
    diag = upper.diagonal()
    metric = diag.pow(-2).view(groups, d)  # [groups, d]: the group metric, one per group
    # sum_j m_j c_j^2 for every group and codeword: [groups, P, k]; padding never wins
    code_terms = torch.einsum("gd,pkd->gpk", metric, codes.pow(2)).masked_fill_(padded.unsqueeze(0), math.inf)
    blocks = upper.view(groups, d, groups, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [groups, d, d] = U_gg
    inverse = torch.linalg.inv(blocks)  # [groups, d, d]
    codes_t = codes.transpose(1, 2)  # [P, d, k]
    fixed_ratios = None
    if num_nearest > 1 and ratio_init in ("uniform", "confident"):  # ratios that do not depend on the distances
        fixed_ratios = init_candidate_logits(torch.zeros(1, num_nearest, device=device), ratio_init).softmax(dim=1)
    indices = torch.empty(count, out_features, groups, num_nearest, dtype=torch.int64, device=device)
    distances = torch.empty(count, out_features, groups, num_nearest, dtype=torch.float32, device=device)
    width = max(block_columns // d, 1) * d  # GPTQ's lazy batches: later columns get one matmul per block
    for start in range(0, in_features, width):
        end = min(start + width, in_features)
        errors = torch.empty(count, out_features, end - start, device=device)
        for g in range(start // d, end // d):
            lo, hi = g * d, (g + 1) * d
            current = work[:, :, lo:hi]  # [P, out, d]
            scaled = current * metric[g]
            # sum_j m_j (w_j - c_j)^2 without the row term sum_j m_j w_j^2 (added to the winners)
            partial = torch.baddbmm(code_terms[g].unsqueeze(1), scaled, codes_t, alpha=-2.0)  # [P, out, k]
            if num_nearest == 1:
                best, found = partial.min(dim=2, keepdim=True)
            else:
                best, found = partial.topk(num_nearest, dim=2, largest=False, sorted=True)
            best = (best + (scaled * current).sum(dim=2, keepdim=True)).clamp_(min=0.0)
            indices[:, :, g], distances[:, :, g] = found, best
            picked = codes.gather(1, found.view(count, -1, 1).expand(-1, -1, d)).view(count, out_features, num_nearest, d)
            if num_nearest == 1:
                chosen = picked[:, :, 0]
            else:  # the soft start: candidates mixed by their initial ratios
                ratios = fixed_ratios if fixed_ratios is not None else \
                    init_candidate_logits(best.view(-1, num_nearest), ratio_init).softmax(dim=1)
                chosen = (ratios.view(-1 if fixed_ratios is None else 1, num_nearest, 1)
                          * picked.view(-1, num_nearest, d)).sum(dim=1).view(count, out_features, d)
            error = (current - chosen) @ inverse[g]  # [P, out, d]: E_g = (W_g - Q_g) U_gg^-1
            errors[:, :, lo - start:hi - start] = error
            if hi < end:
                flat[:, hi:end].addmm_(error.view(-1, d), upper[lo:hi, hi:end], alpha=-1.0)
        if end < in_features:
            flat[:, end:].addmm_(errors.view(-1, end - start), upper[start:end, end:], alpha=-1.0)
    back = group_order.argsort()  # processing order -> the layer's own column groups
    return [(indices[p][:, back].reshape(-1, num_nearest), distances[p][:, back].reshape(-1, num_nearest))
            for p in range(count)]
