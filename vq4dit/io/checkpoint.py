"""Packed checkpoints of vector-quantized DiTs on disk: atomic writers, a strict reader.

The writers are atomic (``vq4dit.atomic.atomic_folder``): a reader sees the old folder or the new
one, also under ``kill -9``; leftovers of interrupted writes are recovered by the next write or
load of the same path. :func:`save_quantized` writes a model; :func:`save_pretrained` runs any
diffusers ``save_pretrained`` (a model's or a pipeline's) into the same kind of temporary folder.
Both refuse NaN/Inf tensors unless ``allow_nonfinite=True`` and write the model card.
:func:`load_quantized` reads what either wrote, what stock ``save_pretrained`` wrote, and folders
of format 1-3 (``model.safetensors``). The layout is documented in ``vq4dit.io.packed``.
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

from ..atomic import WriteError, atomic_folder, recover
from ..convert import TIMESTEP_FREQ_SHIFT_KEY, apply_timestep_freq_shift
from ..quantize import vq_layers
from .diffusers_backend import attach
from .model_card import CARD_NAME, model_card, push_folder
from .packed import (
    CHECKSUM_KEY, CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, QuantizedCheckpointError, check_header,
    install_vq_layers, read_header, refuse_nonfinite, resolve_aliases,
    tensor_digest, tie_tensors_, unpack_state_dict, validate_quant_config,
)

__all__ = ["QuantizedCheckpointError", "WriteError", "load_quantized", "save_pretrained", "save_quantized"]

_SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CARD_NAME, "model_index.json")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FREQ_SHIFT_KEYS = (TIMESTEP_FREQ_SHIFT_KEY, "timestep_freq_shift")  # recorded by vq4dit.convert
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _SAVED_FILES and not (
        p.is_dir() and not p.is_symlink() and (path / "model_index.json").is_file()))  # a pipeline's parts
    if foreign:
        raise QuantizedCheckpointError(f"{path} holds files that are not part of a checkpoint: {foreign[:5]}")


def _packed_models(obj) -> dict[str, nn.Module]:
    """The diffusers models holding ``VQLinear`` layers of a model ("" -> it) or a pipeline
    (component name -> model)."""
    components = getattr(obj, "components", None)
    parts = components if isinstance(components, dict) and not isinstance(obj, nn.Module) else {"": obj}
    return {name: part for name, part in parts.items() if isinstance(part, nn.Module) and vq_layers(part)}


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (shapes and dtypes, no data)."""
    header, _ = read_header(file)
    return {name: torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
            for name, info in header.items()}


def save_pretrained(
    obj,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    card: dict | None = None,
    push_to_hub: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    **save_kwargs,
) -> Path:
    """Atomic ``obj.save_pretrained(path, **save_kwargs)`` of a diffusers model or pipeline whose
    models hold hard ``VQLinear`` layers (written packed by the ``vq4dit`` backend), plus a model
    card README.md in each packed model's folder.

    Atomic (``vq4dit.atomic.atomic_folder``): written into a hidden temporary sibling, fsynced,
    then swapped into place, so a reader sees the old folder or the new one, also under
    ``kill -9`` (stock ``save_pretrained`` writes in place and is not). Checked before anything
    is written: the target (``overwrite=True`` replaces an existing checkpoint or pipeline
    folder), and every packed model (hard, not on the meta device, no NaN/Inf unless
    ``allow_nonfinite``). ``card``: facts for the model card (``base_model``, ``num_candidates``,
    calibration settings, ``calibration_seconds``, ...; ``vq4dit.io.model_card``), recorded in
    config.json. ``push_to_hub="org/name"`` uploads the folder afterwards. Returns the path.

    Raises :class:`QuantizedCheckpointError` for what cannot be saved, :class:`WriteError` for
    environment faults (disk full, no permission, ...); the target is then untouched.
    """
    path = Path(path).absolute()
    models = _packed_models(obj)
    if not callable(getattr(obj, "save_pretrained", None)) or not models:
        raise QuantizedCheckpointError(
            f"{type(obj).__name__} is not a diffusers model or pipeline holding VQLinear layers; "
            "quantize it with quantize_() first"
        )
    _check_target(path, overwrite)
    quantizers, cards = [], []
    for model in models.values():
        extra = attach(model).extra
        cards.append(extra.get("card"))
        if card:
            extra["card"] = json.loads(json.dumps(card, default=str))  # this save's card (JSON values)
        quantizers.append(model.hf_quantizer)
        model.hf_quantizer.allow_nonfinite = allow_nonfinite
    try:
        for quantizer in quantizers:
            quantizer.prepare_()  # records the models, refuses soft/meta/NaN before any write
        with atomic_folder(path, overwrite=overwrite, validate=lambda p: _check_target(p, overwrite),
                           size=sum(_packed_bytes(model) for model in models.values())) as tmp:
            obj.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
            for name, model in models.items():
                folder = tmp / name
                config = _read_config(folder / CONFIG_NAME)
                text = model_card(model, config, _header_tensors(folder / WEIGHTS_NAME))
                (folder / CARD_NAME).write_text(text, encoding="utf-8")
    except SafetensorError as err:  # safetensors' own type for OS write errors (a full disk: ENOSPC)
        cause = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(err))
        raise WriteError(f"cannot write {path}: {cause.group(1) if cause else err}") from err
    finally:
        for quantizer, old in zip(quantizers, cards):
            quantizer.allow_nonfinite = False
            quantizer.quantization_config.extra.pop("card", None)
            if old:
                quantizer.quantization_config.extra["card"] = old
    if push_to_hub:
        push_folder(path, push_to_hub, token=token, private=private, commit_message=commit_message)
    return path


