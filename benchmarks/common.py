"""What every benchmark shares: the machine line, timing, bits/weight, markdown tables, and an
in-process ``train.py fit``.

Run the benchmarks from the repository root as modules, e.g. ``python -m benchmarks.kmeans``:
the root (``train.py``, ``callbacks/``, ``benchmarks/``) is then importable without touching
``sys.path``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["Timer", "bits_per_weight", "cpu_name", "fit", "fit_args", "machine_line", "markdown_row", "markdown_table",
           "timed"]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s ``model name``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(*extra: str, label: str = "machine") -> str:
    """``machine: <CPU>, <n> cores, torch <v>, <t> thread(s)[, GPU <name>], <date>[, extra...]``
    (empty extras are left out)."""
    parts = [cpu_name(), f"{os.cpu_count()} cores", f"torch {torch.__version__}", f"{torch.get_num_threads()} thread(s)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    parts.append(date.today().isoformat())
    return f"{label}: " + ", ".join(parts + [e for e in extra if e])


class Timer:
    """Wall-clock seconds of a ``with`` block: ``with Timer() as t: ...`` then ``t.seconds``;
    ``t.elapsed`` reads the running time since the block (or the ``Timer()`` call) began. On exit,
    queued CUDA work is waited for."""

    def __init__(self) -> None:
        self.start, self.seconds = time.perf_counter(), 0.0

    def __enter__(self) -> Timer:
        self.start, self.seconds = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_initialized():  # count the queued GPU work too
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """(median wall seconds over ``repeats`` calls of ``fn``, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        with Timer() as t:
            result = fn()
        times.append(t.seconds)
    return statistics.median(times), result


def bits_per_weight(model: torch.nn.Module) -> float:
    """Bits per quantized weight, all-in (codes at log2(k)/d + FP32 codebooks + row scales),
    averaged over the ``VQLinear`` layers by weight count, from ``vq4dit.size_report``."""
    from vq4dit import size_report  # lazily: gpu_check sets TRITON_INTERPRET before vq4dit loads its kernels

    report = size_report(model)
    bits = sum(r.bits_per_weight * r.out_features * r.in_features for r in report.layers)
    return bits / report.num_weights


def markdown_row(cells: Iterable[Any]) -> str:
    """One markdown table row; cells are formatted with ``str`` (format numbers before)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]] = ()) -> str:
    """A markdown table: header, separator, rows (no rows: the head of a table printed row by row)."""
    return "\n".join([markdown_row(header), "|" + "---|" * len(header)] + [markdown_row(row) for row in rows])


def fit_args(tmp: str | Path, configs: Sequence[str | Path], *overrides: str, logger: bool = True) -> list[str]:
    """``train.py fit`` arguments (without the subcommand) for a quiet run writing only under ``tmp``:
    the ``configs`` in order, no progress bar or model summary, then ``overrides`` (``--key=value``
    strings, applied last). ``logger=False`` turns the logger off instead of pointing it at ``tmp``."""
    args: list[str] = []
    for config in configs:
        args += ["--config", str(config)]
    args += [f"--trainer.default_root_dir={tmp}", f"--model.export.dir={tmp}/packed",
             f"--trainer.logger.init_args.save_dir={tmp}" if logger else "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    return args + list(overrides)


def fit(args: list[str], run: bool = True) -> tuple[Any, float]:
    """``train.py fit <args>`` in this process: (the LightningCLI, wall seconds). ``run=False``
    builds the trainer, model and data without fitting (the seconds are then the set-up time)."""
    from train import cli_main  # the CLI layer: imported only by benchmarks that calibrate

    with Timer() as t:
        cli = cli_main(["fit", *args] if run else args, run=run)
    return cli, t.seconds
