"""``VQLinear``: a Linear layer with a vector-quantized weight (soft calibration mode, hard packed mode).

Model patching (``quantize_``) lives in ``vq4dit.quantize``.

A ``VQLinear`` stores one codebook per layer and a code per sub-vector. While calibrating, a
subset of sub-vectors ("soft rows") additionally keeps ``n`` candidate codewords with learnable
ratio logits; their weight is the ratio-weighted average of the candidates (paper Eq. 7). The
in-place mutators (``harden_rows_``, ``prune_candidates_``, ``finalize_``) move rows from the soft
set to the hard set and *really shrink* the soft tensors; they return a :class:`RowReindex` so a
caller holding optimizer state for ``candidate_logits`` can shrink that state the same way.

Hard layers used for inference (no gradient wanted) have two modes, set per model with
:func:`set_inference_mode_`: ``decode`` (default) builds the dense weight inside ``forward`` and
frees it right after, so at most one layer's dense weight exists at a time; ``cached`` decodes
once and keeps the dense weight in a non-persistent buffer (FP speed, FP memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .assignment import assign_options
from .codewords import index_dtype, init_candidate_logits
from .decoding import DECODE_CHUNK_ELEMENTS, HardDecoding, InferenceMode
from .soft import candidate_ratios, vq_weight
from .vq_config import VQConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class InputMoments:
    """Second moments of one Linear layer's inputs ``x [in]`` on the calibration trajectories.

    Args:
        diagonal: ``E[x_j^2]`` ``[in]``: weighs every input dimension under
            ``kmeans_metric="activation"``.
        full: ``E[x x^T]`` ``[in, in]`` (its diagonal is ``diagonal``), which ``error_feedback``
            needs; None where only the diagonal was collected.
    """

    diagonal: torch.Tensor
    full: torch.Tensor | None = None

    @classmethod
    def from_full(cls, full: torch.Tensor) -> "InputMoments":
        """Both moments from ``E[x x^T]`` ``[in, in]``."""
        return cls(diagonal=full.diagonal(), full=full)

    def without_full(self) -> "InputMoments":
        """Only the diagonal (the full matrix is ``in^2`` floats: 85 MB for a 4608-wide layer)."""
        return InputMoments(diagonal=self.diagonal.clone())


@dataclass
class RowReindex:
    """How the soft tensors ``[S, n]`` were shrunk to ``[S', n']``: ``new = old[rows][:, cols]``.

    ``columns`` is ``[S', n']`` (a per-row gather) or ``None`` when the columns are unchanged.
    """

    rows: torch.Tensor
    columns: torch.Tensor | None = None

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the same shrink to any tensor shaped like ``candidate_logits``."""
        kept = tensor.index_select(0, self.rows.to(tensor.device))
        if self.columns is not None:
            kept = kept.gather(1, self.columns.to(tensor.device))
        return kept.contiguous()


