"""Packed safetensors checkpoints of vector-quantized DiTs, and the model-size report.

Folder layout (``format_version`` 1)::

    config.json        the diffusers config (as ``save_pretrained`` writes it) plus
                       "quantization_config": {"quant_method": "vq4dit", "format_version": 1,
                       "codebook_size", "subvector_dim", "layers": {name: per-layer settings}}
    model.safetensors  <layer>.codebook [k, d], <layer>.codes_packed [ceil(N*log2(k)/8)] uint8,
                       <layer>.bias [out]; every other state_dict tensor in its own dtype.
                       Header metadata "vq4dit_sha256" hashes all tensors (corruption check).

Codes are bit-packed at exactly ``b = log2(k)`` bits, little-endian: code ``i`` occupies stream
bits ``[i*b, (i+1)*b)``, least significant bit first; stream bit ``j`` is bit ``j % 8`` (LSB = 0)
of byte ``j // 8``. Plain diffusers refuses the folder (unknown ``quant_method``); it also holds
no ``diffusion_pytorch_model.*`` file and no dense ``.weight`` for the quantized layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from .nn import VQLinear, vq_layers
from .quantizer import VQConfig, index_dtype

QUANT_METHOD = "vq4dit"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CHECKSUM_KEY = "vq4dit_sha256"
_SOFT_STATE = ("soft_rows", "candidates", "candidate_logits")
_FREQ_SHIFT_KEYS = ("_timestep_freq_shift", "timestep_freq_shift")  # recorded by vq4dit.models
_LAYER_INTS = ("in_features", "out_features", "codebook_size", "subvector_dim", "code_bits")
# Codes per packing chunk; a multiple of 8, so every chunk starts on a byte boundary
# (temporaries of at most 2 x chunk x 4 B = 8 MiB).
_CHUNK_CODES = 1 << 20
_MIB = 8 * 1024**2  # bits per MiB


class QuantizedCheckpointError(ValueError):
    """A vq4dit checkpoint cannot be written or read (bad input, bad folder, bad file)."""


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes packed at ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _byte_overlaps(bits: int) -> list[tuple[int, int, int]]:
    """``(code j, byte m, shift j*b - 8m)`` for each code/byte pair of a group of 8 codes
    (= ``bits`` bytes) that share stream bits."""
    return [(j, m, j * bits - 8 * m) for j in range(8) for m in range(j * bits // 8, ((j + 1) * bits - 1) // 8 + 1)]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack ``codes [N]`` (integers in ``0 .. 2**bits - 1``) into ``[ceil(N*bits/8)]`` uint8 (CPU).

    Little-endian (module docstring), last byte zero-padded. Vectorised over groups of 8 codes
    (= ``bits`` bytes), one chunk of groups at a time.
    """
    _check_bits(bits)
    if codes.ndim != 1 or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 1-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.detach().cpu()
    count = codes.numel()
    if count and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:  # one code per byte
        return codes.to(torch.uint8, copy=True)
    work = torch.uint8 if bits <= 8 else torch.int32  # uint8 shifts wrap: the & 0xFF for free
    packed = torch.empty(packed_size(count, bits), dtype=torch.uint8)
    for start in range(0, count, _CHUNK_CODES):
        chunk = codes[start : start + _CHUNK_CODES].to(work)
        groups = F.pad(chunk, (0, -chunk.numel() % 8)).view(-1, 8).t().contiguous()  # [8, G]
        out = torch.zeros(bits, groups.shape[1], dtype=work)  # [bits, G]: byte m of group g
        for j, m, shift in _byte_overlaps(bits):
            out[m] |= groups[j] << shift if shift >= 0 else groups[j] >> -shift
        offset, num_bytes = start * bits // 8, packed_size(chunk.numel(), bits)
        packed[offset : offset + num_bytes] = out.t().reshape(-1)[:num_bytes].to(torch.uint8)  # low byte
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``packed [ceil(count*bits/8)] uint8 -> codes [count]`` (CPU),
    dtype ``index_dtype(2**bits)`` as ``VQLinear.codes``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if count < 0 or packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits")
    packed = packed.detach().cpu()
    if bits == 8:
        return packed.to(index_dtype(256), copy=True)
    codes = torch.empty(count, dtype=index_dtype(1 << bits))
    work = torch.uint8 if bits <= 8 else torch.int32  # wrapping uint8 shifts keep the low 8 bits
    for start in range(0, count, _CHUNK_CODES):
        num = min(_CHUNK_CODES, count - start)
        offset, num_bytes = start * bits // 8, packed_size(num, bits)
        chunk = packed[offset : offset + num_bytes].to(work)
        groups = F.pad(chunk, (0, -num_bytes % bits)).view(-1, bits).t().contiguous()  # [bits, G]
        out = torch.zeros(8, groups.shape[1], dtype=work)  # [8, G]: code j of group g
        for j, m, shift in _byte_overlaps(bits):
            out[j] |= groups[m] >> shift if shift >= 0 else groups[m] << -shift
        out &= (1 << bits) - 1
        codes[start : start + num] = out.t().reshape(-1)[:num].to(codes.dtype)
    return codes


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


