"""benchmarks/pixart_scale.py computes on a tiny PixArt (the numbers are the benchmark's, not tested)."""

import torch

from benchmarks.pixart_scale import (
    PAPER_ITEMS, SIGMA, block_input_bytes, measure_block, packed_report, paper_batch, scale_rows, sigma_config,
)
from benchmarks.roofline import Counts

TINY = {**SIGMA, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "cross_attention_dim": 32,
        "caption_channels": 12, "sample_size": 12}


def test_sigma_shapes_are_the_real_model_and_sizes_come_from_meta_weights():
    config = sigma_config(1024)
    assert (config["sample_size"], config["interpolation_scale"], sigma_config(512)["sample_size"]) == (128, 2, 64)
    report = packed_report(config, 2)  # 28 blocks x 10 Linears, built on meta: nothing allocated
    assert len(report.layers) == 280 and 5.9e8 < report.num_weights < 6.0e8
    assert block_input_bytes(config) == 2 * (4096 + 300 + 6) * 1152 * 2


def test_the_block_measurement_and_the_table_compute_on_a_tiny_pixart():
    torch.set_num_threads(1)
    by_items = measure_block(TINY, 2, items=(1, 2), text_tokens=5, kmeans_iters=0)
    assert sorted(by_items) == [1, 2]
    for measured in by_items.values():
        assert measured["teacher_block"] > 0 and measured["student_block"] > 0 and measured["optimizer"] > 0
        assert measured["saved"] > 0 and measured["step"].flops > 0
        assert measured["logit_grads"] > 0  # measured on the soft start, not a finalised student
    assert by_items[2]["saved"] > by_items[1]["saved"]  # activations grow with the batch
    paper = paper_batch(by_items)
    assert paper["saved"] > by_items[2]["saved"] and isinstance(paper["step"], Counts)
    assert paper["teacher_output"] == 2 * PAPER_ITEMS * 36 * 32 * 2
    rows = scale_rows(TINY, paper, paper["step"], (2,))
    assert "**calibration step peak, GPU (GB)**" in rows and all(len(cells) == 2 for cells in rows.values())
