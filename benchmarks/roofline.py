"""The roofline model of the projections: aten op counting on the CPU and projected H100 seconds.

:class:`OpCounter` (a ``TorchDispatchMode``) records every aten op of a run: FLOPs
(``torch.utils.flop_counter``'s formulas; 0 for ops it has none for), bytes moved (tensor inputs +
tensor outputs: what an unfused eager kernel reads and writes once; views and allocations: 0 bytes,
no kernel) and kernel launches. :class:`Counts` turns them into projected seconds on one H100 SXM,
``max(FLOPs / (peak * mm_eff), bytes / (HBM * mem_eff)) + launch`` per kernel, at an optimistic and
a pessimistic :class:`Scenario`, plus the host floor of eager PyTorch (``kernels * 10 us``).
Used by ``benchmarks/projection.py`` (calibration) and ``benchmarks/probe_projection.py`` (the
bit-allocation probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from benchmarks.common import Timer

aten = torch.ops.aten
XL_PRESET = "DiT-XL/2-256"
PROJECTION_BANNER = "PROJECTIONS, NOT MEASUREMENTS: no GPU was used; H100 times come from a roofline model of op counts measured on this CPU."

# ----------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """The projected device (H100 SXM 80 GB; dense, i.e. no 2:4 sparsity) and the host's dispatch cost."""

    name: str = "NVIDIA H100 SXM (80 GB HBM3)"
    bf16_flops: float = 989e12  # tensor cores, bf16/fp16, dense
    fp32_flops: float = 67e12  # CUDA cores: PyTorch's default disallows TF32 for matmuls
    tf32_flops: float = 494e12  # convolutions: torch.backends.cudnn.allow_tf32 defaults to True
    hbm_bytes_per_s: float = 3.35e12
    cpu_dispatch_s: float = 10e-6  # per kernel, eager Python + dispatcher + launch on the host
    # multi_tensor_apply (foreach optimizer kernels): one launch per full chunk table
    mta_chunk_elements: int = 65536
    mta_max_blocks: int = 320
    mta_max_tensors: tuple[int, ...] = (110, 64, 48, 36, 30)  # by tensor-list depth 1..5


@dataclass(frozen=True)
class Scenario:
    """Efficiencies of one roofline setting: fraction of peak reached by matmuls / memory, plus a
    fixed GPU-side cost per kernel (launch latency, tail effects of small grids)."""

    name: str
    mm_efficiency: float
    mem_efficiency: float
    launch_s: float


H100 = Hardware()
SCENARIOS = (Scenario("optimistic", 0.7, 0.8, 3e-6), Scenario("pessimistic", 0.4, 0.5, 10e-6))

# ---------------------------------------------------------------------------------- op counting

# No data movement, no kernel: views (also recognised from the schema: returns that alias an
# input without writing it) and allocations (the caching allocator launches nothing).
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "t", "as_strided", "detach", "alias", "expand", "permute", "transpose",
    "unsqueeze", "squeeze", "select", "slice", "_reshape_alias", "split", "split_with_sizes", "unbind",
    "narrow", "diagonal", "unfold", "lift_fresh", "view_as_real", "view_as_complex", "_neg_view", "_conj",
    "t_", "transpose_", "unsqueeze_", "squeeze_", "as_strided_", "detach_",
})
ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_"})
# In-place ops that overwrite ``self`` without reading it.
WRITE_ONLY_SELF = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"})
# Ops whose result the host must wait for on a GPU (a device-to-host sync).
SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
                      "_unique", "_unique2", "unique_consecutive", "unique_dim"})

FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    **flop_registry,
    # the CPU's fused SDPA kernels have no registered formula; they compute what the CUDA flash ones do
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[aten._scaled_dot_product_flash_attention_backward],
}
CONVOLUTIONS = frozenset({"convolution", "_convolution", "convolution_backward", "cudnn_convolution", "_slow_conv2d_forward"})


class OpRecord(NamedTuple):
    """One dispatched aten op: FLOPs, bytes read + written, GPU kernels, compute class
    (``bf16`` / ``fp32`` / ``tf32`` for ops with FLOPs, else None) and whether it syncs the host."""

    name: str
    flops: int
    bytes: int
    kernels: int
    compute: str | None
    sync: bool