def _checkpoint_tensors(model: nn.Module, layers: dict[str, VQLinear]) -> dict[str, torch.Tensor]:
    """File contents: packed VQ layers plus every other ``state_dict`` tensor (CPU, contiguous)."""
    tensors: dict[str, torch.Tensor] = {}
    vq_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.state_dict()}
    for name, layer in layers.items():
        tensors[f"{name}.codebook"] = layer.codebook.detach()
        tensors[f"{name}.codes_packed"] = pack_codes(layer.codes, layer.config.code_bits)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
    tensors.update({k: v.detach() for k, v in model.state_dict().items() if k not in vq_keys})
    seen = set()
    for key, value in tensors.items():  # safetensors refuses tensors that share memory
        value = value.cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return tensors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # not every platform fsyncs directories
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


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


def save_quantized(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a diffusers ``model`` whose ``VQLinear`` layers are all hard to the folder ``path``.

    Atomic: written into a hidden temporary sibling, fsynced, then renamed into place. With
    ``overwrite=True`` an existing checkpoint folder (only config.json / model.safetensors) is
    renamed aside, the new one renamed in, the old one deleted. Returns the folder path.
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
        }
        for name, layer in layers.items()
    }
    (k, d), _ = Counter((s["codebook_size"], s["subvector_dim"]) for s in specs.values()).most_common(1)[0]
    config = json.loads(model.to_json_string())
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "codebook_size": k, "subvector_dim": d,
        "layers": specs,
    }
    tensors = _checkpoint_tensors(model, layers)
    metadata = {"format": "pt", _CHECKSUM_KEY: _tensor_digest(tensors)}

    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {parent}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as err:
        raise QuantizedCheckpointError(f"cannot write a checkpoint into {parent}: {err}") from err
    old, done = None, False
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        for item in (tmp / CONFIG_NAME, tmp / WEIGHTS_NAME, tmp):
            _fsync(item)
        _check_target(path, overwrite)  # it may have appeared meanwhile
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        done = True
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place
        if old is not None and done:
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None and old.exists() and not path.exists():
            os.rename(old, path)  # interrupted between the two renames: put the old checkpoint back
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
            layer_config = VQConfig(s["codebook_size"], s["subvector_dim"], num_candidates=1)
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
    for name, layer in layers.items():
        bits = qc["layers"][name]["code_bits"]
        state[f"{name}.codes"] = unpack_codes(tensors[f"{name}.codes_packed"], bits, layer.num_subvectors)
        state.update({f"{name}.{key}": model_state[f"{name}.{key}"] for key in _SOFT_STATE})  # empty: hard
    return state


