"""Block-by-block calibration (``CalibrationConfig.window_blocks``): which blocks are calibrated now,
where the student's blocks live, and the optimizer surgery when the window moves on. No Lightning.

With ``block_inputs="teacher"`` a block's loss depends only on that block's VQ layers (the reason
:class:`vq4dit.distributed.BlockSpread` can give rank ``r`` the blocks ``b % W == r``); the same
independence across time lets one process calibrate ``K`` consecutive blocks at a time: window ``w``
holds the blocks ``w K .. w K + K - 1``. Per step only the window's blocks run the student forward and
backward, only the window's VQ layers are in the optimizer (and require grad), and the teacher's
no-grad forward stops after the window's last block. A finished window is hardened (argmax of its
soft rows: packable, its candidates and ratio logits freed) and leaves the optimizer; the next one
enters it. VQ layers outside the blocks (a custom ``include``) belong to window 0, as they belong to
rank 0 under a spread. With ``offload`` the blocks outside the window live on the CPU.

Per step, what lives where (offload on): the trainer's device holds the teacher (``teacher_dtype``),
the student's non-block modules, the window's ``K`` student blocks with their soft state and optimizer
state, the teacher's recorded inputs and outputs of the window's blocks, and the saved tensors of the
window's ``K`` block forwards; the CPU holds the other ``L - K`` student blocks (hard, or not started).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..distributed import layer_blocks
from ..families import family_of
from ..layers import VQLinear, replace_in_optimizer_
from ..models import block_modules
from .window_inputs import BlockCall, WindowInputs


class BlockWindow:
    """Window ``index`` of ``ceil(L / size)`` windows of ``size`` consecutive blocks.

    Args:
        layer_blocks: VQ layer name -> block index (None: outside the blocks), as
            :func:`vq4dit.distributed.layer_blocks`.
        num_blocks: L, the number of transformer blocks.
        size: K, blocks per window (the last window may hold fewer).
        offload: the blocks outside the window live on the CPU.
        index: the current window; ``num_windows`` when every window is done (then every block
            and layer counts as in the window: evaluation covers the whole student).
    """

    def __init__(self, layer_blocks: dict[str, int | None], num_blocks: int, size: int, offload: bool = False,
                 index: int = 0) -> None:
        if size < 1 or num_blocks < 1:
            raise ValueError(f"a window needs size >= 1 and blocks >= 1, got size {size}, {num_blocks} blocks")
        self.layer_blocks, self.num_blocks, self.size, self.offload = dict(layer_blocks), num_blocks, size, offload
        self.index = index

    @classmethod
    def for_student(cls, student: nn.Module, size: int, offload: bool = False) -> "BlockWindow":
        """The windows of ``student``'s blocks, at the first one."""
        return cls(layer_blocks(student), len(block_modules(student)), size, offload)

    @property
    def num_windows(self) -> int:
        return math.ceil(self.num_blocks / self.size)

    @property
    def done(self) -> bool:
        """Whether every window is finished."""
        return self.index >= self.num_windows

    @property
    def is_last(self) -> bool:
        return self.index == self.num_windows - 1

    @property
    def blocks(self) -> range:
        """The block indices calibrated now (all blocks once done)."""
        if self.done:
            return range(self.num_blocks)
        return range(self.index * self.size, min((self.index + 1) * self.size, self.num_blocks))

    def owns_layer(self, name: str) -> bool:
        """Whether VQ layer ``name`` is calibrated now (layers outside the blocks: in window 0)."""
        block = self.layer_blocks[name]
        return self.done or (self.index == 0 if block is None else block in self.blocks)

    def device_of(self, block: int, device: torch.device) -> torch.device:
        """Where block ``block`` lives: ``device`` unless offloading puts it on the CPU."""
        return device if not self.offload or self.done or block in self.blocks else torch.device("cpu")

    def parked(self, student: nn.Module) -> list[nn.Module]:
        """The student blocks that live on the CPU now (none without offload)."""
        parked = self.offload and not self.done
        return [b for i, b in enumerate(block_modules(student)) if parked and i not in self.blocks]

    def describe(self) -> str:
        """E.g. ``"window 2/10 (blocks 4-7)"``."""
        if self.done:
            return f"all {self.num_windows} windows done"
        blocks = self.blocks
        return f"window {self.index + 1}/{self.num_windows} (blocks {blocks.start}-{blocks.stop - 1})"


