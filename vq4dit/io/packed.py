"""The packed checkpoint format: its folder layout, and the conversions model ``state_dict`` ->
file tensors (:func:`pack_state_dict`) and back (:func:`unpack_state_dict`), the
``quantization_config`` of a model (:func:`quant_config_for`) and its validation, the ``VQLinear``
skeleton a config describes (:func:`install_vq_layers`), the tying of tensors stored once
(:func:`tie_tensors_`) and the check of a file's header against its config before any data is read
(:func:`check_header`). Shared by ``vq4dit.io.checkpoint`` (``save_quantized`` / ``load_quantized``)
and the diffusers backend (``vq4dit.io.diffusers_backend``).

Folder layout (diffusers' own: ``save_pretrained`` / ``from_pretrained`` read and write it)::

    config.json        the diffusers config plus "quantization_config": {"quant_method": "vq4dit",
                       "format_version": 1|2|3, "codebook_size", "subvector_dim",
                       "layers": {name: per-layer settings}, "tensor_aliases": {alias: source}
                       (version >= 2), "card": {model card facts} (optional)}
    diffusion_pytorch_model.safetensors
                       <layer>.codebook [k, d], <layer>.codes_packed [ceil(N*log2(k)/8)] uint8,
                       <layer>.bias [out], <layer>.row_scales [out] FP16 (version 3); every other
                       state_dict tensor in its own dtype, stored once when several are identical
                       (an alias is read from its source). Header metadata "vq4dit_sha256" hashes
                       all tensors (corruption check).
    README.md          the model card (``vq4dit.io.model_card``), written by vq4dit's writers

Folders written before the layout moved to diffusers' file name (format 1-3, by
``save_quantized`` up to 715203d) hold the same tensors as ``model.safetensors``; ``load_quantized``
reads both names. ``format_version`` says which tensors exist (3 with row scales, 2 with aliases,
else 1), not the file name. Codes are bit-packed at exactly ``b = log2(k)`` bits (``vq4dit.packing``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from ..layers import VQLinear
from ..models import NonFiniteError, check_finite
from ..packing import identical_tensors, pack_codes, packed_size, unpack_codes
from ..quantize import vq_layers
from ..vq_config import VQConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name: stock from_pretrained finds it
LEGACY_WEIGHTS_NAME = "model.safetensors"  # what save_quantized wrote up to 715203d (format 1-3)
QUANT_METHOD = "vq4dit"
FORMAT_VERSION = 3  # the newest this version reads and writes: 3 with row scales, 2 with aliases, else 1
CHECKSUM_KEY = "vq4dit_sha256"
SOFT_STATE = ("soft_rows", "candidates", "candidate_logits")
_VQ_STATE = ("codebook", "codes", "bias", "row_scales", *SOFT_STATE)
_LAYER_INTS = ("in_features", "out_features", "codebook_size", "subvector_dim", "code_bits")


class QuantizedCheckpointError(ValueError):
    """A vq4dit checkpoint cannot be written or read (bad input, bad folder, bad file)."""


def names(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of all tensors (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Model -> file
# ---------------------------------------------------------------------------------------------


def quant_config_for(model: nn.Module) -> dict:
    """The ``quantization_config`` of ``model`` as it is now: its hard ``VQLinear`` layers and the
    identical non-quantized tensors stored once (``tensor_aliases``)."""
    layers = vq_layers(model)
    if not layers:
        raise QuantizedCheckpointError("model has no VQLinear layer; quantize it with quantize_() first")
    soft = [name for name, layer in layers.items() if not layer.is_hard]
    if soft:
        raise QuantizedCheckpointError(f"VQLinear layers have soft rows, call finalize_() first: {names(soft)}")
    if any(layer.codebook.is_meta for layer in layers.values()):
        raise QuantizedCheckpointError("the model's VQLinear layers are on the meta device (no values)")
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
    vq_keys = {f"{name}.{key}" for name in layers for key in _VQ_STATE}
    aliases = identical_tensors({key: v for key, v in model.state_dict().items() if key not in vq_keys})
    version = 3 if any(s.get("row_scales") for s in specs.values()) else 2 if aliases else 1
    return {
        "quant_method": QUANT_METHOD, "format_version": version, "codebook_size": k,
        "subvector_dim": d, "layers": specs, **({"tensor_aliases": aliases} if aliases else {}),
    }


def pack_state_dict(state: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """File tensors of a model ``state_dict`` (CPU, contiguous, no shared memory): per quantized
    layer its codebook, bit-packed codes and bias; every other tensor except the aliases of ``qc``
    (which must still equal their sources)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in qc["layers"].items():
        if state[f"{name}.soft_rows"].numel():
            raise QuantizedCheckpointError(f"layer {name} has soft rows, call finalize_() first")
        tensors[f"{name}.codebook"] = state[f"{name}.codebook"].detach()
        tensors[f"{name}.codes_packed"] = pack_codes(state[f"{name}.codes"], spec["code_bits"])
        if spec["bias"]:
            tensors[f"{name}.bias"] = state[f"{name}.bias"].detach()
        if spec.get("row_scales") is True:
            tensors[f"{name}.row_scales"] = state[f"{name}.row_scales"].detach().half()  # stored as FP16
    vq_keys = {f"{name}.{key}" for name in qc["layers"] for key in _VQ_STATE}
    aliases = qc.get("tensor_aliases", {})
    changed = [a for a, s in aliases.items() if not torch.equal(state[a].detach().cpu(), state[s].detach().cpu())]
    if changed:
        raise QuantizedCheckpointError(
            f"tensors recorded as identical differ now: {names(changed)}; save with vq4dit.save_quantized or "
            "model.save_pretrained (both record the model as it is)"
        )
    tensors.update({k: v.detach() for k, v in state.items() if k not in vq_keys and k not in aliases})
    seen = set()
    for key, value in tensors.items():  # safetensors refuses tensors that share memory
        value = value.cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return tensors