def _packed_bytes(model: nn.Module) -> int:
    """A lower bound of the bytes ``model`` takes packed (codes at log2(k) bits, identical tensors
    once, every other tensor as stored), for the free-space check before a write."""
    layers = vq_layers(model)
    packed = {f"{name}.{part}" for name in layers for part in ("codes", "candidates", "candidate_logits", "soft_rows")}
    distinct: dict[tuple, list[torch.Tensor]] = {}
    total = 0
    for key, tensor in model.state_dict().items():
        group = distinct.setdefault((tuple(tensor.shape), tensor.dtype), [])
        if key in packed or any(tensor.data_ptr() == t.data_ptr() or torch.equal(tensor, t) for t in group):
            continue
        group.append(tensor)
        total += tensor.numel() * tensor.element_size()
    return total + sum(layer.codes.numel() * max(1, (layer.codebook.shape[0] - 1).bit_length()) // 8
                       for layer in layers.values())


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
    config.json, diffusion_pytorch_model.safetensors and a model card README.md (diffusers' layout:
    stock ``from_pretrained`` loads it after ``import vq4dit``). :func:`save_pretrained` of one
    model: atomic, checked before anything is written (see there for the arguments).

    Identical non-quantized tensors (the per-block embedder copies of converted DiT checkpoints)
    are stored once. Raises :class:`QuantizedCheckpointError` for a model that cannot be saved,
    :class:`WriteError` for environment faults (disk full, no permission, ...); the target is then
    untouched.
    """
    if not callable(getattr(model, "register_to_config", None)):
        raise QuantizedCheckpointError(f"{type(model).__name__} is not a diffusers model (no config)")
    if not vq_layers(model):
        raise QuantizedCheckpointError("model has no VQLinear layer; quantize it with quantize_() first")
    return save_pretrained(model, path, overwrite=overwrite, allow_nonfinite=allow_nonfinite, card=card,
                           push_to_hub=push_to_hub, token=token, private=private, commit_message=commit_message)


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


def _read_tensors(file: Path, qc: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors, after its header (names, shapes, sizes) was checked against the config
    and the model skeleton, so that nothing is read that the model has no place for."""
    try:
        header, metadata = read_header(file)
        check_header(header, qc, model.state_dict(), file.parent)
        with safetensors.safe_open(str(file), framework="pt", device="cpu") as handle:
            # clone: get_tensor maps the file; the model must not change (or SIGBUS) if the file does
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, QuantizedCheckpointError):
            raise
        raise QuantizedCheckpointError(f"{file} is truncated or corrupted: {err}") from err
    if metadata.get(CHECKSUM_KEY) != tensor_digest(tensors):
        raise QuantizedCheckpointError(f"{file} is corrupted: its tensors do not match the stored checksum")
    return tensors


def weights_file(folder: Path) -> Path:
    """diffusion_pytorch_model.safetensors, else model.safetensors (format 1-3 folders)."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    raise QuantizedCheckpointError(
        f"{folder}: no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME}): the folder is incomplete (an interrupted "
        "save_pretrained?); save it again (vq4dit.save_quantized / vq4dit.save_pretrained are atomic)"
    )


def _read_config(config_file: Path) -> dict:
    try:
        text = config_file.read_text(encoding="utf-8")
        config = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        why = "is empty" if config_file.is_file() and config_file.stat().st_size == 0 else "is not readable JSON"
        raise QuantizedCheckpointError(
            f"{config_file} {why} ({type(err).__name__}): the folder was left half-written (e.g. a killed "
            "model.save_pretrained, which is not atomic); save it again with vq4dit.save_quantized / "
            "vq4dit.save_pretrained (atomic)"
        ) from err
    if not isinstance(config, dict):
        raise QuantizedCheckpointError(f"{config_file} does not hold a JSON object")
    return config


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
    an interrupted overwrite is restored first (``vq4dit.atomic.recover``). The file's header is
    checked against config.json before any data is read. ``model.save_pretrained`` writes the
    packed format again (``vq4dit.io.diffusers_backend``).

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
    config = _read_config(config_file)
    qc = validate_quant_config(config.pop("quantization_config", None), path)
    model = _build_model(config, qc, path)
    aliases = qc.get("tensor_aliases", {})
    stored = _read_tensors(weights_file(path), qc, model)
    if not allow_nonfinite:
        refuse_nonfinite(stored, str(path))
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
    attach(model)  # stock save_pretrained writes it packed again
    return model.to(device).eval()
