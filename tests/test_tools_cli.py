"""The reference-training tools as users run them: by path from any folder, with their settings
taken from the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["train_reference", "train_rgb_reference", "train_pixart_reference", "train_mmdit_reference"]


@pytest.mark.parametrize("tool", TOOLS)
def test_a_tool_runs_by_path_from_another_folder(tool, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "train", "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("tool, field", [("train_reference", "dit"), ("train_rgb_reference", "dit"),
                                          ("train_pixart_reference", "dit"), ("train_mmdit_reference", "dit")])
def test_a_settings_field_on_the_command_line_reaches_the_training(tool, field, monkeypatch):
    """``--dit.train_steps 7`` is the settings the run gets (a parameter named ``config`` collided with
    the command line's config-file option and was silently ignored)."""
    import functools
    import importlib

    module = importlib.import_module(f"tools.{tool}")
    seen = {}

    @functools.wraps(module.train)  # the real signature and type hints: what the command line is built from
    def train(**kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(module, "train", train)
    module.main(["train", f"--{field}.train_steps", "7"])
    assert seen[field].train_steps == 7