def touched_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing ``tensor`` once: its elements, but a broadcast
    (stride-0) dimension only once, i.e. ``min(numel, strided span) * element_size``."""
    numel = tensor.numel()
    if numel == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return min(numel, span) * tensor.element_size()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def _key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def foreach_launches(tensor_lists: list[list[torch.Tensor]], hardware: Hardware) -> int:
    """Kernel launches of one CUDA ``_foreach_*`` op (``multi_tensor_apply``): a launch whenever the
    tensor table (by list depth) or the block table (``mta_max_blocks`` chunks) is full. Lists of
    0-dim tensors are optimizer step counters, kept on the host when not capturable: 0 launches."""
    first = tensor_lists[0]
    if all(t.dim() == 0 for t in first):
        return 0
    depth = min(len(tensor_lists), len(hardware.mta_max_tensors))
    chunks = sum(math.ceil(t.numel() / hardware.mta_chunk_elements) for t in first)
    by_tensors = math.ceil(len(first) / hardware.mta_max_tensors[depth - 1])
    return max(1, by_tensors, math.ceil(chunks / hardware.mta_max_blocks))


def classify_op(func, args: tuple, kwargs: dict, out: Any, hardware: Hardware = H100) -> OpRecord:
    """The :class:`OpRecord` of ``func(*args, **kwargs) -> out`` (already executed)."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    if func.namespace != "aten":  # e.g. profiler record_function markers
        return OpRecord(name, 0, 0, 0, None, False)
    is_view = name in VIEW_OPS or (
        bool(schema.returns)
        and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    )
    if is_view or name in ALLOCATION_OPS:
        return OpRecord(name, 0, 0, 0, None, False)
    reads: dict[tuple, torch.Tensor] = {}
    writes: dict[tuple, torch.Tensor] = {}
    tensor_lists: list[list[torch.Tensor]] = []
    for index, argument in enumerate(schema.arguments):
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        tensors = _tensors(value)
        if isinstance(value, (list, tuple)) and tensors:
            tensor_lists.append(tensors)
        mutated = argument.alias_info is not None and argument.alias_info.is_write
        if mutated:
            writes.update((_key(t), t) for t in tensors)
        if not mutated or not (argument.kwarg_only or name in WRITE_ONLY_SELF):  # in-place self is read too
            reads.update((_key(t), t) for t in tensors)
    for tensor in _tensors(out):
        writes.setdefault(_key(tensor), tensor)
    moved = sum(map(touched_bytes, reads.values())) + sum(map(touched_bytes, writes.values()))

    flops, compute = 0, None
    formula = FLOP_FORMULAS.get(func._overloadpacket)
    if formula is not None:
        flops = int(formula(*args, **kwargs, out_val=out))
        floating = [t for t in reads.values() if t.is_floating_point()]
        dtype = floating[0].dtype if floating else torch.float32
        if dtype in (torch.bfloat16, torch.float16):
            compute = "bf16"
        else:
            compute = "tf32" if name in CONVOLUTIONS else "fp32"
    sync = name in SYNC_OPS or (
        name in ("index", "index_put", "index_put_")
        and any(t.dtype == torch.bool for t in _tensors(args[1] if len(args) > 1 else None))
    )
    kernels = foreach_launches(tensor_lists, hardware) if name.startswith("_foreach_") and tensor_lists else 1
    return OpRecord(name, flops, moved, kernels, compute, sync)


class OpCounter(TorchDispatchMode):
    """Records an :class:`OpRecord` for every aten op dispatched while the mode is active
    (forward, autograd backward and optimizer alike); ``records`` in dispatch order."""

    def __init__(self, hardware: Hardware = H100) -> None:
        super().__init__()
        self.hardware = hardware
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.records.append(classify_op(func, args, kwargs, out, self.hardware))
        return out


# ---------------------------------------------------------------------------------- roofline


def op_seconds(record: OpRecord, scenario: Scenario, hardware: Hardware = H100) -> tuple[float, float, float]:
    """``(compute, memory, launch)`` seconds of one op; only the larger of compute and memory is
    non-zero (the roofline ``max``), launch is ``kernels * scenario.launch_s``."""
    if record.kernels == 0:
        return 0.0, 0.0, 0.0
    peak = {"bf16": hardware.bf16_flops, "fp32": hardware.fp32_flops, "tf32": hardware.tf32_flops}.get(record.compute, 0.0)
    compute = record.flops / (peak * scenario.mm_efficiency) if record.flops else 0.0
    memory = record.bytes / (hardware.hbm_bytes_per_s * scenario.mem_efficiency)
    launch = record.kernels * scenario.launch_s
    return (compute, 0.0, launch) if compute > memory else (0.0, memory, launch)


