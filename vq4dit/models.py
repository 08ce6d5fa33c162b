"""DiT models (and PixArt folders): presets and loading from any source.

Which Linears get quantized, where the blocks are and how a model is called belong to its family
(:mod:`vq4dit.families`; DiT: :mod:`vq4dit.families.dit`); their old names here are re-exports.
:func:`load_dit` accepts a preset name (random init), a local diffusers folder (a
``DiTPipeline`` snapshot or a bare transformer folder), a Hugging Face hub id, or an original
facebookresearch/DiT ``.pt``/``.pth`` checkpoint, and always returns the model in eval mode:
in train mode diffusers drops class labels at random in every block. A diffusers folder whose
``config.json`` names ``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` or
``FluxTransformer2DModel`` (a bare transformer folder or a pipeline with ``transformer/``) loads as
that class: the text-conditioned families of
:mod:`vq4dit.families`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from torch import nn

from vq4dit.convert import (
    PAPER_HEADS,
    TIMESTEP_FREQ_SHIFT_KEY,
    DiTLoadError,
    apply_timestep_freq_shift,
    load_original_checkpoint,
)
from vq4dit.families import block_modules, capture_blocks
from vq4dit.families.dit import DEFAULT_QUANTIZED_SUFFIXES, default_linear_filter
from vq4dit.flow_matching import SCHEDULER_SHIFT_KEY

__all__ = [
    "DEFAULT_QUANTIZED_SUFFIXES",
    "PRESETS",
    "TIMESTEP_FREQ_SHIFT_KEY",
    "DiTLoadError",
    "NonFiniteError",
    "apply_timestep_freq_shift",
    "block_modules",
    "capture_blocks",
    "check_finite",
    "default_linear_filter",
    "load_dit",
    "preset_config",
]

# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# DiT paper, Table 1: name -> (depth, hidden size); heads from PAPER_HEADS.
_PAPER_SIZES = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}
_PATCH_SIZES = (2, 4, 8)
_IMAGE_SIZES = (256, 512)
_VAE_DOWNSAMPLE = 8  # latent side = image side / 8 (SD VAE, 4 channels)


def _config(depth: int, hidden: int, heads: int, patch: int, sample_size: int) -> dict:
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": 4,
        "out_channels": 8,  # learned sigma: mean and variance per latent channel
        "num_layers": depth,
        "sample_size": sample_size,
        "patch_size": patch,
        "num_embeds_ada_norm": 1000,  # label table has 1001 rows; row 1000 = null class
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # the paper's LayerNorm eps (diffusers' default is 1e-5)
    }


def _build_presets() -> dict[str, dict]:
    presets = {}
    for size, (depth, hidden) in _PAPER_SIZES.items():
        for patch in _PATCH_SIZES:
            for image in _IMAGE_SIZES:
                latent = image // _VAE_DOWNSAMPLE
                config = _config(depth, hidden, PAPER_HEADS[hidden], patch, latent)
                presets[f"DiT-{size}/{patch}-{image}"] = config
                if image == 256:
                    presets[f"DiT-{size}/{patch}"] = dict(config)
    # Test model: 1000 classes so that DiTPipeline's hard-coded null class 1000 works.
    presets["tiny"] = _config(depth=2, hidden=64, heads=2, patch=2, sample_size=8)
    return presets


PRESETS: dict[str, dict] = _build_presets()


def preset_config(name: str) -> dict:
    """Diffusers ``DiTTransformer2DModel`` kwargs of a preset (a fresh copy).

    Args:
        name: ``DiT-{S,B,L,XL}/{2,4,8}[-{256,512}]`` (image size, default 256) or ``tiny``.
    """
    if name not in PRESETS:
        raise _unknown_preset(name)
    return dict(PRESETS[name])


def _unknown_preset(name: str) -> DiTLoadError:
    return DiTLoadError(f"unknown DiT preset {name!r}; valid presets: {', '.join(PRESETS)}")


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------

_MAX_NAMED = 5  # tensors named in a NonFiniteError


class NonFiniteError(ValueError):
    """Tensors hold NaN or Inf."""


def nonfinite_names(source: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating/complex tensors of ``source`` (a module's parameters and buffers, or
    a name -> tensor mapping) holding a NaN or an Inf; integer, bool and meta tensors are skipped."""
    if isinstance(source, nn.Module):
        source = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    return [
        name for name, tensor in source.items()
        if (tensor.is_floating_point() or tensor.is_complex()) and not tensor.is_meta
        and not bool(torch.isfinite(tensor.detach()).all())
    ]


