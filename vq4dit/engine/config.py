"""Typed settings of a calibration run (the VQ settings of the layers are :class:`vq4dit.VQConfig`):
how it is calibrated (:class:`CalibrationConfig`), which layers (:class:`LayerSelection`), and the
per-layer bit allocation (:class:`BitAllocation`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from torch import nn

from ..families import FilterFn, family_of
from ..typed_settings import recipe_field

BlockInputs = Literal["student", "teacher"]
Regularizer = Literal["official", "paper"]
CodebookTraining = Literal["after_hardening", "simultaneous"]
OptimizerName = Literal["rmsprop", "adam"]
TeacherDtype = Literal["float32", "bfloat16"]
WindowInputs = Literal["recompute", "memory", "disk"]


def check_choice(name: str, value: object, literal: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of the ``Literal``'s choices."""
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """How the soft assignments, codebooks and biases are calibrated (paper Eq. 8-10).

    Args:
        block_inputs: ``student`` (block ``l`` sees the quantized block ``l-1``'s output, end to
            end: official code) or ``teacher`` (every block gets the FP input of that block).
        regularizer: ratio regulariser, ``official`` (n r(1-r)) or ``paper`` (1-|2r-1|).
        regularizer_weight: lambda_r.
        regularizer_gating: official gating: add L_r only when it rose above its running minimum.
        gate_window: steps after which the gating minimum is reset (official: one trajectory).
        codebook_training: ``after_hardening`` (a layer's codebook trains once all its rows are
            hard: official code) or ``simultaneous`` (with the ratios: the paper's wording).
        optimizer: ``rmsprop`` (official: alpha 0.9, eps 1e-8) or ``adam``.
        rmsprop_alpha: smoothing constant of RMSprop's running mean of squared gradients
            (official: 0.9; torch's default: 0.99).
        lr_codebook: learning rate of the codebooks.
        lr_bias: learning rate of the quantized layers' biases.
        lr_logits: learning rate of the ratio logits.
        lr_row_scale: learning rate of the row scales (``vq.row_scale``; None: ``lr_codebook``); 0
            keeps them at their start, the rows' RMS. RMSprop moves a scale by about this much per
            step whatever its size (docs/quality.md, "The row scales' step": 3e-5 is better at 3
            bits on two of the suite's models, worse at the digits paper preset).
        teacher_dtype: dtype of the frozen teacher once the student is built (k-means and the
            trajectories use float32).
        output_weight: (None: the recipe decides) weight of an output-level term, the MSE of the final noise
            prediction (``block_inputs="student"`` only), next to the mean block MSE (0: the
            paper's loss).
        window_blocks: (None: every block at once) block-by-block calibration: K consecutive blocks are
            calibrated at a time from the teacher's block inputs (needs ``block_inputs="teacher"``); the
            other blocks are outside the optimizer, a finished window is hardened (``callbacks.BlockWindows``
            moves the window on).
        window_inputs: (``window_blocks`` only) where the teacher's input of the window's first block
            comes from: ``recompute`` (the teacher runs from the model's input, through every block
            before the window, every step), ``memory`` or ``disk`` (recorded once per training batch
            when the window starts, kept in host RAM or in files, :mod:`vq4dit.engine.window_inputs`:
            the teacher's blocks run once per batch over the whole run; same result).
        window_inputs_dir: the folder of ``window_inputs="disk"`` (``train.py``: default
            ``<default_root_dir>/window_inputs``).
        statistics_items: the calibration items (at most; evenly strided over all of them) whose
            activations give the input statistics of the student build (activation-aware k-means,
            error feedback's ``E[x x^T]``); the build's teacher passes cost in proportion.
    """

    block_inputs: BlockInputs = "student"
    regularizer: Regularizer = "official"
    regularizer_weight: float = 1.0
    regularizer_gating: bool = True
    gate_window: int = 50
    codebook_training: CodebookTraining = "after_hardening"
    optimizer: OptimizerName = "rmsprop"
    rmsprop_alpha: float = 0.9
    lr_codebook: float = 1e-4
    lr_bias: float = 1e-4
    lr_logits: float = 5e-2
    lr_row_scale: float | None = None
    teacher_dtype: TeacherDtype = "float32"
    output_weight: float | None = recipe_field(0.0)
    window_blocks: int | None = None
    window_inputs: WindowInputs = "recompute"
    window_inputs_dir: str | None = None
    statistics_items: int = 1024

    def __post_init__(self) -> None:
        check_choice("block_inputs", self.block_inputs, BlockInputs)
        check_choice("regularizer", self.regularizer, Regularizer)
        check_choice("codebook_training", self.codebook_training, CodebookTraining)
        check_choice("optimizer", self.optimizer, OptimizerName)
        check_choice("teacher_dtype", self.teacher_dtype, TeacherDtype)
        for name in ("lr_codebook", "lr_bias", "lr_logits", "lr_row_scale", "regularizer_weight", "output_weight"):
            value = getattr(self, name)
            if name in ("output_weight", "lr_row_scale") and value is None:
                continue  # the recipe decides / lr_codebook
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if (self.output_weight or 0) > 0 and self.block_inputs != "student":
            raise ValueError("output_weight needs block_inputs='student' (teacher inputs give no student output)")
        if not isinstance(self.rmsprop_alpha, (int, float)) or not 0 <= self.rmsprop_alpha < 1:
            raise ValueError(f"rmsprop_alpha must be in [0, 1), got {self.rmsprop_alpha}")
        if self.window_blocks is not None:
            if isinstance(self.window_blocks, bool) or not isinstance(self.window_blocks, int) or self.window_blocks < 1:
                raise ValueError(f"window_blocks must be an integer >= 1 (or None), got {self.window_blocks!r}")
            if self.block_inputs != "teacher":
                raise ValueError("window_blocks needs block_inputs='teacher' (a window's blocks are calibrated from the "
                                 f"teacher's block inputs), got block_inputs={self.block_inputs!r}")
        check_choice("window_inputs", self.window_inputs, WindowInputs)
        if self.window_inputs != "recompute" and self.window_blocks is None:
            raise ValueError(f"window_inputs={self.window_inputs!r} needs window_blocks (it records the inputs "
                             "of each window's first block)")
        if isinstance(self.statistics_items, bool) or not isinstance(self.statistics_items, int) or self.statistics_items < 1:
            raise ValueError(f"statistics_items must be an integer >= 1, got {self.statistics_items!r}")
        if not isinstance(self.gate_window, int) or self.gate_window < 1:
            raise ValueError(f"gate_window must be >= 1, got {self.gate_window}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class LayerSelection:
    """Which Linear layers are quantized, and with which per-layer VQ settings.

    Args:
        include: glob patterns of the Linear layers to quantize (None: the model family's default
            set; DiT: the 7 core Linears per block, PixArt: the 10 Linears per block).
        exclude: glob patterns of Linear layers left in full precision.
        overrides: glob or layer name -> VQ settings of those layers, e.g.
            ``{"*.norm1.linear": {"codebook_size": 1024}}``.
        options: layer options of the model family that widen (or, set false, narrow) its default set,
            e.g. ``{"quantize_adaln": true}`` (PixArt: ``adaln_single.linear`` too),
            ``{"quantize_modulation": false}`` (SD3: the blocks' modulation stays FP); not with ``include``.
    """

    include: list[str] | None = None
    exclude: list[str] | None = None
    overrides: dict[str, dict[str, int]] | None = None
    options: dict[str, bool] | None = None

    def linear_filter(self, model: nn.Module) -> FilterFn | None:
        """The default-set filter of ``model``'s family with :attr:`options` (None without options:
        the family's plain default). ``ValueError`` for an option the family does not have, or
        options given with ``include``."""
        if not self.options:
            return None
        if self.include:
            raise ValueError("layers.options widen the default layer set; with layers.include they do nothing")
        return family_of(model).linear_filter(**self.options)


@dataclass(frozen=True, kw_only=True)
class BitAllocation:
    """Per-layer codebook sizes (k / 4 .. 4 k, same d) chosen from each layer's measured
    sensitivity so that the quantized layers cost ``budget`` bits per weight.

    Args:
        enabled: (None: the recipe decides) allocate the bits per layer (a budget implies it: None with a budget
            is True, False with a budget is refused).
        budget: bits per weight all-in (codes, codebooks, row scales) of the quantized layers
            (None: what the uniform k, d cost: the same bits, spent where they matter).
        span: options ``k / 2^span .. k * 2^span`` around each layer's ``k`` (1: no layer below
            ``k / 2``).
        gain_items: calibration items (plus null-label copies) of the one forward per layer, at its
            base ``k``, that turns the predicted layer error into final-output error (the gain).
        check_items: held-out calibration items on which the allocated start is compared with the
            uniform start (final-output MSE, both built with the run's levers); the uniform
            setting is kept when allocation is worse. 0: no check.
        probe_kmeans_iters: (None: every option built in full) Lloyd iterations of the options
            other than the base ``k`` while probing (their predicted error is scaled by what the
            full build gains at the base ``k``; the chosen ones are then built in full). Faster,
            less exact: docs/performance.md measures it.
        probe_points_per_codeword: (None: every sub-vector) the k-means Lloyd iterations of the
            options other than the base ``k`` run on a random sample of this many sub-vectors per
            codeword (faiss's default cap, 256); their assignment (error feedback) covers every
            sub-vector. The base ``k`` is built as without allocation.
    """

    enabled: bool | None = recipe_field(False)
    budget: float | None = None
    span: int = 1
    gain_items: int = 16
    check_items: int = 32
    probe_kmeans_iters: int | None = None
    probe_points_per_codeword: int | None = 256

    def __post_init__(self) -> None:
        for name in ("span", "gain_items", "check_items", "probe_kmeans_iters", "probe_points_per_codeword"):
            value, least = getattr(self, name), 1 if name in ("gain_items", "probe_points_per_codeword") else 0
            if name.startswith("probe_") and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"allocation {name} must be an integer >= {least}, got {value!r}")
        if self.budget is None:
            return
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) \
                or not math.isfinite(self.budget) or self.budget <= 0:
            raise ValueError(f"bit_budget must be a positive number of bits per weight, got {self.budget!r}")
        if self.enabled is None:
            object.__setattr__(self, "enabled", True)  # a budget implies allocation
        elif not self.enabled:
            raise ValueError("bit_budget needs bit_allocation (allocation.budget is set and allocation.enabled "
                             "was turned off explicitly)")
