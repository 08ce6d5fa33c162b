"""Packed safetensors checkpoints of vector-quantized DiTs: atomic save, strict load.

Saving is atomic (``vq4dit.atomic.atomic_folder``): a reader sees the old checkpoint or the new
one; leftovers of interrupted saves are recovered by the next save or load of the same path.
Both refuse NaN/Inf tensors unless ``allow_nonfinite=True``.

Folder layout (``format_version`` 1, or 2 when ``tensor_aliases`` is present)::

    config.json        the diffusers config (as ``save_pretrained`` writes it) plus
                       "quantization_config": {"quant_method": "vq4dit", "format_version": 1|2,
                       "codebook_size", "subvector_dim", "layers": {name: per-layer settings},
                       "tensor_aliases": {alias: source} (version 2 only)}
    model.safetensors  <layer>.codebook [k, d], <layer>.codes_packed [ceil(N*log2(k)/8)] uint8,
                       <layer>.bias [out]; every other state_dict tensor in its own dtype, stored
                       once when several are identical (an alias is read from its source).
                       Header metadata "vq4dit_sha256" hashes all tensors (corruption check).

    README.md          the model card (``vq4dit.model_card``)

Codes are bit-packed at exactly ``b = log2(k)`` bits (``vq4dit.packing``). ``model.save_pretrained``
(diffusers, through ``vq4dit.diffusers_quantizer``) writes the same tensors and config under the name
``diffusion_pytorch_model.safetensors``; both loaders read both names. Without ``import vq4dit``,
diffusers refuses the folder (unknown ``quant_method``). The conversions live in ``vq4dit.packed_state``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from .atomic import WriteError, atomic_folder, recover
from .convert import apply_timestep_freq_shift, guard_save_pretrained
from .model_card import CARD_NAME, model_card, push_folder
from .models import NonFiniteError, check_finite
from .packed_state import (  # FORMAT_VERSION, QUANT_METHOD: re-exported
    CHECKSUM_KEY, FORMAT_VERSION, QUANT_METHOD, QuantizedCheckpointError, install_vq_layers,  # noqa: F401
    pack_state_dict, quant_config_for, resolve_aliases, tensor_digest, tie_tensors_, unpack_state_dict,
    validate_quant_config,
)
from .packing import pack_codes, packed_size, unpack_codes
from .size import LayerSize, SizeReport, size_report

__all__ = [
    "QuantizedCheckpointError", "WriteError", "load_quantized", "save_quantized", "tie_tensors_",
    # re-exported from vq4dit.packing / vq4dit.size, where they live
    "LayerSize", "SizeReport", "pack_codes", "packed_size", "size_report", "unpack_codes",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes
_CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, CARD_NAME)
_FREQ_SHIFT_KEYS = ("_timestep_freq_shift", "timestep_freq_shift")  # recorded by vq4dit.models
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_tensor_digest = tensor_digest  # the names older callers use
_CHECKSUM_KEY = CHECKSUM_KEY


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _check_target(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise QuantizedCheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    if path.is_symlink() or not path.is_dir():
        raise QuantizedCheckpointError(f"{path} exists and is not a directory; refusing to replace it")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _CHECKPOINT_FILES)
    if foreign:
        raise QuantizedCheckpointError(f"{path} holds files that are not part of a checkpoint: {foreign[:5]}")


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    try:
        check_finite(tensors, what=what)
    except NonFiniteError as err:
        raise QuantizedCheckpointError(f"{err}; pass allow_nonfinite=True to accept them") from err


def checkpoint(model: nn.Module, card: dict | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """What a save writes for ``model``: config (with ``quantization_config``), file tensors, and
    the safetensors header metadata. ``card`` (calibration facts for the model card) is recorded in
    the ``quantization_config`` as ``card``; without it, a card recorded before is kept."""
    if not callable(getattr(model, "to_json_string", None)):
        raise QuantizedCheckpointError(f"{type(model).__name__} is not a diffusers model (no config)")
    qc = quant_config_for(model)
    config = json.loads(model.to_json_string())
    old = config.pop("quantization_config", None)  # a loaded packed model carries the one it was read with
    card = card if card is not None else (old or {}).get("card") if isinstance(old, dict) else None
    if card:
        qc["card"] = json.loads(json.dumps(card, default=str))  # JSON values only
    tensors = pack_state_dict(model.state_dict(), qc)
    config["quantization_config"] = qc
    return config, tensors, {"format": "pt", CHECKSUM_KEY: tensor_digest(tensors)}


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    card: dict | None = None,
    push_to_hub: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> Path:
    """Write a diffusers ``model`` whose ``VQLinear`` layers are all hard to the folder ``path``:
    config.json, model.safetensors and a model card README.md.

    Identical non-quantized tensors (the per-block embedder copies of converted DiT checkpoints)
    are stored once. Atomic (``vq4dit.atomic.atomic_folder``): written into a hidden temporary
    sibling, fsynced, then swapped into place. ``overwrite=True`` replaces an existing checkpoint
    folder (only checkpoint files). Tensors with NaN/Inf are refused unless ``allow_nonfinite``.
    ``card``: facts for the model card (``base_model``, ``num_candidates``, calibration settings,
    ``calibration_seconds``, ...; see ``vq4dit.model_card``), also recorded in config.json.
    ``push_to_hub="org/name"`` uploads the folder afterwards (``huggingface_hub``). Returns the path.

    Raises :class:`QuantizedCheckpointError` for a model that cannot be saved, :class:`WriteError`
    for environment faults (disk full, no permission, ...); the target is then untouched.
    """
    path = Path(path).absolute()
    config, tensors, metadata = checkpoint(model, card)
    _check_target(path, overwrite)
    if not allow_nonfinite:
        _check_finite(tensors, "the model")
    readme = model_card(model, config, tensors)

    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + 2 * len(config_text) + len(readme) + 65536
    with atomic_folder(path, overwrite=overwrite, validate=lambda p: _check_target(p, overwrite), size=size) as tmp:
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CARD_NAME).write_text(readme, encoding="utf-8")
    if push_to_hub:
        push_folder(path, push_to_hub, token=token, private=private, commit_message=commit_message)
    return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _build_model(config: dict, qc: dict, path: Path) -> nn.Module:
    """The diffusers model from its config (random init skipped), with empty hard ``VQLinear``s."""
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise QuantizedCheckpointError(f"{path}: _class_name {name!r} is not a diffusers model class")
    init_keys = set(inspect.signature(cls.__init__).parameters)
    extras = {k: v for k, v in config.items() if not k.startswith("_") and k not in init_keys}
    try:  # every persistent tensor is overwritten from the file: skip the random init
        from diffusers.models.modeling_utils import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    try:
        with no_init_weights():
            model = cls.from_config({k: v for k, v in config.items() if k not in extras})
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:  # incl. NotImplementedError
        raise QuantizedCheckpointError(f"{path}: cannot build {name} from config.json: {err}") from err
    # extras: e.g. timestep_freq_shift; quantization_config: what save_pretrained writes back
    model.register_to_config(**extras, quantization_config=qc)
    install_vq_layers(model, qc, path)
    return model


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise QuantizedCheckpointError(f"{file.parent} is not a vq4dit checkpoint: {file.name} is missing")
    try:
        with safetensors.safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            # clone: get_tensor maps the file; the model must not change (or SIGBUS) if the file does
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise QuantizedCheckpointError(f"{file} is truncated or corrupted: {err}") from err
    if metadata.get(CHECKSUM_KEY) != tensor_digest(tensors):
        raise QuantizedCheckpointError(f"{file} is corrupted: its tensors do not match the stored checksum")
    return tensors


def weights_file(folder: Path) -> Path:
    """model.safetensors (save_quantized), else diffusion_pytorch_model.safetensors (save_pretrained)."""
    other = folder / DIFFUSERS_WEIGHTS_NAME
    return other if not (folder / WEIGHTS_NAME).is_file() and other.is_file() else folder / WEIGHTS_NAME


def _resolve(path, revision, subfolder, cache_dir, token) -> tuple[Path, bool]:
    """The local folder of ``path``: itself, or a hub snapshot (downloaded or cached) of a hub id."""
    local = Path(path) / (subfolder or "")
    if not isinstance(path, str) or Path(path).exists() or not _HUB_ID.fullmatch(path):
        return local, True
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        folder = snapshot_download(
            path, revision=revision, cache_dir=cache_dir, token=token,
            allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}*.safetensors", f"{prefix}{CARD_NAME}"],
        )
    except Exception as err:  # huggingface_hub raises many kinds (offline, not found, HTTP, ...)
        raise QuantizedCheckpointError(
            f"{path} is neither a local folder nor a hub repo that could be fetched ({type(err).__name__}: {err})"
        ) from err
    return Path(folder) / (subfolder or ""), False


def load_quantized(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    share_identical: bool = True,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> nn.Module:
    """Read a folder written by :func:`save_quantized` or ``save_pretrained`` (a local folder, or a
    hub id ``org/name`` fetched with ``huggingface_hub`` at ``revision``): the diffusers model in
    eval mode, its quantized layers hard ``VQLinear``, bit-identical to the saved model.

    Tensors the file stores once (``tensor_aliases``: identical per-block embedder copies) are one
    tensor of the model (``tie_tensors_``); ``share_identical=False`` gives every module its own
    copy instead (e.g. to fine-tune them apart).

    Tensors with NaN/Inf are refused unless ``allow_nonfinite``. A local checkpoint left missing by
    an interrupted overwrite is restored first (``vq4dit.atomic.recover``). ``model.save_pretrained``
    writes the packed format again (``vq4dit.diffusers_quantizer``).

    Raises :class:`QuantizedCheckpointError` for anything that is not a readable vq4dit checkpoint.
    """
    path, is_local = _resolve(path, revision, subfolder, cache_dir, token)
    if is_local:
        with contextlib.suppress(OSError):  # best effort: the folder may be read-only
            recover(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        olds = sorted(p.name for p in path.absolute().parent.glob(f".{path.name}.old-*")) if not path.exists() else []
        hint = f"; an interrupted save left {olds}: rename the newest to {path.name}" if olds else ""
        raise QuantizedCheckpointError(f"{path} is not a vq4dit checkpoint: no {CONFIG_NAME}{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizedCheckpointError(f"{config_file} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise QuantizedCheckpointError(f"{config_file} does not hold a JSON object")
    qc = validate_quant_config(config.pop("quantization_config", None), path)
    model = _build_model(config, qc, path)
    aliases = qc.get("tensor_aliases", {})
    stored = _read_tensors(weights_file(path))
    if not allow_nonfinite:
        _check_finite(stored, str(path))
    tensors = resolve_aliases(stored, aliases, path)
    state = unpack_state_dict(tensors, qc, model.state_dict(), path)
    if not share_identical:
        state = {key: value.clone() if key in aliases else value for key, value in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)  # assign: keep the stored dtypes
        if share_identical:
            tie_tensors_(model, aliases)
    except (RuntimeError, ValueError, AttributeError) as err:
        raise QuantizedCheckpointError(f"{path}: {err}") from err
    if any(key in config for key in _FREQ_SHIFT_KEYS):  # a module attribute, not a tensor: re-apply
        apply_timestep_freq_shift(model)
    return guard_save_pretrained(model).to(device).eval()