@dataclass
class Counts:
    """Summed costs of one measured run. Every field is additive, so a linear combination of
    runs (the fit in the number of blocks) is a valid run-shaped estimate.

    ``compute_s`` / ``memory_s`` / ``launch_s``: per scenario name, projected GPU seconds of the
    compute-bound ops, of the memory-bound ops, and of kernel launches. ``ops``: per op name,
    ``[kernels, flops, bytes, optimistic seconds]``.
    """

    flops: float = 0.0
    flops_fp32: float = 0.0  # of which not on bf16 tensor cores (fp32 / tf32)
    bytes: float = 0.0
    kernels: float = 0.0
    syncs: float = 0.0
    wall_s: float = 0.0  # CPU wall time of the measured run (with the counting mode on)
    compute_s: dict[str, float] = field(default_factory=dict)
    memory_s: dict[str, float] = field(default_factory=dict)
    launch_s: dict[str, float] = field(default_factory=dict)
    ops: dict[str, list[float]] = field(default_factory=dict)

    def roofline_s(self, scenario: Scenario) -> float:
        """Projected GPU time: compute-bound + memory-bound ops + launches."""
        return self.compute_s[scenario.name] + self.memory_s[scenario.name] + self.launch_s[scenario.name]

    def floor_s(self, hardware: Hardware = H100) -> float:
        """Host-side floor of eager PyTorch: every kernel costs ``cpu_dispatch_s`` to issue."""
        return self.kernels * hardware.cpu_dispatch_s

    def projected_s(self, scenario: Scenario, hardware: Hardware = H100) -> float:
        """The step cannot be faster than the GPU roofline nor than the host issuing its kernels."""
        return max(self.roofline_s(scenario), self.floor_s(hardware))


def summarise(records: Iterable[OpRecord], wall_s: float = 0.0, hardware: Hardware = H100,
              scenarios: tuple[Scenario, ...] = SCENARIOS) -> Counts:
    """Sum ``records`` into :class:`Counts` with the roofline of every scenario."""
    counts = Counts(wall_s=wall_s)
    for s in scenarios:
        counts.compute_s[s.name] = counts.memory_s[s.name] = counts.launch_s[s.name] = 0.0
    for r in records:
        counts.flops += r.flops
        counts.flops_fp32 += r.flops if r.compute in ("fp32", "tf32") else 0
        counts.bytes += r.bytes
        counts.kernels += r.kernels
        counts.syncs += r.sync
        for s in scenarios:
            compute, memory, launch = op_seconds(r, s, hardware)
            counts.compute_s[s.name] += compute
            counts.memory_s[s.name] += memory
            counts.launch_s[s.name] += launch
        entry = counts.ops.setdefault(r.name, [0.0, 0.0, 0.0, 0.0])
        entry[0] += r.kernels
        entry[1] += r.flops
        entry[2] += r.bytes
        entry[3] += sum(op_seconds(r, scenarios[0], hardware))
    return counts


def combine(terms: Iterable[tuple[float, Counts]]) -> Counts:
    """``sum_i w_i * counts_i`` field by field (dict fields key by key)."""
    result = Counts()
    for weight, counts in terms:
        for f in fields(Counts):
            value = getattr(counts, f.name)
            if isinstance(value, dict):
                target = getattr(result, f.name)
                for key, item in value.items():
                    if isinstance(item, list):
                        old = target.setdefault(key, [0.0] * len(item))
                        target[key] = [a + weight * b for a, b in zip(old, item)]
                    else:
                        target[key] = target.get(key, 0.0) + weight * item
            else:
                setattr(result, f.name, getattr(result, f.name) + weight * value)
    return result


def fit_blocks(by_layers: dict[int, Counts], layers: int) -> Counts:
    """``outside + layers * per_block`` from runs at two block counts ``L1 < L2``:
    ``per_block = (c2 - c1) / (L2 - L1)``, ``outside = c1 - L1 * per_block``."""
    if len(by_layers) != 2:
        raise ValueError(f"need runs at exactly two block counts, got {sorted(by_layers)}")
    (l1, c1), (l2, c2) = sorted(by_layers.items())
    slope = (layers - l1) / (l2 - l1)
    return combine([(1.0 - slope, c1), (slope, c2)])


def count_ops(fn: Callable[[], Any], hardware: Hardware = H100) -> Counts:
    """Run ``fn()`` once under :class:`OpCounter`; its :class:`Counts` (with CPU wall seconds)."""
    counter = OpCounter(hardware)
    with Timer() as wall, counter:
        fn()
    return summarise(counter.records, wall.seconds, hardware)



def fmt_s(seconds: float) -> str:
    """Seconds, readable from microseconds to hours."""
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 600:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"

