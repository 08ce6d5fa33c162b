"""Assignment with error feedback (GPTQ / GPTVQ): sub-vectors are assigned one column group at a
time, and each group's output error is compensated on the columns not assigned yet.

For one layer with input second moments ``H = E[x x^T]`` the output error of row ``w`` quantized
to ``q`` is ``(w - q)^T H (w - q)``. Assigning the ``d`` columns of group ``g`` and then moving the
remaining columns by the optimal brain surgeon update (through the upper Cholesky factor ``U`` of
``H^-1``) lets later codewords absorb earlier errors; within a group the codewords are chosen under
the metric ``sum_j (w_j - c_j)^2 / U_jj^2``, the error each column's quantization causes.
"""

from __future__ import annotations

import torch

from .codewords import init_candidate_logits, nearest_codewords


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
        block_columns: columns updated one by one before the rest gets one matrix product
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
    out_features, in_features = weight.shape
    d = codebook.shape[1]
    if in_features % d or hessian.shape != (in_features, in_features):
        raise ValueError(f"error feedback needs in_features divisible by d={d} and hessian [{in_features}, {in_features}]")
    if order not in ("input", "activation"):
        raise ValueError(f"order must be 'input' or 'activation', got {order!r}")
    groups = in_features // d
    work = weight.detach().float().clone()
    h = hessian.detach().float().to(work.device).clone()
    group_order = torch.arange(groups, device=work.device)
    if order == "activation":
        group_order = h.diagonal().view(groups, d).sum(1).argsort(descending=True, stable=True)
    columns = (group_order.view(-1, 1) * d + torch.arange(d, device=work.device)).flatten()
    work, h = work[:, columns], h[columns][:, columns]  # processed left to right in this order
    dead = h.diagonal() <= 0  # an input that is always 0: any weight is exact
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h.diagonal().add_(damping * h.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codebook = codebook.float().to(work.device)
    indices = torch.empty(out_features, groups, num_nearest, dtype=torch.int64, device=work.device)
    distances = torch.empty(out_features, groups, num_nearest, dtype=torch.float32, device=work.device)
    diag = upper.diagonal()
    width = max(block_columns // d, 1) * d  # GPTQ's lazy batches: later columns get one matmul per block
    for start in range(0, in_features, width):
        end = min(start + width, in_features)
        errors = torch.empty(out_features, end - start, device=work.device)
        for g in range(start // d, end // d):
            cols = slice(g * d, (g + 1) * d)
            metric = diag[cols].pow(-2).unsqueeze(0).expand(out_features, d)
            found, dist = nearest_codewords(work[:, cols], codebook, num_nearest, metric)
            indices[:, group_order[g]], distances[:, group_order[g]] = found, dist
            if num_nearest == 1:
                chosen = codebook[found[:, 0]]  # [out, d]
            else:  # the soft start: candidates mixed by their initial ratios
                ratios = init_candidate_logits(dist, ratio_init).softmax(dim=1)
                chosen = (ratios.unsqueeze(2) * codebook[found]).sum(dim=1)
            for j in range(d):
                c = g * d + j
                error = (work[:, c] - chosen[:, j]) / upper[c, c]
                work[:, c + 1:end] -= error.unsqueeze(1) * upper[c, c + 1:end].unsqueeze(0)
                errors[:, c - start] = error
        if end < in_features:
            work[:, end:] -= errors @ upper[start:end, end:]
    return indices.reshape(-1, num_nearest), distances.reshape(-1, num_nearest)