class VQLinear(HardDecoding, nn.Module):
    """Linear layer with a vector-quantized weight: codebook + codes, optionally soft candidates.

    Buffers and parameters (N = out * in / d sub-vectors, S = soft rows, n = candidates):
        codebook         Parameter [k, d]
        codes            buffer    [N]      smallest integer dtype for k; valid for hard rows
        soft_rows        buffer    [S]      int32 indices of the soft sub-vectors
        candidates       buffer    [S, n]   candidate codeword indices, best-first at init
        candidate_logits Parameter [S, n]   softmax -> ratios; -inf marks a pruned candidate
        bias             Parameter [out] or None
        row_scales       Parameter [out] or None (``config.row_scale``): weight row i = row_scales[i] x codewords
        cached_weight    buffer    [out, in] or None; non-persistent, only in ``cached`` mode
    Hard mode is simply S == 0: ``weight = codebook[codes]``.

    ``inference_mode`` (``decode`` or ``cached``) chooses how a hard layer gets its dense weight
    when no gradient is wanted (``torch.no_grad``/``inference_mode`` or a frozen codebook): see
    :meth:`forward`. Soft layers, and hard layers whose codebook is trained, always use the
    differentiable :meth:`weight`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: VQConfig,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config.validate_for(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        k, d, n = config.codebook_size, config.subvector_dim, config.num_candidates
        num_subvectors = out_features * in_features // d
        factory = {"device": device}
        self.codebook = nn.Parameter(torch.zeros(k, d, dtype=dtype or torch.float32, **factory))
        self.register_buffer("codes", torch.zeros(num_subvectors, dtype=index_dtype(k), **factory))
        self.register_buffer("soft_rows", torch.zeros(0, dtype=torch.int32, **factory))
        self.register_buffer("candidates", torch.zeros(0, n, dtype=index_dtype(k), **factory))
        self.candidate_logits = nn.Parameter(torch.zeros(0, n, **factory))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **factory))
        else:
            self.register_parameter("bias", None)
        if config.row_scale:
            self.row_scales = nn.Parameter(torch.ones(out_features, dtype=dtype or torch.float32, **factory))
        else:
            self.register_parameter("row_scales", None)
        self.inference_mode: InferenceMode = "decode"
        self.decode_chunk_elements = DECODE_CHUNK_ELEMENTS
        self.register_buffer("cached_weight", None, persistent=False)  # [out, in] in cached mode
        self._cache_key: tuple | None = None  # (codebook ptr, version, codes ptr, version) at decode
        self._cache_codebook: torch.Tensor | None = None  # codebook values at decode (catches .data writes)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, config: VQConfig, name: str = "layer",
                    moments: InputMoments | None = None, seconds: dict[str, float] | None = None) -> "VQLinear":
        """Quantize ``linear``: k-means codebook, n nearest candidates, initial ratio logits.

        With ``num_candidates == 1`` every row starts hard (plain VQ, nearest codeword).
        ``moments``: the layer's input second moments; ``config.kmeans_metric == "activation"``
        needs their ``diagonal`` E[x^2] ``[in]``, ``config.error_feedback`` their ``full``
        E[x x^T] ``[in, in]`` (:func:`vq4dit.error_feedback.error_feedback_assign`). ``seconds``:
        wall time of the assignment with error feedback is added to ``seconds["feedback"]``.
        """
        return cls.from_linear_options(linear, [config], name, moments, seconds)[0]

    @classmethod
    @torch.no_grad()
    def from_linear_options(cls, linear: nn.Linear, configs: Sequence[VQConfig], name: str = "layer",
                            moments: InputMoments | None = None, seconds: dict[str, float] | None = None,
                            lloyd_points: Sequence[int | None] | None = None) -> list["VQLinear"]:
        """:meth:`from_linear` of one ``linear`` under each of ``configs``, built together (one
        error-feedback pass for the configs that can share it; ``lloyd_points``: per config, the
        k-means Lloyd sample per codeword, None for all: :func:`vq4dit.assignment.assign_options`)."""
        diagonal = None if moments is None else moments.diagonal
        hessian = None if moments is None else moments.full
        weight = linear.weight.detach()
        layers = []
        for config, start in zip(configs, assign_options(weight, configs, diagonal, hessian, name, seconds,
                                                                  lloyd_points)):
            layer = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None,
                        device=weight.device)
            if start.scales is not None:
                layer.row_scales.data.copy_(start.scales)
            layer.codebook.data.copy_(start.codebook)
            layer.codes.copy_(start.nearest[:, 0].to(layer.codes.dtype))
            if config.num_candidates > 1:
                layer.soft_rows = torch.arange(start.nearest.shape[0], dtype=torch.int32, device=weight.device)
                layer.candidates = start.nearest.to(layer.codes.dtype)
                layer.candidate_logits.data = init_candidate_logits(start.sq_distances, config.ratio_init)
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach().float())
            layers.append(layer)
        return layers

    # ------------------------------------------------------------------------------- properties
    @property
    def num_subvectors(self) -> int:
        return self.codes.numel()

    @property
    def num_soft(self) -> int:
        return self.soft_rows.numel()

    @property
    def is_hard(self) -> bool:
        """True when every sub-vector has its final code (no soft rows left)."""
        return self.num_soft == 0

    @property
    def hard_fraction(self) -> float:
        return 1.0 - self.num_soft / max(self.num_subvectors, 1)

    @property
    def active_candidates(self) -> int:
        """Candidate columns the soft rows still have: ``config.num_candidates`` (the configured n)
        at the start, fewer once pruning removed a column from every row."""
        return self.candidates.shape[1]

    def ratios(self) -> torch.Tensor:
        """Softmax ratios of the soft rows: ``[S, n]`` (float32; a transposed view, see
        ``candidate_ratios``)."""
        return candidate_ratios(self.candidate_logits)

    def bits_per_weight(self, include_codebook: bool = True) -> float:
        """log2(k)/d, plus the FP32 codebook amortised over this layer when asked."""
        if include_codebook:
            return self.config.stored_bits_per_weight(self.out_features, self.in_features)
        return self.config.nominal_bits_per_weight

    # ---------------------------------------------------------------------------------- forward
    def weight(self) -> torch.Tensor:
        """The current dense weight ``[out, in]``: hard codewords, soft rows mixed by ratios.

        Differentiable in ``codebook`` and ``candidate_logits``; keeps no intermediate for the
        backward besides the layer's own tensors (``soft.vq_weight``).
        """
        flat = vq_weight(self.codebook, self.codes, self.soft_rows, self.candidates, self.candidate_logits)  # [N, d]
        weight = flat.view(self.out_features, self.in_features)
        return weight if self.row_scales is None else weight * self.row_scales.unsqueeze(1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``.

        Soft rows, or autograd needed (grad mode on and ``x``, codebook or bias requiring grad):
        the differentiable dense :meth:`weight`, as in calibration. Otherwise (hard inference):
        ``decode`` mode computes in the compute dtype (autocast dtype or ``x.dtype``) through
        :meth:`_decode_linear`; ``cached`` mode reuses a dense weight kept in the codebook's dtype.
        """
        autocast = torch.is_autocast_enabled(x.device.type)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.codebook, self.bias, self.row_scales)
        )
        if self.num_soft or needs_grad:
            if self.cached_weight is not None:
                self.clear_cached_weight_()
            weight = self.weight()
        elif self.inference_mode == "decode":
            return self._decode_linear(x, torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
        else:
            weight = self._dense_cached()
        bias = self.bias
        if autocast:
            return F.linear(x, weight, bias)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half()/...: drop the cache instead of converting it (rebuilt lazily if still cached)
        self.clear_cached_weight_()
        return super()._apply(fn, recurse)

    # --------------------------------------------------------------------------------- mutators
    def _set_logits_(self, logits: torch.Tensor, grad: torch.Tensor | None) -> None:
        # A *new* Parameter: autograd caches a leaf's shape, so resizing ``.data`` in place breaks
        # the next backward. Callers holding optimizer state use ``replace_in_optimizer_``.
        requires_grad = self.candidate_logits.requires_grad
        self.candidate_logits = nn.Parameter(logits.contiguous(), requires_grad=requires_grad)
        self.candidate_logits.grad = grad

    def _shrink_(self, reindex: RowReindex) -> RowReindex:
        rows = reindex.rows.to(self.soft_rows.device)
        self.soft_rows = self.soft_rows.index_select(0, rows)
        self.candidates = reindex.apply(self.candidates)
        grad = self.candidate_logits.grad
        self._set_logits_(reindex.apply(self.candidate_logits.data), None if grad is None else reindex.apply(grad))
        return reindex

    @torch.no_grad()
    def harden_rows_(self, threshold: float = 0.99) -> RowReindex:
        """Give every soft row whose top ratio exceeds ``threshold`` its final code (the argmax
        candidate) and drop it from the soft set. Returns how the soft tensors were shrunk."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        top_ratio, top = self.ratios().max(dim=1)  # [S], [S]
        return self._harden_mask_(top_ratio > threshold, top)

    @torch.no_grad()
    def _harden_mask_(self, done: torch.Tensor, top: torch.Tensor) -> RowReindex:
        if not done.any():  # nothing hardens: no copies of the soft tensors (identity reindex)
            return RowReindex(rows=torch.arange(done.numel(), device=done.device))
        self.clear_cached_weight_()
        rows = self.soft_rows[done].long()
        chosen = self.candidates[done].long().gather(1, top[done].unsqueeze(1)).squeeze(1)
        self.codes[rows] = chosen.to(self.codes.dtype)
        keep = (~done).nonzero().squeeze(1)
        return self._shrink_(RowReindex(rows=keep))

    @torch.no_grad()
    def prune_candidates_(self, floor: float = 0.01) -> RowReindex:
        """Remove candidates whose ratio fell below ``floor`` and shrink the stored candidate set.

        When something is pruned, each row's candidates are re-ordered by ratio (best first);
        rows left with a single candidate become hard; the candidate columns shrink to the largest
        count still in use (a row with fewer live candidates than that marks the rest with logit
        -inf). When nothing falls below ``floor``, nothing is copied (identity reindex).
        """
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {floor}")
        if self.num_soft == 0:
            return RowReindex(rows=torch.zeros(0, dtype=torch.long, device=self.codes.device))
        ratios = self.ratios()
        if floor * self.active_candidates <= 1.0:  # the best candidate (ratio >= 1/n) always survives
            newly_dead = (ratios < floor) & torch.isfinite(self.candidate_logits)
            if not newly_dead.any():  # the common case: skip the sort and the re-layout
                return RowReindex(rows=torch.arange(self.num_soft, device=self.codes.device))
        order = ratios.argsort(dim=1, descending=True)  # [S, n]
        sorted_ratios = ratios.gather(1, order)
        alive = sorted_ratios >= floor
        alive[:, 0] = True  # the best candidate always survives
        live_count = alive.sum(dim=1)
        # Rows down to one live candidate are hard; the rest keep max(live_count) columns.
        single = live_count == 1
        reindex = self._harden_mask_(single, order[:, 0])
        order, alive = order[~single], alive[~single]
        width = int(live_count[~single].max()) if order.shape[0] else 1
        columns = order[:, :width]
        self.candidates = self.candidates.gather(1, columns)
        logits = self.candidate_logits.data.gather(1, columns)
        logits[~alive[:, :width]] = float("-inf")
        grad = self.candidate_logits.grad
        self._set_logits_(logits, None if grad is None else grad.gather(1, columns))
        return RowReindex(rows=reindex.rows, columns=columns)

    @torch.no_grad()
    def finalize_(self) -> RowReindex:
        """Argmax for every remaining soft row: the layer is hard afterwards, always.

        A row whose ratios are not finite (NaN/Inf ``candidate_logits``, or all pruned) gets its
        first candidate: the nearest codeword at init, the best one after pruning.
        """
        top_ratio, top = self.ratios().max(dim=1)  # [S], [S]
        broken = ~torch.isfinite(top_ratio)
        if broken.any():
            log.warning("finalize_: %d soft rows have non-finite ratios; they get their first candidate",
                        int(broken.sum()))
            top = top.masked_fill(broken, 0)
        return self._harden_mask_(torch.ones_like(broken), top)

    # ----------------------------------------------------------------------------- persistence
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self.clear_cached_weight_()
        # Soft tensors shrink during calibration: adopt the stored sizes before copying values.
        for name in ("soft_rows", "candidates"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.codes.device))
        key = prefix + "candidate_logits"
        if key in state_dict and state_dict[key].shape != self.candidate_logits.shape:
            empty = torch.empty(state_dict[key].shape, dtype=self.candidate_logits.dtype, device=self.codes.device)
            self._set_logits_(empty, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.in_features}, out={self.out_features}, k={c.codebook_size}, "
            f"d={c.subvector_dim}, n={c.num_candidates} ({self.active_candidates} active), bits/weight={self.bits_per_weight():.3f}, "
            f"hard={self.hard_fraction:.1%}, inference={self.inference_mode}"
        )


def replace_in_optimizer_(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, reindex: RowReindex
) -> None:
    """Point ``optimizer`` at the shrunk ``candidate_logits`` Parameter ``new`` (which replaced
    ``old``) and shrink the per-element state (momentum, square averages) kept for it."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            key: reindex.apply(value) if torch.is_tensor(value) and value.dim() == 2 else value
            for key, value in state.items()
        }
