"""How tensors are encoded in the packed checkpoint file (``vq4dit.export``): bit-packed VQ
codes, and identical tensors stored once.

Codes are packed at exactly ``b = log2(k)`` bits, little-endian: code ``i`` occupies stream bits
``[i*b, (i+1)*b)``, least significant bit first; stream bit ``j`` is bit ``j % 8`` (LSB = 0) of
byte ``j // 8``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .codewords import index_dtype

# Codes per packing chunk; a multiple of 8, so every chunk starts on a byte boundary
# (temporaries of at most 2 x chunk x 4 B = 8 MiB).
_CHUNK_CODES = 1 << 20


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes packed at ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _byte_overlaps(bits: int) -> list[tuple[int, int, int]]:
    """``(code j, byte m, shift j*b - 8m)`` for each code/byte pair of a group of 8 codes
    (= ``bits`` bytes) that share stream bits."""
    return [(j, m, j * bits - 8 * m) for j in range(8) for m in range(j * bits // 8, ((j + 1) * bits - 1) // 8 + 1)]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack ``codes [N]`` (integers in ``0 .. 2**bits - 1``) into ``[ceil(N*bits/8)]`` uint8 (CPU).

    Little-endian (module docstring), last byte zero-padded. Vectorised over groups of 8 codes
    (= ``bits`` bytes), one chunk of groups at a time.
    """
    _check_bits(bits)
    if codes.ndim != 1 or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 1-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.detach().cpu()
    count = codes.numel()
    if count and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:  # one code per byte
        return codes.to(torch.uint8, copy=True)
    work = torch.uint8 if bits <= 8 else torch.int32  # uint8 shifts wrap: the & 0xFF for free
    packed = torch.empty(packed_size(count, bits), dtype=torch.uint8)
    for start in range(0, count, _CHUNK_CODES):
        chunk = codes[start : start + _CHUNK_CODES].to(work)
        groups = F.pad(chunk, (0, -chunk.numel() % 8)).view(-1, 8).t().contiguous()  # [8, G]
        out = torch.zeros(bits, groups.shape[1], dtype=work)  # [bits, G]: byte m of group g
        for j, m, shift in _byte_overlaps(bits):
            out[m] |= groups[j] << shift if shift >= 0 else groups[j] >> -shift
        offset, num_bytes = start * bits // 8, packed_size(chunk.numel(), bits)
        packed[offset : offset + num_bytes] = out.t().reshape(-1)[:num_bytes].to(torch.uint8)  # low byte
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``packed [ceil(count*bits/8)] uint8 -> codes [count]`` (CPU),
    dtype ``index_dtype(2**bits)`` as ``VQLinear.codes``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if count < 0 or packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits")
    packed = packed.detach().cpu()
    if bits == 8:
        return packed.to(index_dtype(256), copy=True)
    codes = torch.empty(count, dtype=index_dtype(1 << bits))
    work = torch.uint8 if bits <= 8 else torch.int32  # wrapping uint8 shifts keep the low 8 bits
    for start in range(0, count, _CHUNK_CODES):
        num = min(_CHUNK_CODES, count - start)
        offset, num_bytes = start * bits // 8, packed_size(num, bits)
        chunk = packed[offset : offset + num_bytes].to(work)
        groups = F.pad(chunk, (0, -num_bytes % bits)).view(-1, bits).t().contiguous()  # [bits, G]
        out = torch.zeros(8, groups.shape[1], dtype=work)  # [8, G]: code j of group g
        for j, m, shift in _byte_overlaps(bits):
            out[j] |= groups[m] >> shift if shift >= 0 else groups[m] << -shift
        out &= (1 << bits) - 1
        codes[start : start + num] = out.t().reshape(-1)[:num].to(codes.dtype)
    return codes


def _natural_key(name: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def identical_tensors(tensors: Mapping[str, torch.Tensor], min_bytes: int = 1024) -> dict[str, str]:
    """``{alias: source}`` for every tensor equal in dtype, shape and every byte to one earlier in
    natural name order (the source is the first of its group, e.g. block 0's copy).

    What this finds in practice: DiT checkpoints converted from the original code hold one copy of
    the timestep and label embedders per block (28 identical copies, 297 MiB on DiT-XL/2), which
    the packed file stores once. Tensors under ``min_bytes`` are never aliased, meta tensors only
    when they are the same tensor object (tied).
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name in sorted(tensors, key=_natural_key):
        original = tensors[name]
        if original.numel() * original.element_size() < min_bytes:
            continue
        if original.is_meta:  # no values: only the very same tensor (tied) is identical
            source = first.setdefault(("tensor", id(original)), name)
            if source != name:
                aliases[name] = source
            continue
        tensor = original.detach().cpu().contiguous()
        digest = hashlib.blake2b(tensor.reshape(-1).view(torch.uint8).numpy(), digest_size=16).digest()
        source = first.setdefault((tensor.dtype, tuple(tensor.shape), digest), name)
        if source != name and torch.equal(tensors[source].detach().cpu(), tensor):
            aliases[name] = source
    return aliases
