"""benchmarks/mmdit_scale.py computes on a tiny SD3.5-style model (the numbers are the benchmark's, not
tested) and builds the real SD3.5 shapes on meta."""

import torch

from benchmarks.mmdit_scale import (
    MODELS, TEXT_TOKENS, forward_measurements, inference_rows, model_columns, one_block_sd3, parameters, sd3_items, table, trajectory_row,
)
from benchmarks.common import Timer
from benchmarks.pixart_scale import measure_block, paper_batch, scale_rows
from benchmarks.roofline import Counts
from vq4dit.families import SD3

TINY = {**MODELS["medium"][0], "num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 16,
        "caption_projection_dim": 32, "joint_attention_dim": 12, "pooled_projection_dim": 10, "sample_size": 8,
        "in_channels": 4, "out_channels": 4, "pos_embed_max_size": 16, "dual_attention_layers": (0, 1)}


def test_the_real_shapes_are_sd35_large_and_medium_built_on_meta():
    large, medium = (parameters(MODELS[name][0]) for name in ("large", "medium"))
    assert 8.0e9 < large < 8.2e9 and 2.2e9 < medium < 2.6e9, (large, medium)
    assert TEXT_TOKENS == 333


def test_the_measured_block_is_a_full_joint_block_and_the_table_computes_on_a_tiny_sd35():
    torch.set_num_threads(1)
    model = one_block_sd3(TINY)
    (block,) = SD3.blocks(model)
    assert not block.context_pre_only and block.attn2 is not None  # the text stream and attn2 are measured
    by_items = measure_block(TINY, 2, (1, 2), 5, kmeans_iters=0, family=SD3, build=one_block_sd3,
                             make_items=sd3_items,
                             output_tokens=16 + 5)
    assert by_items[2]["saved"] > by_items[1]["saved"] > 0 and by_items[1]["logit_grads"] > 0
    paper = paper_batch(by_items)
    assert paper["teacher_output"] == 2 * 4 * 21 * 32 * 2 and isinstance(paper["step"], Counts)
    rows = scale_rows(TINY, paper, paper["step"], (2,), SD3, 5, (2, 2, 3))
    assert "trajectory items 2 x 2 x 3, host RAM (GB)" in rows
    activations, forward = forward_measurements(TINY, 5)
    assert activations >= 0 and forward.flops > 0
    inference = inference_rows(TINY, (2, 3), activations)
    assert "**inference w3: packed weights + activations (GB)**" in inference
    (cells,) = trajectory_row(TINY, forward, (2, 2, 3)).values()
    assert cells[0] == "-" and " - " in cells[1]


def test_the_tables_columns_per_bit_width_have_the_same_rows_and_print():
    torch.set_num_threads(1)
    columns = model_columns(TINY, (2, 2, 3), (2, 3), (1, 2), 0, Timer())
    assert list(columns) == ["w2", "w3"] and list(columns["w2"]) == list(columns["w3"])
    assert "packed file, MiB (FP tensors float32)" in columns["w3"]
    text = table("tiny", columns, (1, 2), TINY)
    assert "| quantity | w2 per block | w2 model (3 blocks) | w3 per block | w3 model (3 blocks) |" in text
    assert "**inference: packed weights + activations (GB)**" in text