def place_blocks_(student: nn.Module, window: BlockWindow, device: torch.device | str,
                  keep: Iterable[torch.Tensor] = ()) -> None:
    """Move every student block's tensors to where ``window`` puts the block (:meth:`BlockWindow.device_of`):
    the window's blocks to ``device``, the others to the CPU when offloading; nothing moves without
    offload. ``keep``: tensors left where they are (the teacher's, which the student shares: they
    stay with the teacher). Parameters stay the same objects (the optimizer keeps them)."""
    if not window.offload:
        return
    kept = {id(t) for t in keep}
    for index, block in enumerate(block_modules(student)):
        target = window.device_of(index, torch.device(device))
        convert_own_(block, lambda tensor: tensor.to(target), kept)


def convert_own_(module: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor], kept: set[int]) -> None:
    """Replace every parameter's data (and gradient) and every buffer of ``module`` by ``convert`` of
    it (a device move), except the tensors whose ids are in ``kept``; Parameters stay the same objects."""
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and id(param) not in kept:
                param.data = convert(param.data)
                if param.grad is not None:
                    param.grad = convert(param.grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None and id(buffer) not in kept:
                sub._buffers[name] = convert(buffer)


@contextlib.contextmanager
def held_out(root: nn.Module, modules: Sequence[nn.Module]) -> Iterator[None]:
    """Take ``modules`` out of ``root``'s module tree for the duration (``root.to(device)`` inside
    leaves them where they are); they are put back in their places whatever happens."""
    wanted = {id(m) for m in modules}
    slots = [(parent, key, child) for parent in root.modules() for key, child in parent._modules.items()
             if child is not None and id(child) in wanted]
    for parent, key, _ in slots:
        parent._modules[key] = None
    try:
        yield
    finally:
        for parent, key, child in slots:
            parent._modules[key] = child


def drop_from_optimizer_(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Remove ``params`` from ``optimizer``'s groups and free their state (running averages, moments)."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for param in [p for p in optimizer.state if id(p) in gone]:
        del optimizer.state[param]


def mutate_in_optimizer_(optimizer: torch.optim.Optimizer | None, layer: VQLinear, mutate: Callable[[], object]) -> None:
    """Run a shrinking mutator of ``layer`` (hardening, pruning: it returns the
    :class:`vq4dit.layers.RowReindex` of its ratio logits) and move ``optimizer`` onto the new ratio logits."""
    old = layer.candidate_logits
    reindex = mutate()
    if optimizer is not None and layer.candidate_logits is not old:
        replace_in_optimizer_(optimizer, old, layer.candidate_logits, reindex)


def add_to_optimizer_(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Append each of ``groups``' parameters to ``optimizer``'s group of the same ``name`` (a new
    group when there is none): the same groups, in the same order, as an optimizer built on them."""
    by_name = {group.get("name"): group for group in optimizer.param_groups}
    for group in groups:
        if group["name"] in by_name:
            by_name[group["name"]]["params"].extend(group["params"])
        else:
            optimizer.add_param_group(dict(group))


class WindowSteps:
    """What :class:`vq4dit.engine.Calibrator` does with its :class:`BlockWindow` (``self.window``,
    None without ``window_blocks``): the blocks a step computes, their placement, moving on."""

    window: BlockWindow | None
    window_inputs: WindowInputs | None  # the recorded inputs of the window's first block (window_inputs memory / disk)
    teacher: nn.Module
    student: nn.Module

    @staticmethod
    def window_store(config) -> WindowInputs | None:
        """The store of a :class:`vq4dit.engine.CalibrationConfig`'s ``window_inputs`` (None: recompute)."""
        if config.window_blocks is None or config.window_inputs == "recompute":
            return None
        return WindowInputs(config.window_inputs, config.window_inputs_dir)

    def recorded_inputs(self, batch) -> tuple[int, BlockCall] | None:
        """``(s, (args, kwargs))``: the teacher's recorded input of the window's first block ``s`` for
        ``batch`` (B items, before the unconditional copies), None when it was not recorded."""
        store, window = self.window_inputs, self.window
        if store is None or window is None or window.done or store.start == 0 or store.start != window.blocks.start:
            return None
        call = store.get(batch, next(self.teacher.parameters()).device)
        return None if call is None else (store.start, call)

    def record_window_inputs_(self, batches: Iterable, count: int | None = None, progress: bool = False) -> str | None:
        """Record the teacher's input of the current window's first block for every training batch
        of ``batches`` (each on the teacher's device, as a step gets it; ``count`` of them), from the
        previous window's recording where there is one (:meth:`WindowInputs.record_`). Returns the
        line to log; None when there is nothing to record (recompute, window 0, recorded already, done)."""
        store, window = self.window_inputs, self.window
        if store is None or window is None or window.done or window.blocks.start in (0, store.start):
            return None
        pairs = ((batch, self.model_batch(batch)) for batch in batches)
        return store.record_(family_of(self.teacher), self.teacher, pairs, window.blocks.start, count, progress)

    def calibrated_blocks(self, num_blocks: int) -> list[int]:
        """The blocks whose MSE a step computes (all of ``num_blocks`` unless under a window)."""
        return list(range(num_blocks) if self.window is None else self.window.blocks)

    def place_(self, device: torch.device | str) -> None:
        """Put the student's blocks where the window wants them (offload: the window's on
        ``device``, the others on the CPU; a no-op otherwise)."""
        if self.window is not None:
            teacher = self.teacher
            place_blocks_(self.student, self.window, device, keep=(*teacher.parameters(), *teacher.buffers()))

    def advance_window_(self, optimizer: torch.optim.Optimizer | None, device: torch.device | str) -> int:
        """Finish the window: argmax its soft rows (hard and packable; candidates and ratio logits
        freed), its parameters leave ``optimizer`` with their state; the next window's enter it and
        its blocks move to ``device`` (offload). After the last window every block counts as
        calibrated (evaluation covers the whole student). Returns the number of rows finalised."""
        if self.window is None or self.window.done:
            raise ValueError("advance_window_ needs an unfinished window (calibration.window_blocks)")
        finished = self.owned_layers()
        if optimizer is not None:
            drop_from_optimizer_(optimizer, [p for layer in finished.values() for p in layer.parameters()])
        count = sum(layer.num_soft for layer in finished.values())
        for layer in finished.values():
            layer.finalize_()
        self.window.index += 1
        if optimizer is not None and not self.window.done:
            add_to_optimizer_(optimizer, self.param_groups())
        self.update_codebook_trainability()
        self.place_(device)
        return count

    def each_window(self, device: torch.device | str) -> Iterator[None]:
        """Make every window the current one in turn (its blocks on ``device`` under offload), then
        return to the current one: evaluation of the whole student with ``K`` blocks on the device at
        a time. A single pass without an unfinished window."""
        if self.window is None or self.window.done:
            yield
            return
        current = self.window.index
        try:
            for index in range(self.window.num_windows):
                self.window.index = index
                self.place_(device)
                yield
        finally:
            self.window.index = current
            self.place_(device)

    def finish_windows_(self, device: torch.device | str) -> None:
        """End block-by-block calibration (the run stopped): every window counts as done, every
        block goes to ``device``. Soft rows of windows never reached stay for the final argmax."""
        if self.window_inputs is not None:
            self.window_inputs.clear_()  # the last window's recording (its files)
        if self.window is not None:
            self.window.index = self.window.num_windows
            self.update_codebook_trainability()
            self.place_(device)
