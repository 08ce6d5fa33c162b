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

from .codewords import nearest_codewords


@torch.no_grad()
def error_feedback_assign(
    weight: torch.Tensor, codebook: torch.Tensor, hessian: torch.Tensor, num_nearest: int = 1, damping: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of every sub-vector of ``weight`` chosen with error feedback across columns.

    Args:
        weight: ``[out, in]`` (already divided by its row scales, if any).
        codebook: ``[k, d]`` codewords, ``d`` dividing ``in``.
        hessian: ``[in, in]`` input second moments ``E[x x^T]`` of the layer.
        num_nearest: candidates ``n`` per sub-vector; the nearest one drives the feedback.
        damping: added to the diagonal, as a fraction of its mean (GPTQ's 1 %).

    Returns:
        ``(indices [out * in / d, n] int64, squared_distances [out * in / d, n])`` in the order of
        :func:`vq4dit.codewords.to_subvectors`, nearest first (distances in the group metric).
    """
    out_features, in_features = weight.shape
    d = codebook.shape[1]
    if in_features % d or hessian.shape != (in_features, in_features):
        raise ValueError(f"error feedback needs in_features divisible by d={d} and hessian [{in_features}, {in_features}]")
    work = weight.detach().float().clone()
    h = hessian.detach().float().to(work.device).clone()
    dead = h.diagonal() <= 0  # an input that is always 0: any weight is exact
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h.diagonal().add_(damping * h.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codebook = codebook.float().to(work.device)
    groups = in_features // d
    indices = torch.empty(out_features, groups, num_nearest, dtype=torch.int64, device=work.device)
    distances = torch.empty(out_features, groups, num_nearest, dtype=torch.float32, device=work.device)
    diag = upper.diagonal()
    for g in range(groups):
        cols = slice(g * d, (g + 1) * d)
        metric = diag[cols].pow(-2).unsqueeze(0).expand(out_features, d)
        found, dist = nearest_codewords(work[:, cols], codebook, num_nearest, metric)
        indices[:, g], distances[:, g] = found, dist
        chosen = codebook[found[:, 0]]  # [out, d]
        for j in range(d):
            c = g * d + j
            error = (work[:, c] - chosen[:, j]) / upper[c, c]
            work[:, c + 1:] -= error.unsqueeze(1) * upper[c, c + 1:].unsqueeze(0)
    return indices.reshape(-1, num_nearest), distances.reshape(-1, num_nearest)