def load_quantized(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Read a folder written by :func:`save_quantized`: the diffusers model in eval mode, its
    quantized layers hard ``VQLinear``, bit-identical to the saved model.

    Raises :class:`QuantizedCheckpointError` for anything that is not a readable vq4dit checkpoint.
    """
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise QuantizedCheckpointError(f"{path} is not a vq4dit checkpoint: no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizedCheckpointError(f"{config_file} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise QuantizedCheckpointError(f"{config_file} does not hold a JSON object")
    qc = _validate_quant_config(config.pop("quantization_config", None), path)
    model = _build_model(config, qc, path)
    state = _state_dict_from_file(model, qc, _read_tensors(path / WEIGHTS_NAME), path)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # assign: keep the stored dtypes
    except RuntimeError as err:
        raise QuantizedCheckpointError(f"{path}: {err}") from err
    if any(key in config for key in _FREQ_SHIFT_KEYS):  # a module attribute, not a tensor: re-apply
        try:
            from .models import apply_timestep_freq_shift
        except ImportError:  # not provided by this version of vq4dit.models
            apply_timestep_freq_shift = None
        if apply_timestep_freq_shift is not None:
            apply_timestep_freq_shift(model)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Size report
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerSize:
    """Sizes of one ``VQLinear`` (from shapes only: works on the meta device)."""

    name: str
    out_features: int
    in_features: int
    codebook_size: int  # k
    subvector_dim: int  # d
    nominal_bits_per_weight: float  # log2(k) / d
    bits_per_weight: float  # plus an FP32 codebook amortised over the layer
    code_bits: int  # nominal: N * log2(k), N = out * in / d
    packed_code_bytes: int  # ceil(code_bits / 8): what the file stores
    codebook_bytes: int  # in the codebook's dtype
    num_biases: int  # 0 without bias
    bias_bytes: int  # in the bias' dtype

    @classmethod
    def of(cls, name: str, layer: VQLinear) -> LayerSize:
        c, num_weights = layer.config, layer.out_features * layer.in_features
        code_bits = num_weights // c.subvector_dim * c.code_bits
        bias = layer.bias if layer.bias is not None else torch.empty(0, device="meta")
        return cls(
            name, layer.out_features, layer.in_features, c.codebook_size, c.subvector_dim,
            c.nominal_bits_per_weight, layer.bits_per_weight(include_codebook=True), code_bits, (code_bits + 7) // 8,
            layer.codebook.numel() * layer.codebook.element_size(), bias.numel(), bias.numel() * bias.element_size(),
        )


@dataclass
class SizeReport:
    """Per-layer rows; the paper's MiB accounting over the quantized layers (FP32 weights + biases
    vs log2(k)-bit codes + FP32 codebooks + FP32 biases); the estimated file size."""

    layers: list[LayerSize]
    num_weights: int
    num_biases: int
    fp32_mib: float
    codes_mib: float
    codebooks_mib: float
    biases_mib: float
    quantized_mib: float
    compression: float  # fp32_mib / quantized_mib
    other_bytes: int  # every non-quantized state_dict tensor, in its dtype
    file_bytes: int  # estimated model.safetensors size, header excluded

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A text table, one row per layer, then the totals."""
        head = (f"{'layer':<40} {'shape':>11} {'k':>6} {'d':>2} {'b/w':>6} {'b/w+cb':>7} {'codes B':>11} "
                f"{'codebook B':>10} {'bias B':>7}")
        lines = [head, "-" * len(head)] + [
            f"{r.name:<40} {f'{r.out_features}x{r.in_features}':>11} {r.codebook_size:>6} {r.subvector_dim:>2} "
            f"{r.nominal_bits_per_weight:>6.3f} {r.bits_per_weight:>7.3f} {r.packed_code_bytes:>11,} "
            f"{r.codebook_bytes:>10,} {r.bias_bytes:>7,}"
            for r in self.layers
        ]
        mib = 1024**2
        return "\n".join(lines + [
            "-" * len(head),
            f"{len(self.layers)} quantized layers: {self.num_weights:,} weights + {self.num_biases:,} biases",
            f"FP32 {self.fp32_mib:.2f} MiB -> {self.quantized_mib:.2f} MiB ({self.compression:.2f}x): codes "
            f"{self.codes_mib:.2f} + codebooks {self.codebooks_mib:.3f} + biases {self.biases_mib:.2f} MiB",
            f"estimated file size {self.file_bytes / mib:.2f} MiB (other tensors {self.other_bytes / mib:.2f} MiB)",
        ])


def size_report(model: nn.Module) -> SizeReport:
    """Size accounting of ``model``'s ``VQLinear`` layers (vq4dit-paper.md section 5)."""
    layers = vq_layers(model)
    rows = [LayerSize.of(name, layer) for name, layer in layers.items()]
    vq_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.state_dict(keep_vars=True)}
    other = sum(v.numel() * v.element_size() for k, v in model.state_dict(keep_vars=True).items() if k not in vq_keys)
    num_weights = sum(r.out_features * r.in_features for r in rows)
    num_biases = sum(r.num_biases for r in rows)
    codes = sum(r.code_bits for r in rows) / _MIB
    codebooks = sum(r.codebook_size * r.subvector_dim for r in rows) * 32 / _MIB
    biases = num_biases * 32 / _MIB
    fp32, quantized = (num_weights + num_biases) * 32 / _MIB, codes + codebooks + biases
    stored = sum(r.packed_code_bytes + r.codebook_bytes + r.bias_bytes for r in rows)
    return SizeReport(
        rows, num_weights, num_biases, fp32, codes, codebooks, biases, quantized,
        fp32 / quantized if quantized else float("nan"), other, other + stored,
    )
