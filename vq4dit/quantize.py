"""Model patching: choosing the Linear layers to quantize, swapping them for ``VQLinear``, and
model-wide operations on VQ layers (inference mode, finalize)."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .decoding import INFERENCE_MODES, InferenceMode
from .layers import InputMoments, VQLinear
from .families import FilterFn, family_of
from .typed_settings import require_resolved
from .vq_config import VQConfig

log = logging.getLogger(__name__)


# Called with the model at the end of every quantize_: higher layers register here instead of being
# imported (vq4dit.io gives diffusers models the vq4dit backend, so save_pretrained writes them packed).
QUANTIZED_HOOKS: list[Callable[[nn.Module], object]] = []

def _match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    config: VQConfig,
    filter_fn: FilterFn | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, int]] | None = None,
) -> list[tuple[str, nn.Linear, VQConfig]]:
    """The ``nn.Linear`` layers :func:`quantize_` would replace, each with its VQ settings, in
    model order; cheap (no k-means), so settings can be checked before any heavy work.

    Raises:
        ValueError: nothing matched, a setting does not fit a selected layer, or ``config`` has
            a setting left to a recipe (None).
    """
    require_resolved(config)
    if filter_fn is None and not include:
        filter_fn = family_of(model).linear_filter()
    include, exclude = list(include or []), list(exclude or [])
    overrides = dict(overrides or {})
    selected: list[tuple[str, nn.Linear, VQConfig]] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        chosen = _match_any(name, include) if include else filter_fn(module, name)
        if not chosen or _match_any(name, exclude):
            continue
        layer_config = config
        for pattern, fields in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                layer_config = layer_config.with_overrides(**dict(fields))
        layer_config.validate_for(module.out_features, module.in_features, name)
        selected.append((name, module, layer_config))
    if not selected:
        raise ValueError(
            "quantize_: no nn.Linear layer matched the selection "
            f"(include={include or 'the default of the model family'}, exclude={exclude})"
        )
    return selected


def quantize_(
    model: nn.Module,
    config: VQConfig,
    filter_fn: FilterFn | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, int]] | None = None,
    progress: bool = True,
    input_moments: Mapping[str, InputMoments] | None = None,
    prebuilt: Mapping[str, nn.Module] | None = None,
) -> list[str]:
    """Replace selected ``nn.Linear`` layers of ``model`` in place by k-means-initialised ``VQLinear``.

    Args:
        model: any module; without ``filter_fn`` and ``include``, a model of a supported family.
        config: default VQ settings.
        filter_fn: ``(module, qualified_name) -> bool``; default: the model family's default set
            (``vq4dit.families.family_of(model).linear_filter()``; DiT: the 7 core Linears of every block).
        include: glob patterns on qualified names; when given, replaces ``filter_fn`` (only
            ``nn.Linear`` modules are considered).
        exclude: glob patterns removed from the selection.
        overrides: glob pattern -> VQConfig fields, e.g. ``{"*.norm1.linear": {"codebook_size": 1024}}``;
            the last matching pattern wins.
        progress: show a progress bar (k-means on DiT-XL takes minutes).
        input_moments: layer name -> its input second moments (layers whose ``kmeans_metric``
            is ``activation``; see :func:`vq4dit.engine.input_second_moments`).
        prebuilt: exact layer name -> a ``VQLinear`` already built for it (no k-means again: the
            bit-allocation probe's layers); the other selected layers are built here.

    Returns:
        The qualified names that were swapped, in model order.

    Raises:
        ValueError: nothing matched, or a setting does not fit a selected layer.
    """
    from tqdm.auto import tqdm

    selected = select_layers(model, config, filter_fn, include, exclude, overrides)
    names = []
    for name, module, layer_config in tqdm(selected, desc="k-means init", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        moments = None if input_moments is None else input_moments.get(name)
        built = (prebuilt or {}).get(name)
        setattr(parent, child, built if built is not None else VQLinear.from_linear(module, layer_config, name, moments))
        names.append(name)
    log.info("quantize_: swapped %d Linear layers for VQLinear (%s ...)", len(names), names[0])
    for hook in QUANTIZED_HOOKS:
        hook(model)
    return names


def set_inference_mode_(model: nn.Module, mode: InferenceMode) -> int:
    """Set how every hard ``VQLinear`` of ``model`` gets its dense weight at inference.

    Args:
        model: a module holding ``VQLinear`` layers (e.g. from ``load_quantized``).
        mode: ``decode`` (default of every layer): decode each layer's weight inside its forward
            and free it after the matmul; peak memory = codes + one layer's dense weight.
            ``cached``: decode once, keep the dense weights (FP memory, FP speed); the cache is
            rebuilt when codebook or codes change and dropped by ``.to()`` or by going back to
            ``decode``.

    Returns:
        The number of layers set.

    Raises:
        ValueError: unknown mode, or no ``VQLinear`` in ``model``.
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
    layers = vq_layers(model)
    if not layers:
        raise ValueError("set_inference_mode_: the model has no VQLinear layer")
    for layer in layers.values():
        layer.set_inference_mode_(mode)
    return len(layers)


def vq_layers(model: nn.Module) -> dict[str, VQLinear]:
    """All ``VQLinear`` modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, VQLinear)}


@contextlib.contextmanager
def argmax_view(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every soft row of every ``VQLinear`` of ``model`` uses its argmax candidate
    alone (ratio exactly 1: what :func:`finalize_model_` would export); the soft state is restored
    afterwards. No copy of the model: only the soft rows' logits ``[S, n]`` are saved."""
    saved = {}
    with torch.no_grad():
        for name, layer in vq_layers(model).items():
            if layer.num_soft:
                logits = layer.candidate_logits
                saved[name] = logits.detach().clone()
                top = layer.ratios().argmax(dim=1, keepdim=True)  # [S, 1]
                logits.fill_(-100.0).scatter_(1, top.to(logits.device), 100.0)  # softmax: exactly one-hot
    try:
        yield model
    finally:
        with torch.no_grad():
            layers = vq_layers(model)
            for name, logits in saved.items():
                layers[name].candidate_logits.copy_(logits)


def finalize_model_(model: nn.Module) -> int:
    """Argmax for every soft row of every ``VQLinear`` of ``model``: all layers hard afterwards.

    Row scales are rounded to their stored precision (FP16). Returns the number of rows that
    were still soft.
    """
    count = 0
    for layer in vq_layers(model).values():
        count += layer.num_soft
        layer.finalize_()
        if layer.row_scales is not None:  # the stored precision, so the packed model is this one
            with torch.no_grad():
                layer.row_scales.copy_(layer.row_scales.half().to(layer.row_scales.dtype))
    return count
