"""Recorded window inputs (``CalibrationConfig.window_inputs``): the teacher's input of the current
window's first block, recorded once per training batch when the window starts, so that a windowed
step runs the teacher from there (the window's blocks only) instead of from the model's input. No
Lightning.

Without it a step of window ``w`` runs the teacher's no-grad forward through every block before the
window (on FLUX.1-dev's last window, 53 of 57 blocks) for the window's ``K``. With it the teacher's
blocks run once per batch over the whole run: recording window ``w + 1``'s inputs runs window
``w``'s teacher blocks from window ``w``'s recorded inputs, batch by batch.

How a forward starts at block ``s`` (:func:`teacher_from`): the family's block lists are shortened
to the blocks from ``s`` on for the duration (the model's own loop then skips the others), and a
forward pre-hook replaces block ``s``'s arguments by the recorded ones. The embedders before the
blocks still run (cheap: patch and text embedders, RoPE). Such a forward always stops at or after
the window (:class:`StopForward`): the model's head never runs on shortened lists.

Batches are found by content (:func:`batch_key`: a digest of a strided sample of every tensor), so
the training loop must repeat the same batches: the data module groups the items into fixed batches
once (``fixed_batches``) and shuffles only their order. A batch not recorded (validation) runs the
teacher from the model's input, as without recording: the result is the same either way.

Where the inputs live: ``memory`` (host RAM, moved to the device per step) or ``disk`` (one file per
batch under ``folder``, read per step). A recording that does not fit (the first batch's size x the
batches, against the free space or the available RAM), or a write that fails (a full disk), falls
back to the teacher from the model's input for the rest of the run, with one warning line: the
calibration itself is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from ..atomic import atomic_path
from ..write_faults import WriteError, check_room

WindowInputsMode = Literal["recompute", "memory", "disk"]
BlockCall = tuple[tuple, dict]  # (args, kwargs) as a block received them


class StopForward(Exception):
    """Raised by a hook after (or before) the last block a forward needs: the rest is not run."""


def map_tensors(value: Any, convert: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` (tensors in tuples, lists and dicts, anything else kept) with every tensor converted."""
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, convert) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, convert) for k, v in value.items()}
    return value


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value`` (tuples, lists, dicts by sorted key), in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_of(v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from tensors_of(value[k])


def batch_key(batch: Any, sample: int = 4096) -> str:
    """A digest of ``batch``'s tensors: shapes, dtypes and about ``sample`` values of each, strided
    over the whole tensor (the noisy latents differ everywhere between items)."""
    digest = hashlib.sha1()
    for tensor in tensors_of(batch):
        flat = tensor.detach().reshape(-1)
        part = flat[:: max(1, flat.numel() // sample)].cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    return digest.hexdigest()


def nbytes_of(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(value))


@contextlib.contextmanager
def teacher_from(family, model: nn.Module, start: int, call: BlockCall | None) -> Iterator[None]:
    """Within the block, ``model``'s forward skips the blocks before ``start`` and block ``start``
    receives ``call`` instead of what the forward computed (nothing changes when ``call`` is None).
    The caller must stop the forward at or after block ``start`` (:class:`StopForward`)."""
    if call is None or start == 0:
        yield
        return
    lists, position, saved = family.block_lists, 0, []
    block = family.blocks(model)[start]
    try:
        for attribute in lists:
            found = model._modules[attribute]
            kept = [b for i, b in enumerate(found, position) if i >= start]
            position += len(found)
            saved.append((attribute, found))
            model._modules[attribute] = nn.ModuleList(kept)
        handle = block.register_forward_pre_hook(lambda _m, _a, _k: call, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()
    finally:
        for attribute, found in saved:
            model._modules[attribute] = found


def record_block_input(family, model: nn.Module, batch: Any, target: int, start: int = 0,
                       call: BlockCall | None = None, device: torch.device | str | None = None) -> BlockCall:
    """The arguments block ``target`` receives when ``model`` runs on the model batch ``batch``
    (no grad; the forward stops before block ``target``), starting at block ``start`` with ``call``
    (:func:`teacher_from`) when given; ``device``: where the batch goes first (None: where it is)."""
    recorded: list[BlockCall] = []

    def keep(_module, args, kwargs):
        recorded.append((args, kwargs))
        raise StopForward

    handle = family.blocks(model)[target].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad(), teacher_from(family, model, start, call):
            family.forward(model, batch, device)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not recorded:
        raise RuntimeError(f"the forward never reached block {target}")
    return recorded[0]


class WindowInputs:
    """The recorded inputs of block ``start`` (0: none recorded) for every training batch.

    Args:
        mode: ``memory`` (host RAM) or ``disk`` (files under ``folder``).
        folder: where ``disk`` writes (one sub-folder per recorded block, the previous one deleted).
    """

    def __init__(self, mode: WindowInputsMode, folder: str | Path | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"window inputs are kept in memory or on disk, got {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("window_inputs='disk' needs a folder (window_inputs_dir)")
        self.mode, self.folder = mode, None if folder is None else Path(folder)
        self.start, self.entries, self.hits, self.nbytes = 0, {}, 0, 0
        self._pending, self._target, self._count, self._total = {}, 0, None, 0  # a recording under way
        self.stopped: str | None = None  # why recording stopped (the run recomputes from then on)

    def _file(self, start: int, key: str) -> Path:
        return self.folder / f"block_{start:03d}" / f"{key}.pt"

    def get(self, batch: Any, device: torch.device | str) -> BlockCall | None:
        """The recorded arguments of block ``start`` for ``batch`` (on ``device``), None when not recorded."""
        if self.start == 0:
            return None
        key = batch_key(batch)
        if key not in self.entries:
            return None
        try:
            call = self._load(key, device)
        except Exception as err:  # noqa: BLE001  (gone, truncated, garbage: torch.load raises OSError,
            # RuntimeError, EOFError, UnpicklingError, IndexError...): recompute from here on
            self.clear_()
            self.stopped = f"cannot read {self._file(self.start, key)}: {err}".splitlines()[0]
            warnings.warn(f"window inputs: {self.stopped}; the teacher runs from the model's input every step "
                          "from here on", stacklevel=2)
            return None
        self.hits += 1
        return call

    def _load(self, key: str, device: torch.device | str) -> BlockCall:
        if self.mode == "memory":
            return map_tensors(self.entries[key], lambda t: t.to(device, non_blocking=True))
        return torch.load(self._file(self.start, key), map_location=device, weights_only=True)

    def clear_(self) -> None:
        """Forget every recording (and delete its files)."""
        if self.mode == "disk" and self.start:
            shutil.rmtree(self.folder / f"block_{self.start:03d}", ignore_errors=True)
        self.start, self.entries, self.nbytes = 0, {}, 0

    def record_(self, family, teacher: nn.Module, batches: Iterable[tuple[Any, Any]], target: int,
                count: int | None = None, progress: bool = False) -> str:
        """Record block ``target``'s input for every ``(batch, model_batch)`` of ``batches`` (the
        key is the batch's, the forward the model batch's), from the current recording where there
        is one; each batch's previous recording is deleted once its new one is written (one
        recording at a time). Returns the line to log: what was recorded, or why recording stopped
        (it then stays off: the run recomputes)."""
        from tqdm.auto import tqdm

        if self.stopped:
            return f"window inputs: not recorded ({self.stopped})"
        self.begin_(target, count)
        try:
            for batch, model_batch in tqdm(batches, total=count, desc=f"recording block {target}'s inputs",
                                           unit="batch", disable=not progress, leave=False):
                self.record_one_(family, teacher, batch, model_batch)
        except (WriteError, MemoryError) as err:
            return self.abort_(err)
        return self.commit_()

    # a recording batch by batch (the student build records while it gathers its statistics)
    def begin_(self, target: int, count: int | None) -> None:
        """Start recording block ``target``'s inputs of ``count`` batches (an earlier run's files go)."""
        if self.mode == "disk" and self.start == 0 and self.folder.is_dir():  # an earlier run's leftovers
            for stale in self.folder.glob("block_[0-9][0-9][0-9]"):
                shutil.rmtree(stale, ignore_errors=True)
        self._pending, self._target, self._count, self._total = {}, target, count, 0

    def record_one_(self, family, teacher: nn.Module, batch: Any, model_batch: Any) -> None:
        """Record one batch (from its current recording where there is one); raises ``WriteError`` /
        ``MemoryError`` when the recording does not fit (:meth:`abort_` then)."""
        key, target, device = batch_key(batch), self._target, next(teacher.parameters()).device
        previous = self.start if self.start and key in self.entries else 0
        call = self._load(key, device) if previous else None
        found = record_block_input(family, teacher, model_batch, target, previous, call, device)
        found = map_tensors(found, lambda t: t.detach().to("cpu", copy=True))
        if not self._pending:  # the previous recording's room is freed as this one is written
            self._check_room(nbytes_of(found) * (self._count or 1) - self.nbytes, target)
        if self.mode == "disk":
            with atomic_path(self._file(target, key)) as tmp:
                torch.save(found, tmp)
            self._pending[key] = None
        else:
            self._pending[key] = found
        if previous:  # at most one recording (and one batch) at a time
            self.entries.pop(key)
            if self.mode == "disk":
                self._file(previous, key).unlink(missing_ok=True)
        self._total += nbytes_of(found)

    def commit_(self) -> str:
        """The recording started by :meth:`begin_` is the current one; returns the line to log."""
        entries, target, total = self._pending, self._target, self._total
        self.clear_()
        self.start, self.entries, self.nbytes, self._pending = target, entries, total, {}
        where = "host RAM" if self.mode == "memory" else str(self.folder / f"block_{target:03d}")
        return f"window inputs: block {target}'s inputs of {len(entries)} batches recorded ({total / 2**30:.2f} GiB, {where})"

    def abort_(self, err: Exception) -> str:
        """Drop every recording after ``err`` (a recording that does not fit); recording stays off."""
        self.clear_()
        if self.mode == "disk":
            shutil.rmtree(self.folder / f"block_{self._target:03d}", ignore_errors=True)
        self._pending = {}
        self.stopped = f"{err}; the teacher runs from the model's input every step from here on"
        return f"window inputs: recording stopped ({self.stopped})"

    def _check_room(self, nbytes: int, target: int) -> None:
        if self.mode == "disk":
            check_room(self.folder / f"block_{target:03d}", nbytes)
            return
        available = _available_ram()
        if available is not None and nbytes > available:
            raise MemoryError(f"block {target}'s inputs need about {nbytes / 2**30:.2f} GiB more host RAM, "
                              f"{available / 2**30:.2f} GiB available (window_inputs: disk keeps them on disk)")


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
