"""Fused hard decode: ``codes [N]`` -> ``[N, d]`` codeword rows, one Triton kernel.

The PyTorch path on a GPU widens uint8/int16 codes to int32 (one kernel, 4 bytes per code
written and read again) and then gathers; this kernel reads the compact codes directly and
writes the rows. The codebook (``k x d``, tiny) is cast to the output dtype before the kernel,
so the result is bit-identical to ``codebook.to(dtype)[codes]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 256


@triton.jit
def _decode_kernel(codebook_ptr, codes_ptr, out_ptr, num_rows,
                   DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    cols = tl.arange(0, DIM_P2)  # [DIM_P2]
    row_ok = rows < num_rows
    codes = tl.load(codes_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # compact codes, widened in registers
    mask = row_ok[:, None] & (cols[None, :] < DIM)
    values = tl.load(codebook_ptr + codes[:, None] * DIM + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * DIM + cols[None, :], values, mask=mask)


def decode(codebook: torch.Tensor, codes: torch.Tensor, out: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """``codebook.to(dtype)[codes]`` as ``[N, d]`` (no autograd). ``out``: optional contiguous
    buffer of ``N * d`` elements of ``dtype`` (default: the codebook's) to write into."""
    dtype = codebook.dtype if dtype is None else dtype
    table = codebook.detach().to(dtype).contiguous()
    codes = codes.contiguous()
    if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"codes must be uint8/int16/int32/int64, got {codes.dtype}")
    num, dim = codes.numel(), table.shape[1]
    out = torch.empty(num * dim, dtype=dtype, device=table.device) if out is None else out
    if num:
        _decode_kernel[(triton.cdiv(num, BLOCK_ROWS),)](
            table, codes, out, num, DIM=dim, DIM_P2=triton.next_power_of_2(dim), BLOCK=BLOCK_ROWS)
    return out.view(num, dim)
