"""Bit packing of the codes (``vq4dit.packing``): every width, the bit order, bad input."""

import math

import pytest
import torch

from vq4dit import packing
from vq4dit.codewords import index_dtype
from vq4dit.packing import pack_codes, unpack_codes



@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_roundtrip_all_widths(bits, monkeypatch):
    monkeypatch.setattr(packing, "_CHUNK_CODES", 24)  # several chunks even for short inputs
    g = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 9, 13, 101):
        codes = torch.randint(0, 1 << bits, (count,), generator=g)
        codes[:1] = (1 << bits) - 1  # the largest code survives
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
        unpacked = unpack_codes(packed, bits, count)
        assert unpacked.dtype == index_dtype(2**bits)
        assert torch.equal(unpacked.long(), codes)


def test_pack_bit_order_is_little_endian():
    # 3-bit codes 1, 2, 3 -> stream bits 100 010 110 (LSB first) -> bytes 0b11010001, 0b0
    assert pack_codes(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0]
    assert pack_codes(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="lie in"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 6, 5)
