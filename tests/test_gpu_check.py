"""benchmarks/gpu_check.py: the dry run exercises every code path on the CPU (so the first GPU run
does not die on a typo), and without CUDA the real run refuses in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.recipe_configs import RECIPES

ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.gpu_check"  # run as a module from the repository root


def run(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    result = run("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| section | measurement | setting | ms | peak GPU MiB | note |" in result.stdout
    assert "ERROR" not in result.stdout
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["info"]["device"] == "cpu (dry run)"
    rows = report["rows"]
    assert {r["section"] for r in rows} == {"tests", "kernel", "calibration", "kmeans", "sampling", "inference"}
    whats = {r["what"] for r in rows}
    assert {"FP fine-tuning step (RMSprop)", "calibration step, soft rows (torch)", "calibration step, all hard (torch)",
            "trajectory sampling, per step", "forward FP", "forward w2 decode", "forward w3 cached"} <= whats
    assert "student build (statistics, k-means, feedback)" in whats
    for recipe in ("quality", "paper"):  # both recipes, each with its build, soft and hard steps and inference
        mine = [r for r in rows if r["extra"].get("recipe") == recipe]
        assert {"student build (statistics, k-means, feedback)", "calibration step, soft rows (torch)",
                "calibration step, all hard (torch)", "forward w2 decode", "forward w3 cached"} <= {r["what"] for r in mine}
    builds = {r["extra"]["recipe"]: r["extra"] for r in rows if r["what"].startswith("student build")}
    assert builds["quality"]["full_moments_mib"] > 0 and "statistics" in builds["quality"]["phase_seconds"]
    assert builds["paper"]["full_moments_mib"] == 0 and "statistics" not in builds["paper"]["phase_seconds"]
    assert report["plan"]["recipes"] == list(RECIPES)
    tests = next(r for r in rows if r["section"] == "tests")
    assert tests["extra"]["returncode"] == 0 and "passed" in tests["note"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    assert {"calibration step, soft rows (triton)", "forward w2 decode (triton)"} <= whats
    kernel = [r for r in rows if r["what"] == "soft reconstruction fwd+bwd (triton)"]
    assert kernel and all(r["extra"]["max_abs_diff"] < 1e-4 for r in kernel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_exits_2_with_one_line(tmp_path):
    result = run("--out", str(tmp_path / "x.json"), timeout=60)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert not (tmp_path / "x.json").exists()
