"""The op counting and roofline of benchmarks/roofline.py (used by benchmarks/projection.py) on real (small) computations."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from benchmarks.projection import ROOT, measure_calibration, read_config, run_settings
from benchmarks.projection_kmeans import project_kmeans
from benchmarks.roofline import (
    H100, SCENARIOS, Counts, OpCounter, OpRecord, count_ops, fit_blocks, foreach_launches, op_seconds,
)
from vq4dit.vq_config import VQConfig


def test_linear_forward_backward_flops_are_analytic():
    m, k, n = 64, 48, 40
    x = torch.randn(m, k, requires_grad=True)
    linear = torch.nn.Linear(k, n)
    counts = count_ops(lambda: linear(x).sum().backward())
    assert counts.flops == 3 * 2 * m * n * k  # forward, grad input, grad weight
    assert counts.ops["addmm"][1] == 2 * m * n * k


def test_autocast_matmul_counts_as_bf16_and_its_casts_as_copies():
    x, w = torch.randn(32, 16), torch.randn(8, 16)
    counter = OpCounter()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        F.linear(x, w)
    mm = [r for r in counter.records if r.flops]
    assert len(mm) == 1 and mm[0].compute == "bf16" and mm[0].flops == 2 * 32 * 8 * 16
    casts = [r for r in counter.records if r.name == "_to_copy"]
    assert sorted(r.bytes for r in casts) == sorted([x.numel() * 6, w.numel() * 6])  # read fp32, write bf16


def test_elementwise_bytes_are_inputs_plus_outputs():
    a, b = torch.randn(100, 10), torch.randn(100, 10)
    assert count_ops(lambda: a + b).bytes == 3 * 4000
    assert count_ops(lambda: a + b).kernels == 1
    row = torch.randn(10)
    assert count_ops(lambda: a + row).bytes == 4000 + 40 + 4000
    assert count_ops(lambda: a + row.expand(100, 10)).bytes == 4000 + 40 + 4000  # a broadcast is read once
    half = torch.randn(100, 10, dtype=torch.bfloat16)
    assert count_ops(lambda: a * half).bytes == 4000 + 2000 + 4000
    c = a.clone()
    assert count_ops(lambda: c.add_(b)).bytes == 3 * 4000  # in place: self read and written
    out = torch.empty(100, 10)
    assert count_ops(lambda: torch.add(a, b, out=out)).bytes == 3 * 4000  # out= written only
    assert count_ops(lambda: out.copy_(a)).bytes == 2 * 4000  # copy_ does not read its target
    assert count_ops(lambda: a.sum()).bytes == 4000 + 4


def test_views_and_allocations_move_nothing():
    a = torch.randn(6, 4, 5)

    def views():
        v = a.view(24, 5).t().unsqueeze(0)[0, 1:3].detach()
        a.permute(2, 0, 1).transpose(0, 1).select(0, 1).expand(3, 5, 4)
        a.split(2)
        torch.empty(1000)
        return v

    counts = count_ops(views)
    assert counts.bytes == 0 and counts.kernels == 0 and counts.flops == 0
    assert {"view", "t", "unsqueeze", "select", "slice", "detach", "permute", "transpose", "expand", "split"} <= set(counts.ops)


def test_foreach_launch_rule_and_host_scalars():
    big = [torch.zeros(H100.mta_chunk_elements * 400)]  # 400 chunks > 320 blocks: 2 launches
    assert foreach_launches([big, big], H100) == 2
    many = [torch.zeros(3) for _ in range(100)]  # depth 2 table holds 64 tensors
    assert foreach_launches([many, many], H100) == 2
    steps = [torch.zeros(()) for _ in range(5)]  # optimizer step counters stay on the host
    assert foreach_launches([steps], H100) == 0
    params = [torch.randn(10) for _ in range(3)]
    counts = count_ops(lambda: torch._foreach_mul_(params, 0.5))
    assert counts.kernels == 1 and counts.bytes == 2 * 3 * 40


def test_roofline_takes_the_larger_term_plus_launches():
    opt = SCENARIOS[0]
    compute_bound = OpRecord("mm", int(1e12), int(1e6), 1, "bf16", False)
    compute, memory, launch = op_seconds(compute_bound, opt)
    assert compute == pytest.approx(1e12 / (H100.bf16_flops * opt.mm_efficiency)) and memory == 0
    assert launch == opt.launch_s
    memory_bound = OpRecord("add", 0, int(1e9), 1, None, False)
    compute, memory, _ = op_seconds(memory_bound, opt)
    assert compute == 0 and memory == pytest.approx(1e9 / (H100.hbm_bytes_per_s * opt.mem_efficiency))
    fp32 = OpRecord("mm", int(1e12), 0, 1, "fp32", False)
    assert op_seconds(fp32, opt)[0] == pytest.approx(1e12 / (H100.fp32_flops * opt.mm_efficiency))
    assert op_seconds(OpRecord("view", 0, 0, 0, None, False), opt) == (0.0, 0.0, 0.0)


def test_fit_is_exact_for_affine_costs():
    runs = {l: Counts(flops=5.0 + 3.0 * l, bytes=2.0 * l, kernels=10.0 + l, compute_s={"x": 1.0 + l},
                      ops={"mm": [l, 2.0 * l, 0.0, 0.0]}) for l in (1, 2)}
    fitted = fit_blocks(runs, 28)
    assert fitted.flops == pytest.approx(5 + 3 * 28) and fitted.kernels == pytest.approx(38)
    assert fitted.compute_s["x"] == pytest.approx(29) and fitted.ops["mm"][:2] == pytest.approx([28, 56])


def test_kmeans_projection_scales_feedback_by_out_in_squared():
    parts = {"seeding": Counts(flops=1.0), "plain0": Counts(flops=3.0), "layer0": Counts(flops=7.0, kernels=2.0),
             "layerN": Counts(flops=11.0, kernels=2.0)}  # feedback 4 (2 kernels); 2 Lloyd iterations of 2 each
    total = project_kmeans(parts, hidden=2, lloyd_iters=2, target_iters=3, shapes=[(2, 2), (4, 2), (2, 4)])
    # 3 seedings + (3 - 1 + 3 x 2) x 20 / 4 sub-vector scale + 4 x (8 + 16 + 32) / 8 out * in^2 scale
    assert total.flops == pytest.approx(3 + 8 * 5 + 4 * 7)
    assert total.kernels == pytest.approx(2 * (2 + 2 + 4) / 2)  # the feedback's kernels: per column group
    paper = project_kmeans({k: v for k, v in parts.items() if k != "plain0"}, 2, 2, 3, [(2, 2)])
    assert paper.flops == pytest.approx(1 + (7 - 1 + 3 * 2))  # no feedback term without plain0


def test_run_settings_read_the_nested_config_under_each_recipe():
    config = read_config(ROOT / "configs" / "dit_xl2.yaml")
    assert config["model"]["vq"]["num_candidates"] == 2 and config["model"]["recipe"] == "quality"  # nested
    default, calibration = run_settings(config, "quality", 3, kmeans_iters=1)
    assert (default.codebook_size, default.kmeans_iters, calibration.teacher_dtype) == (64, 1, "bfloat16")
    assert default.row_scale and default.error_feedback and default.kmeans_metric == "activation"
    paper, _ = run_settings(config, "paper", 3, kmeans_iters=1)
    assert paper == VQConfig.from_bits(3, kmeans_iters=1)


def test_block_fit_reproduces_a_three_block_model(tmp_path):
    """Real runs (teacher forwards, FP step, calibration steps, the default's statistics) of 1-, 2- and
    3-block tiny DiTs: the fit from 1 and 2 blocks predicts the 3-block counts within 1 %. The all-soft
    step's pruning depends on the values (how many rows harden in each layer), so only its FLOPs are exact."""
    from diffusers import DiTTransformer2DModel

    from vq4dit.models import preset_config

    warnings.filterwarnings("ignore", message=".*self.log.*")
    config = read_config(ROOT / "configs" / "dit_xl2.yaml")
    runs = {}
    for layers in (1, 2, 3):
        torch.manual_seed(0)
        folder = tmp_path / f"tiny{layers}"
        DiTTransformer2DModel(**{**preset_config("tiny"), "num_layers": layers}).save_pretrained(folder)
        runs[layers] = measure_calibration(str(folder), 2, config, kmeans_iters=1, fp_rows=True, trajectory_samples=[4])
    for key in runs[1]:
        fitted = fit_blocks({1: runs[1][key], 2: runs[2][key]}, 3)
        real = runs[3][key]
        assert real.flops > 0 and fitted.flops == pytest.approx(real.flops, rel=1e-9), key
        checked = ("flops",) if key == "w2_soft" else ("flops", "bytes", "kernels")
        for name in checked:
            assert getattr(fitted, name) == pytest.approx(getattr(real, name), rel=0.01), (key, name)
        assert math.isfinite(fitted.roofline_s(SCENARIOS[1]))
    # the block costs are there: 3 blocks cost more than 1 in every counted quantity
    assert runs[3]["w2_soft"].bytes > runs[1]["w2_soft"].bytes and runs[3]["fp_step"].kernels > runs[1]["fp_step"].kernels
    assert runs[1]["w2_stats"].flops > 0  # the default recipe's statistics forwards are counted
    paper = measure_calibration(str(tmp_path / "tiny1"), 2, config, kmeans_iters=1, fp_rows=False,
                                trajectory_samples=[], recipe="paper")
    assert set(paper) == {"w2-paper_soft", "w2-paper_hard", "w2-paper_val"}  # no statistics
