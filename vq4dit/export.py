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

Codes are bit-packed at exactly ``b = log2(k)`` bits (``vq4dit.packing``). Plain diffusers refuses
the folder (unknown ``quant_method``); it also holds no ``diffusion_pytorch_model.*`` file and no
dense ``.weight`` for the quantized layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from .atomic import WriteError, atomic_folder, recover
from .convert import apply_timestep_freq_shift, guard_save_pretrained
from .layers import VQLinear
from .models import NonFiniteError, check_finite
from .packing import identical_tensors, pack_codes, packed_size, unpack_codes
from .quantize import vq_layers
from .vq_config import VQConfig
from .size import LayerSize, SizeReport, size_report

__all__ = [
    "QuantizedCheckpointError", "WriteError", "load_quantized", "save_quantized", "tie_tensors_",
    # re-exported from vq4dit.packing / vq4dit.size, where they live
    "LayerSize", "SizeReport", "pack_codes", "packed_size", "size_report", "unpack_codes",
]

QUANT_METHOD = "vq4dit"
FORMAT_VERSION = 3  # the newest this version reads and writes: 3 with row scales, 2 with aliases, else 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CHECKSUM_KEY = "vq4dit_sha256"
_SOFT_STATE = ("soft_rows", "candidates", "candidate_logits")
_FREQ_SHIFT_KEYS = ("_timestep_freq_shift", "timestep_freq_shift")  # recorded by vq4dit.models
_LAYER_INTS = ("in_features", "out_features", "codebook_size", "subvector_dim", "code_bits")


