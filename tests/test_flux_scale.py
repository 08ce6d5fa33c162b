"""benchmarks/flux_scale.py computes on a tiny FLUX.1-dev (the numbers are the benchmark's, not tested) and
builds the real FLUX.1-dev shapes on meta."""

import torch

from benchmarks.common import Timer
from benchmarks.flux_scale import (
    FLUX_DEV, TEXT_TOKENS, flux_columns, flux_items, flux_table, one_block_double, one_block_single, window_rows,
)
from benchmarks.mmdit_scale import parameters
from benchmarks.pixart_scale import GB
from vq4dit.families import FLUX

TINY = {**FLUX_DEV, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 16, "num_attention_heads": 2,
        "in_channels": 16, "joint_attention_dim": 12, "pooled_projection_dim": 10, "axes_dims_rope": (4, 6, 6)}


def test_the_real_shapes_are_flux_dev_built_on_meta():
    assert 11.8e9 < parameters(FLUX_DEV, FLUX) < 12.0e9 and TEXT_TOKENS == 512
    assert [type(b).__name__ for b in FLUX.blocks(one_block_double(TINY))] == ["FluxTransformerBlock"]
    assert [type(b).__name__ for b in FLUX.blocks(one_block_single(TINY))] == ["FluxSingleTransformerBlock"]
    items = flux_items(TINY, 2, 5, side=8)
    assert items["x"].shape == (2, 4, 8, 8) and not any(key.startswith("negative") for key in items)


def test_the_flux_table_computes_on_a_tiny_flux_dev_with_double_single_and_model_cells():
    torch.set_num_threads(1)
    columns = flux_columns(TINY, (2, 2, 3), (2, 3), (1, 2), 0, Timer(), text_tokens=5, side=8)
    assert list(columns) == ["w2", "w3"] and list(columns["w2"]) == list(columns["w3"])
    rows = columns["w2"]
    assert all(len(cells) == 3 for cells in rows.values())
    assert "saved for the backward at 4 (GB)" in rows  # no negative copies: batch 4, not 4 + 4
    assert "**inference: packed weights + activations (GB)**" in rows
    assert "**window of 4 blocks: bf16 teacher + 4 x (held + saved), GB (projected)**" in rows
    text = flux_table(columns, (1, 2), TINY, 5, 8)
    assert "| quantity | w2 double block | w2 single block | w2 model (2 + 3 blocks) | w3 double block |" in text


def test_the_window_is_the_teacher_plus_k_times_the_larger_block():
    block = {"teacher_block": 1e9, "student_block": 2e9, "optimizer": 0.5e9, "teacher_output": 0.5e9, "saved": 6e9}
    small = {**block, "saved": 1e9}
    (cells,) = window_rows(TINY, {"double": (block, 2), "single": (small, 3)}, (2,)).values()
    teacher = 2 * parameters(TINY, FLUX)
    assert cells == ("20.0", "10.0", f"**{(teacher + 20e9) / GB:.1f}** (teacher offloaded: 20.0)")