# ---------------------------------------------------------------------------------------------
# File -> model
# ---------------------------------------------------------------------------------------------


def validate_quant_config(qc: object, path: object) -> dict:
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


def install_vq_layers(model: nn.Module, qc: dict, path: object, device: torch.device | str | None = None) -> None:
    """Replace the ``nn.Linear`` layers ``qc`` lists by empty hard ``VQLinear`` layers."""
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
            layer_config = VQConfig(codebook_size=s["codebook_size"], subvector_dim=s["subvector_dim"], num_candidates=1,
                                    row_scale=s.get("row_scales") is True)
            layer = VQLinear(s["in_features"], s["out_features"], layer_config, bias=s["bias"], device=device)
        except ValueError as err:
            raise QuantizedCheckpointError(f"{path}: layer {name!r}: {err}") from err
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def state_keys(loaded_keys: list[str], qc: dict) -> list[str]:
    """The ``state_dict`` keys a file with ``loaded_keys`` gives (codes unpacked, aliases resolved):
    what the model expects, so diffusers reports no missing or unexpected key."""
    keys = [k for k in loaded_keys if not k.endswith(".codes_packed")] + list(qc.get("tensor_aliases", {}))
    return keys + [f"{name}.{key}" for name in qc["layers"] for key in ("codes", *SOFT_STATE)]


def check_aliases(stored: Iterable[str], aliases: dict[str, str], path: object) -> None:
    """Refuse ``tensor_aliases`` naming a tensor the file also stores, or a source it lacks."""
    stored = set(stored)
    stored_twice = sorted(set(aliases) & stored)
    dangling = sorted(a for a, s in aliases.items() if s not in stored)
    if stored_twice or dangling:
        raise QuantizedCheckpointError(
            f"{path}: bad tensor_aliases: stored as well: [{names(stored_twice)}]; "
            f"source not in the file: [{names(dangling)}]"
        )


def resolve_aliases(tensors: dict, aliases: dict[str, str], path: object) -> dict:
    """The file's tensors plus every alias, as the very tensor of its source."""
    check_aliases(tensors, aliases, path)
    return {**tensors, **{alias: tensors[source] for alias, source in aliases.items()}}