class QuantizedCheckpointError(ValueError):
    """A vq4dit checkpoint cannot be written or read (bad input, bad folder, bad file)."""


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of all tensors (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _checkpoint_tensors(
    model: nn.Module, layers: dict[str, VQLinear]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """File contents: packed VQ layers plus every other ``state_dict`` tensor (CPU, contiguous),
    the identical ones once; and the ``{alias: source}`` map of those left out."""
    tensors: dict[str, torch.Tensor] = {}
    vq_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.state_dict()}
    for name, layer in layers.items():
        tensors[f"{name}.codebook"] = layer.codebook.detach()
        tensors[f"{name}.codes_packed"] = pack_codes(layer.codes, layer.config.code_bits)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
        if layer.row_scales is not None:
            tensors[f"{name}.row_scales"] = layer.row_scales.detach().half()
    others = {k: v.detach() for k, v in model.state_dict().items() if k not in vq_keys}
    aliases = identical_tensors(others)
    tensors.update({k: v for k, v in others.items() if k not in aliases})
    seen = set()
    for key, value in tensors.items():  # safetensors refuses tensors that share memory
        value = value.cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return tensors, aliases


def _check_target(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise QuantizedCheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    if path.is_symlink() or not path.is_dir():
        raise QuantizedCheckpointError(f"{path} exists and is not a directory; refusing to replace it")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
    if foreign:
        raise QuantizedCheckpointError(f"{path} holds files that are not part of a checkpoint: {foreign[:5]}")


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    try:
        check_finite(tensors, what=what)
    except NonFiniteError as err:
        raise QuantizedCheckpointError(f"{err}; pass allow_nonfinite=True to accept them") from err


def save_quantized(
    model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, allow_nonfinite: bool = False
) -> Path:
    """Write a diffusers ``model`` whose ``VQLinear`` layers are all hard to the folder ``path``.

    Identical non-quantized tensors (the per-block embedder copies of converted DiT checkpoints)
    are stored once. Atomic (``vq4dit.atomic.atomic_folder``): written into a hidden temporary
    sibling, fsynced, then swapped into place. ``overwrite=True`` replaces an existing checkpoint
    folder (only config.json / model.safetensors). Tensors with NaN/Inf are refused unless
    ``allow_nonfinite``. Returns the folder path.

    Raises :class:`QuantizedCheckpointError` for a model that cannot be saved, :class:`WriteError`
    for environment faults (disk full, no permission, ...); the target is then untouched.
    """
    path = Path(path).absolute()
    layers = vq_layers(model)
    if not layers:
        raise QuantizedCheckpointError("model has no VQLinear layer; quantize it with quantize_() first")
    soft = [name for name, layer in layers.items() if not layer.is_hard]
    if soft:
        raise QuantizedCheckpointError(f"VQLinear layers have soft rows, call finalize_() first: {_names(soft)}")
    if any(layer.codebook.is_meta for layer in layers.values()):
        raise QuantizedCheckpointError("the model's VQLinear layers are on the meta device (no values)")
    if not callable(getattr(model, "to_json_string", None)):
        raise QuantizedCheckpointError(f"{type(model).__name__} is not a diffusers model (no config)")
    _check_target(path, overwrite)

    specs = {
        name: {
            "in_features": layer.in_features, "out_features": layer.out_features,
            "codebook_size": layer.config.codebook_size, "subvector_dim": layer.config.subvector_dim,
            "code_bits": layer.config.code_bits, "bias": layer.bias is not None,
            **({"row_scales": True} if layer.row_scales is not None else {}),
        }
        for name, layer in layers.items()
    }
    (k, d), _ = Counter((s["codebook_size"], s["subvector_dim"]) for s in specs.values()).most_common(1)[0]
    config = json.loads(model.to_json_string())
    config.pop("quantization_config", None)  # a loaded packed model carries the one it was read with
    tensors, aliases = _checkpoint_tensors(model, layers)
    if not allow_nonfinite:
        _check_finite(tensors, "the model")
    version = 3 if any(s.get("row_scales") for s in specs.values()) else 2 if aliases else 1
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": version, "codebook_size": k,
        "subvector_dim": d, "layers": specs, **({"tensor_aliases": aliases} if aliases else {}),
    }
    metadata = {"format": "pt", _CHECKSUM_KEY: _tensor_digest(tensors)}

    with atomic_folder(path, overwrite=overwrite, validate=lambda p: _check_target(p, overwrite)) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _validate_quant_config(qc: object, path: Path) -> dict:
    if qc is None:
        raise QuantizedCheckpointError(f"{path} is not a vq4dit checkpoint (no quantization_config)")
    if not isinstance(qc, dict):
        raise QuantizedCheckpointError(f"{path}: quantization_config must be a JSON object, got {qc!r}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise QuantizedCheckpointError(f"{path}: unknown quant_method {method!r}, not a vq4dit checkpoint")
    version = qc.get("format_version")
    if type(version) is not int or version < 1:
        raise QuantizedCheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise QuantizedCheckpointError(
            f"{path} was written by a newer vq4dit (format_version {version} > {FORMAT_VERSION}); upgrade vq4dit"
        )
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise QuantizedCheckpointError(f"{path}: quantization_config lists no layers")
    for name, s in layers.items():
        if not (isinstance(s, dict) and all(type(s.get(key)) is int and s[key] > 0 for key in _LAYER_INTS)
                and isinstance(s.get("bias"), bool)):
            raise QuantizedCheckpointError(f"{path}: layer {name!r} needs positive ints {_LAYER_INTS} and a bool bias")
        k = s["codebook_size"]
        if k < 2 or k & (k - 1) or s["code_bits"] != k.bit_length() - 1:
            raise QuantizedCheckpointError(f"{path}: layer {name!r}: codebook_size {k}, code_bits {s['code_bits']}")
    aliases = qc.get("tensor_aliases", {})
    if not (isinstance(aliases, dict) and all(isinstance(a, str) and isinstance(s, str) for a, s in aliases.items())):
        raise QuantizedCheckpointError(f"{path}: tensor_aliases must map tensor names to tensor names")
    return qc


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
    # extras: e.g. timestep_freq_shift; quantization_config: so that a plain save_pretrained of
    # this model is refused by from_pretrained instead of loading random dense weights
    model.register_to_config(**extras, quantization_config=qc)
    for name, s in qc["layers"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        wanted = (s["in_features"], s["out_features"], s["bias"])
        is_linear = type(linear) is nn.Linear
        if not is_linear or (linear.in_features, linear.out_features, linear.bias is not None) != wanted:
            raise QuantizedCheckpointError(f"{path}: quantized layer {name!r} {wanted} does not match the model")
        try:
            layer_config = VQConfig(s["codebook_size"], s["subvector_dim"], num_candidates=1, row_scale=s.get("row_scales") is True)
            layer = VQLinear(s["in_features"], s["out_features"], layer_config, bias=s["bias"])
        except ValueError as err:
            raise QuantizedCheckpointError(f"{path}: layer {name!r}: {err}") from err
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
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
    if metadata.get(_CHECKSUM_KEY) != _tensor_digest(tensors):
        raise QuantizedCheckpointError(f"{file} is corrupted: its tensors do not match the stored checksum")
    return tensors


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")


def _resolve_aliases(tensors: dict, aliases: dict[str, str], path: Path) -> dict:
    """The file's tensors plus every alias, as the very tensor of its source."""
    stored_twice = sorted(set(aliases) & set(tensors))
    dangling = sorted(a for a, s in aliases.items() if s not in tensors)
    if stored_twice or dangling:
        raise QuantizedCheckpointError(
            f"{path}: bad tensor_aliases: stored as well: [{_names(stored_twice)}]; "
            f"source not in the file: [{_names(dangling)}]"
        )
    return {**tensors, **{alias: tensors[source] for alias, source in aliases.items()}}


def tie_tensors_(model: nn.Module, aliases: dict[str, str]) -> int:
    """Make every ``alias`` parameter/buffer of ``model`` the very tensor of its ``source`` (as the
    original DiT shares one embedder between blocks): it is stored once, moved once by ``.to()``,
    and trained as one parameter. Returns the bytes no longer held twice."""
    saved = 0
    for alias, source in aliases.items():
        owner_name, _, source_attr = source.rpartition(".")
        source_owner = model.get_submodule(owner_name)
        alias_owner_name, _, alias_attr = alias.rpartition(".")
        alias_owner = model.get_submodule(alias_owner_name)
        for table in ("_parameters", "_buffers"):
            source_tables, alias_tables = getattr(source_owner, table), getattr(alias_owner, table)
            if source_attr in source_tables and alias_attr in alias_tables:
                tensor, old = source_tables[source_attr], alias_tables[alias_attr]
                if tensor.shape != old.shape or tensor.dtype != old.dtype:
                    raise ValueError(f"cannot tie {alias} {tuple(old.shape)} to {source} {tuple(tensor.shape)}")
                if old is not tensor:
                    saved += old.numel() * old.element_size()
                    alias_tables[alias_attr] = tensor
                break
        else:
            raise ValueError(f"cannot tie {alias} to {source}: not both parameters or both buffers")
    return saved


def _state_dict_from_file(model: nn.Module, qc: dict, tensors: dict, path: Path) -> dict:
    """Check keys and shapes against ``model``, unpack the codes: a complete ``state_dict``."""
    layers = vq_layers(model)
    expected: dict[str, tuple[int, ...]] = {}
    for name, s in qc["layers"].items():
        num_codes = s["out_features"] * s["in_features"] // s["subvector_dim"]
        expected[f"{name}.codebook"] = (s["codebook_size"], s["subvector_dim"])
        expected[f"{name}.codes_packed"] = (packed_size(num_codes, s["code_bits"]),)
        if s["bias"]:
            expected[f"{name}.bias"] = (s["out_features"],)
        if s.get("row_scales") is True:
            expected[f"{name}.row_scales"] = (s["out_features"],)
    model_state = model.state_dict()
    expected.update({k: tuple(v.shape) for k, v in model_state.items() if k.rpartition(".")[0] not in layers})
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QuantizedCheckpointError(
            f"{path}: checkpoint does not match the model; missing keys: [{_names(missing)}]; "
            f"unexpected keys: [{_names(unexpected)}]"
        )
    wrong = [f"{k} {tuple(tensors[k].shape)} != {shape}" for k, shape in expected.items() if tensors[k].shape != shape]
    wrong += [f"{k} {tensors[k].dtype}" for k in expected if k.endswith("_packed") and tensors[k].dtype != torch.uint8]
    if wrong:
        raise QuantizedCheckpointError(f"{path}: shape/dtype mismatch: {_names(wrong)}")
    state = {key: tensors[key] for key in expected if not key.endswith(".codes_packed")}
    state.update({key: state[key].float() for key in state if key.endswith(".row_scales")})  # stored as FP16
    for name, layer in layers.items():
        bits = qc["layers"][name]["code_bits"]
        state[f"{name}.codes"] = unpack_codes(tensors[f"{name}.codes_packed"], bits, layer.num_subvectors)
        state.update({f"{name}.{key}": model_state[f"{name}.{key}"] for key in _SOFT_STATE})  # empty: hard
    return state


def load_quantized(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    share_identical: bool = True,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Read a folder written by :func:`save_quantized`: the diffusers model in eval mode, its
    quantized layers hard ``VQLinear``, bit-identical to the saved model.

    Tensors the file stores once (``tensor_aliases``: identical per-block embedder copies) are one
    tensor of the model (``tie_tensors_``); ``share_identical=False`` gives every module its own
    copy instead (e.g. to fine-tune them apart).

    Tensors with NaN/Inf are refused unless ``allow_nonfinite``. A checkpoint left missing by an
    interrupted overwrite is restored first (``vq4dit.atomic.recover``). ``save_pretrained`` of
    the model raises (use :func:`save_quantized`).

    Raises :class:`QuantizedCheckpointError` for anything that is not a readable vq4dit checkpoint.
    """
    path = Path(path)
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
    qc = _validate_quant_config(config.pop("quantization_config", None), path)
    model = _build_model(config, qc, path)
    aliases = qc.get("tensor_aliases", {})
    stored = _read_tensors(path / WEIGHTS_NAME)
    if not allow_nonfinite:
        _check_finite(stored, str(path))
    tensors = _resolve_aliases(stored, aliases, path)
    state = _state_dict_from_file(model, qc, tensors, path)
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


