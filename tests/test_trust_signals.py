"""Real signals at the command line (issue 20): SIGTERM before the first calibration step, and
SIGKILL at random points of every writer, met where the user meets them: the exit status, one
``error:`` line, and what is left on disk."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_calibration import fit_args


def start(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    """``python train.py ARGS`` (or ``python ARGS`` when ``args[0]`` ends in .py) as a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, *args] if args[0].endswith(".py") or args[0] == "-c" else [sys.executable, "train.py", *args]
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=cwd)


def wait_for(process: subprocess.Popen, marker: str, timeout: float = 240) -> str:
    """Read the process's stderr until ``marker`` shows (progress bars end lines with \\r)."""
    seen, deadline = "", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        char = process.stderr.read(1)
        if not char:
            break
        seen += char
    assert marker in seen, seen[-2000:]
    return seen


def test_sigterm_during_the_bit_allocation_probe_says_where_and_leaves_nothing(tmp_path):
    process = start(fit_args(tmp_path, "--trainer.max_epochs=1", "--model.allocation.enabled=true"))
    wait_for(process, "probe]")  # the preparation bar during the probe (vq4dit.engine.probe.Phases)
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "SIGTERM" in line and "bit-allocation" in line and "run the same command again" in line, line
    assert not list(tmp_path.rglob("version_*")) and not (tmp_path / "packed").exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries
