"""Size accounting (``vq4dit.size.size_report``) on DiT-XL/2's shapes (meta tensors)."""

import math

import pytest
import torch
from diffusers import DiTTransformer2DModel

from vq4dit.layers import VQLinear
from vq4dit.size import size_report
from vq4dit.vq_config import VQConfig

CORE = ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")



def dit_xl_on_meta(preset: str) -> DiTTransformer2DModel:
    with torch.device("meta"):
        model = DiTTransformer2DModel(
            sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
            out_channels=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        )
    for block in model.transformer_blocks:
        for name in CORE:
            linear = block.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            layer = VQLinear(linear.in_features, linear.out_features, VQConfig.preset(preset), device="meta")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, layer)
    return model


def test_size_report_matches_paper_accounting_w2():
    report = size_report(dit_xl_on_meta("w2"))
    assert len(report.layers) == 196
    assert report.num_weights == 668_860_416 and report.num_biases == 483_840
    assert report.fp32_mib == pytest.approx(2553.35, abs=0.01)
    assert report.codes_mib == pytest.approx(159.47, abs=0.01)
    assert report.codebooks_mib == pytest.approx(0.766, abs=0.001)
    assert report.biases_mib == pytest.approx(1.85, abs=0.01)
    assert report.quantized_mib == pytest.approx(162.08, abs=0.01)
    assert report.compression == pytest.approx(15.75, abs=0.01)
    qkv = next(r for r in report.layers if r.name.endswith("to_q"))
    assert (qkv.nominal_bits_per_weight, qkv.packed_code_bytes) == (2.0, 1152 * 1152 // 4)
    assert qkv.bits_per_weight == pytest.approx(2.0 + 256 * 4 * 32 / 1152**2)
    table = report.format()
    assert "162.08 MiB" in table and "2553.35 MiB" in table
    assert report.to_dict()["quantized_mib"] == report.quantized_mib


def test_size_report_w3_counts_nominal_six_bit_codes():
    report = size_report(dit_xl_on_meta("w3"))
    assert report.codes_mib == pytest.approx(239.20, abs=0.01)
    assert report.quantized_mib == pytest.approx(241.14, abs=0.01)
    ff2 = next(r for r in report.layers if r.name.endswith("ff.net.2"))
    assert ff2.code_bits == 1152 * 4608 // 2 * 6
    assert ff2.packed_code_bytes == math.ceil(ff2.code_bits / 8)
    assert ff2.nominal_bits_per_weight == 3.0
    assert report.to_dict()["layers"][0]["packed_code_bytes"] == report.layers[0].packed_code_bytes
