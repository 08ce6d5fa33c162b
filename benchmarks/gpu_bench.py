"""What ``benchmarks/gpu_check.py`` measures with: its plans (GPU and dry run), the rows of its
table, the device clock and memory (:class:`Bench`), and the report's table and device line."""

from __future__ import annotations

import gc
import platform
import statistics
import sys
from dataclasses import dataclass, field

from benchmarks.common import Timer, markdown_table

SECTIONS = ("tests", "kernel", "calibration", "kmeans", "sampling", "inference")


@dataclass(frozen=True)
class Plan:
    """What one run measures (GPU: DiT-XL/2 sizes; dry run: tiny)."""

    dry_run: bool
    preset: str
    bits: tuple[int, ...] = (2, 3)
    warmup: int = 1
    repeats: int = 3
    calibration_kmeans_iters: int = 2  # the student's k-means: quality does not change step time
    recipes: tuple[str, ...] = ("quality", "paper")  # benchmarks.recipe_configs.RECIPES: the default, the paper's
    statistics_items: int | None = None  # the default recipe's statistics items (None: the engine's maximum, 1024)
    kmeans_shapes: tuple[tuple[int, int], ...] = ((1152, 1152), (4608, 1152), (1152, 4608), (6912, 1152))
    kmeans_iters: int = 25  # VQConfig's default
    kernel_shape: tuple[int, int] = (6912, 1152)
    sample_batch: int = 32
    sample_steps: int = 10
    inference_batches: tuple[int, ...] = (1, 8)
    inference_repeats: int = 5


GPU_PLAN = Plan(dry_run=False, preset="DiT-XL/2-256")
DRY_PLAN = Plan(
    dry_run=True, preset="tiny", warmup=0, repeats=1, calibration_kmeans_iters=1, statistics_items=4,
    kmeans_shapes=((64, 64), (256, 64), (64, 256), (384, 64)), kmeans_iters=2, kernel_shape=(64, 64),
    sample_batch=2, sample_steps=2, inference_batches=(1, 2), inference_repeats=1,
)


@dataclass
class Row:
    """One line of the table."""

    section: str
    what: str
    setting: str
    ms: float | None = None
    peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class Bench:
    """Clocks and memory on the device: CUDA events and the caching allocator's peak; on the CPU
    (dry run) ``perf_counter`` and no memory numbers."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn) -> float:
        """Seconds of one call of ``fn``."""
        torch = self.torch
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        with Timer() as t:
            fn()
        return t.seconds

    def median(self, fn, repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            self.once(fn)
        return statistics.median(self.once(fn) for _ in range(repeats))

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def allocated_mib(self) -> float | None:
        return self.torch.cuda.memory_allocated() / 2**20 if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def model_mib(model) -> float:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def table(rows: list[Row]) -> str:
    return markdown_table(
        ["section", "measurement", "setting", "ms", "peak GPU MiB", "note"],
        [[r.section, r.what, r.setting, "" if r.ms is None else f"{r.ms:.2f}" if r.ms < 100 else f"{r.ms:.0f}",
          "" if r.peak_mib is None else f"{r.peak_mib:.0f}", r.note] for r in rows])


def device_description(bench: Bench) -> dict:
    import torch

    info = {"device": "cpu (dry run)" if not bench.cuda else torch.cuda.get_device_name(bench.device),
            "torch": torch.__version__, "host": platform.node(), "python": platform.python_version()}
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        info.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