def check_finite(source: nn.Module | Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Raise :class:`NonFiniteError` naming (the first few of) the tensors of ``source`` that hold
    NaN or Inf, and their count; e.g. to check a teacher before any calibration work.

    Args:
        source: a module (its parameters and buffers) or a name -> tensor mapping.
        what: how the message calls ``source``, e.g. ``"teacher"`` or a path.
    """
    bad = nonfinite_names(source)
    if bad:
        shown = ", ".join(bad[:_MAX_NAMED]) + (", ..." if len(bad) > _MAX_NAMED else "")
        raise NonFiniteError(f"{what} has NaN/Inf values in {len(bad)} tensor(s): {shown}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_CHECKPOINT_SUFFIXES = (".pt", ".pth")
_DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the latter: legacy snapshots
_PIXART_CLASS_NAME = "PixArtTransformer2DModel"
# the other families' classes that a folder or hub config.json may name: name -> (kind, class)
_TEXT_CLASSES = {_PIXART_CLASS_NAME: ("PixArt", PixArtTransformer2DModel),
                 "SD3Transformer2DModel": ("SD3", SD3Transformer2DModel),
                 "FluxTransformer2DModel": ("Flux", FluxTransformer2DModel)}
_WEIGHT_FILE = re.compile(r"diffusion_pytorch_model.*\.(safetensors|bin)$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _folder_layout(folder: Path) -> tuple[Path, str | None]:
    """Return (transformer folder, subfolder argument) of a pipeline snapshot or bare folder."""
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer", "transformer"
    if (folder / "config.json").is_file():
        return folder, None
    raise DiTLoadError(
        f"{str(folder)!r} is not a DiT folder: no config.json; expected a DiTPipeline (or PixArt pipeline) snapshot "
        "(transformer/config.json + weights) or a transformer folder (config.json + weights)"
    )


def _load_folder(folder: Path) -> DiTTransformer2DModel | PixArtTransformer2DModel | SD3Transformer2DModel:
    model_dir, subfolder = _folder_layout(folder)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise DiTLoadError(f"cannot read {str(config_path)!r} as JSON: {err}") from err
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    text = class_name in _TEXT_CLASSES
    if not text and (class_name not in _DIT_CLASS_NAMES or config.get("norm_type") != "ada_norm_zero"):
        raise DiTLoadError(
            f"{str(config_path)!r} describes a {class_name!r} with norm_type "
            f"{config.get('norm_type') if isinstance(config, dict) else None!r}; expected a "
            f"DiTTransformer2DModel (norm_type 'ada_norm_zero') or one of {', '.join(_TEXT_CLASSES)}"
        )
    kind, model_class = _TEXT_CLASSES[class_name] if text else ("DiT", DiTTransformer2DModel)
    if not any(_WEIGHT_FILE.match(p.name) for p in model_dir.iterdir()):
        raise DiTLoadError(
            f"{str(model_dir)!r} has a {kind} config.json but no weights; expected "
            "diffusion_pytorch_model.safetensors (or .bin, or sharded files with an index)"
        )
    try:
        model, info = model_class.from_pretrained(
            folder, subfolder=subfolder, low_cpu_mem_usage=False, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise DiTLoadError(f"cannot load the {kind} in {str(model_dir)!r}: {_disagreement(err)}") from err
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    if missing or unexpected:  # diffusers would leave random weights in place and only warn
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in (
            (missing, "tensors the config describes are not in the weights"),
            (unexpected, "tensors in the weights are not in the config")) if keys]
        raise DiTLoadError(f"config.json and the weights in {str(model_dir)!r} disagree: {'; '.join(parts)}")
    return record_scheduler_shift(model, model_dir.parent / "scheduler" / "scheduler_config.json")


def record_scheduler_shift(model: nn.Module, scheduler_config: Path) -> nn.Module:
    """Record the static ``shift`` of a pipeline's (flow-matching) ``scheduler_config`` in
    ``model``'s config as ``SCHEDULER_SHIFT_KEY``: what :class:`vq4dit.flow_matching.FlowMatchSampler`
    samples it with (SD3: the family's 3.0 otherwise). Nothing when there is no such file or it
    has no numeric shift (DDPM / DPM schedulers)."""
    try:
        shift = json.loads(scheduler_config.read_text()).get("shift")
    except (OSError, ValueError, AttributeError):
        return model
    if isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0:
        model.register_to_config(**{SCHEDULER_SHIFT_KEY: float(shift)})
    return model


def _disagreement(err: Exception) -> str:
    """torch's multi-line "size mismatch" report as one line: the first tensor and the count."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith("size mismatch")]
    if not lines:
        return " ".join(str(err).split())
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return f"config.json and the weights disagree: {lines[0]}{more}"


def _hub_class(repo_id: str, subfolder: str | None) -> type[nn.Module]:
    """The transformer class a hub repo's ``config.json`` (in ``subfolder``) names, fetched (or found
    in the local Hugging Face cache) alone, before any weights."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id, "config.json", subfolder=subfolder)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DiTLoadError(f"cannot read the config.json of {repo_id!r} as JSON: {err}") from err
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name in _TEXT_CLASSES:
        return _TEXT_CLASSES[class_name][1]
    if class_name not in _DIT_CLASS_NAMES or config.get("norm_type") != "ada_norm_zero":
        raise DiTLoadError(f"{repo_id!r} holds a {class_name!r}; expected a DiTTransformer2DModel "
                           f"(norm_type 'ada_norm_zero') or one of {', '.join(_TEXT_CLASSES)}")
    return DiTTransformer2DModel


def _load_hub(repo_id: str) -> DiTTransformer2DModel | PixArtTransformer2DModel | SD3Transformer2DModel:
    from huggingface_hub.errors import EntryNotFoundError

    errors = []
    for subfolder in ("transformer", None):  # pipeline snapshot first, then bare transformer
        try:
            model_class = _hub_class(repo_id, subfolder)
            return model_class.from_pretrained(repo_id, subfolder=subfolder, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError, EntryNotFoundError) as err:
            if isinstance(err, DiTLoadError):
                raise
            errors.append(f"{subfolder or '<root>'}: {type(err).__name__}: {' '.join(str(err).split())}")
    raise DiTLoadError(
        f"{repo_id!r} is not a local path, preset or checkpoint, and loading it as a Hugging "
        f"Face hub id (a DiT or PixArt pipeline, or a transformer) failed: {' | '.join(errors)}"
    )


def _is_pathlike_string(source: str) -> bool:
    """Strings that can only mean a local path (hub ids are ``org/name``)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


# The project's small trained digits DiT (pixel space, 16x16, 10 classes), shipped in the package.
REFERENCE_NAME = "reference"
REFERENCE_FOLDER = Path(__file__).resolve().parent / "assets" / "reference" / "transformer"
# The shipped reference suite by name (issue 17): the digits DiT, the RGB-patches DiT and the
# text-conditioned PixArt and MMDiT (SD3) on digits (FP16 weights).
SHIPPED_MODELS = {REFERENCE_NAME: REFERENCE_FOLDER,
                  **{name: Path(__file__).resolve().parent / "assets" / name / "transformer"
                     for name in ("rgb_reference", "pixart_reference", "mmdit_reference")}}


def load_dit(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    num_heads: int | None = None,
    allow_nonfinite: bool = False,
) -> DiTTransformer2DModel | PixArtTransformer2DModel | SD3Transformer2DModel:
    """Load a diffusers ``DiTTransformer2DModel`` (or a ``PixArtTransformer2DModel`` folder) in eval mode, on the CPU.

    Resolution order for strings: preset name, existing local path, hub id (``org/name``).
    Path objects are always local paths.

    Args:
        source: ``reference`` (the shipped digits DiT), ``rgb_reference`` (the shipped RGB-patches
            DiT; stored in FP16, loaded in float32), ``pixart_reference`` (the shipped text-conditioned
            PixArt, FP16 -> float32), ``mmdit_reference`` (the shipped SD3-style MMDiT, FP16 -> float32), a preset (``DiT-XL/2``, ``DiT-S/4-512``,
            ``tiny``; random weights), a local
            diffusers folder (``DiTPipeline`` snapshot or transformer folder; a PixArt pipeline or
            ``PixArtTransformer2DModel`` folder loads as that class), a hub id, or an
            original facebookresearch/DiT checkpoint (``.pt``/``.pth``).
        dtype: optional cast of all parameters and buffers, e.g. ``torch.bfloat16``.
        num_heads: attention heads of an original checkpoint whose hidden size is not one of
            the paper's (384, 768, 1024, 1152). Only valid for checkpoints.
        allow_nonfinite: load weights holding NaN/Inf instead of refusing them.

    Returns:
        The model in eval mode; its timestep frequency shift re-applied from its config.

    Raises:
        DiTLoadError: the source is missing, unknown, not a DiT, or (unless
            ``allow_nonfinite``) holds NaN/Inf.
    """
    is_string = isinstance(source, str)
    path = Path(source).expanduser()
    is_checkpoint = path.suffix.lower() in _CHECKPOINT_SUFFIXES
    if num_heads is not None and not is_checkpoint:
        raise DiTLoadError(
            f"num_heads={num_heads} only applies to original .pt/.pth checkpoints; "
            f"{os.fspath(source)!r} stores its own config"
        )
    if is_string and source in SHIPPED_MODELS:
        if not SHIPPED_MODELS[source].is_dir():
            raise DiTLoadError(f"the shipped {source} model is missing at {SHIPPED_MODELS[source]}")
        model = _load_folder(SHIPPED_MODELS[source]).float()  # stored FP16 (rgb_reference), computed in FP32
    elif is_string and source in PRESETS:
        model = DiTTransformer2DModel(**PRESETS[source])
    elif path.exists():
        if path.is_dir():
            model = _load_folder(path)
        elif is_checkpoint:
            model = load_original_checkpoint(path, num_heads=num_heads)
        else:
            raise DiTLoadError(
                f"{str(path)!r} is a file of unsupported type; expected an original DiT "
                f"checkpoint ({'/'.join(_CHECKPOINT_SUFFIXES)}) or a diffusers folder"
            )
    elif not is_string or is_checkpoint or _is_pathlike_string(source):
        raise DiTLoadError(f"path {str(path)!r} does not exist")
    elif source.lower().startswith("dit-"):
        raise _unknown_preset(source)
    elif "/" not in source:
        raise DiTLoadError(
            f"{source!r} is neither an existing path, a hub id (org/name) nor a DiT preset; "
            f"valid presets: {', '.join(PRESETS)}"
        )
    elif _HUB_ID.fullmatch(source):
        model = _load_hub(source)
    else:
        raise DiTLoadError(
            f"{source!r} is neither an existing path, a preset nor a valid hub id (org/name)"
        )
    if isinstance(model, DiTTransformer2DModel):  # PixArt keeps diffusers' own timestep embedding
        apply_timestep_freq_shift(model)
    if dtype is not None:
        model = model.to(dtype)
    if not allow_nonfinite:  # after the cast: float16 turns values above 65504 into Inf
        try:
            check_finite(model, what=repr(os.fspath(source)))
        except NonFiniteError as err:
            raise DiTLoadError(f"{err}; pass allow_nonfinite=True to load it anyway") from err
    return model.eval()