def expected_shapes(qc: dict, model_state: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of ``qc`` holds once aliases are resolved, given
    ``model_state`` (the skeleton of :func:`install_vq_layers`, may be on the meta device)."""
    expected: dict[str, tuple[int, ...]] = {}
    layer_names = set(qc["layers"])
    for name, s in qc["layers"].items():
        num_codes = s["out_features"] * s["in_features"] // s["subvector_dim"]
        expected[f"{name}.codebook"] = (s["codebook_size"], s["subvector_dim"])
        expected[f"{name}.codes_packed"] = (packed_size(num_codes, s["code_bits"]),)
        if s["bias"]:
            expected[f"{name}.bias"] = (s["out_features"],)
        if s.get("row_scales") is True:
            expected[f"{name}.row_scales"] = (s["out_features"],)
    expected.update({k: tuple(v.shape) for k, v in model_state.items() if k.rpartition(".")[0] not in layer_names})
    return expected


def unpack_state_dict(tensors: dict, qc: dict, model_state: dict, path: object) -> dict:
    """Check the file ``tensors`` (aliases resolved) against ``model_state`` (the skeleton of
    :func:`install_vq_layers`, may be on the meta device), unpack the codes: a complete ``state_dict``."""
    expected = expected_shapes(qc, model_state)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QuantizedCheckpointError(
            f"{path}: checkpoint does not match the model; missing keys: [{names(missing)}]; "
            f"unexpected keys: [{names(unexpected)}]"
        )
    wrong = [f"{k} {tuple(tensors[k].shape)} != {shape}" for k, shape in expected.items() if tensors[k].shape != shape]
    wrong += [f"{k} {tensors[k].dtype}" for k in expected if k.endswith("_packed") and tensors[k].dtype != torch.uint8]
    if wrong:
        raise QuantizedCheckpointError(f"{path}: shape/dtype mismatch: {names(wrong)}")
    state = {key: tensors[key] for key in expected if not key.endswith(".codes_packed")}
    state.update({key: state[key].float() for key in state if key.endswith(".row_scales")})  # stored as FP16
    for name, s in qc["layers"].items():
        count = s["out_features"] * s["in_features"] // s["subvector_dim"]
        state[f"{name}.codes"] = unpack_codes(tensors[f"{name}.codes_packed"], s["code_bits"], count)
        for key in SOFT_STATE:  # empty: hard
            empty = model_state[f"{name}.{key}"]
            state[f"{name}.{key}"] = torch.empty(empty.shape, dtype=empty.dtype)
    return state


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


# ---------------------------------------------------------------------------------------------
# Checks before reading data
# ---------------------------------------------------------------------------------------------

_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_header(file: str | os.PathLike) -> tuple[dict, dict]:
    """The safetensors header of ``file`` (name -> {dtype, shape, data_offsets}) and its metadata,
    read without touching the data; refuses a header whose sizes disagree with each other or with
    the file's size (a truncated file, or one that claims more data than it holds)."""
    size = os.path.getsize(file)
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise QuantizedCheckpointError(f"{file} is truncated or corrupted: not a safetensors file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise QuantizedCheckpointError(f"{file} is truncated or corrupted: unreadable header ({err})") from err
    if not isinstance(header, dict):
        raise QuantizedCheckpointError(f"{file} is corrupted: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            nbytes = numel * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as err:
            raise QuantizedCheckpointError(f"{file} is corrupted: bad header entry {name!r}") from err
        if stop - begin != nbytes or begin < 0:
            raise QuantizedCheckpointError(f"{file} is corrupted: {name} claims {nbytes} bytes at {begin}..{stop}")
        end = max(end, stop)
    if 8 + length + end != size:
        raise QuantizedCheckpointError(
            f"{file} is truncated or corrupted: its header describes {8 + length + end} bytes, the file has {size}"
        )
    return header, metadata


def check_header(header: dict, qc: dict, model_state: dict, path: object) -> None:
    """Refuse a file whose tensor names, shapes or code dtypes (``header`` of :func:`read_header`)
    are not those the config ``qc`` and the model skeleton ``model_state`` give, before any data
    is read (a header may claim gigabytes the model has no place for)."""
    aliases = qc.get("tensor_aliases", {})
    check_aliases(header, aliases, path)
    expected = {k: v for k, v in expected_shapes(qc, model_state).items() if k not in aliases}
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    wrong = [f"{k} {tuple(header[k]['shape'])} != {shape}" for k, shape in expected.items()
             if k in header and tuple(header[k]["shape"]) != shape]
    wrong += [f"{k} {header[k]['dtype']}" for k in expected if k.endswith("_packed") and k in header
              and header[k]["dtype"] != "U8"]
    if missing or unexpected or wrong:
        raise QuantizedCheckpointError(
            f"{path}: the weights file does not match config.json (a half-written or foreign folder?): "
            f"missing keys: [{names(missing)}]; unexpected keys: [{names(unexpected)}]; "
            f"shape/dtype mismatch: [{names(wrong)}]"
        )


def refuse_nonfinite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """:class:`QuantizedCheckpointError` naming the tensors holding NaN/Inf (a model that should not
    be written, or a file that should not be loaded)."""
    try:
        check_finite(tensors, what=what)
    except NonFiniteError as err:
        raise QuantizedCheckpointError(f"{err}; pass allow_nonfinite=True to accept them") from err
