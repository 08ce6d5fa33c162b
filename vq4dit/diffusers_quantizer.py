"""The ``vq4dit`` quantization backend of diffusers: packed models load with diffusers'
``from_pretrained`` and save with ``save_pretrained`` / ``push_to_hub``, as bitsandbytes, GGUF or
torchao models do.

``import vq4dit`` calls :func:`register`, which adds :class:`VQ4DiTConfig` and
:class:`VQ4DiTQuantizer` to ``diffusers.quantizers.auto``'s ``AUTO_QUANTIZATION_CONFIG_MAPPING`` /
``AUTO_QUANTIZER_MAPPING`` under ``quant_method: vq4dit``. Then::

    DiTTransformer2DModel.from_pretrained(folder_or_hub_id, torch_dtype=...)  # packed model
    DiTPipeline.from_pretrained(pipeline_folder)                               # transformer/ packed
    model.save_pretrained(folder) / pipe.save_pretrained(folder)               # writes it packed

Loading (``ModelMixin.from_pretrained`` calls the quantizer's hooks in this order):
``maybe_update_loaded_keys`` reads the file's checksum and gives the unpacked key set;
``_process_model_before_weight_loading`` swaps the listed ``nn.Linear`` of the meta-device skeleton
for empty ``VQLinear``; ``maybe_update_state_dict`` checks the checksum and unpacks the codes,
resolves ``tensor_aliases`` (``vq4dit.packed_state``); ``_process_model_after_weight_loading``
ties the aliased tensors (one embedder shared by all blocks, as ``load_quantized`` does) and
re-applies a recorded timestep frequency shift.

Saving: diffusers writes config.json before it asks the quantizer for the state dict, so the
``quantization_config`` (layers, ``tensor_aliases``) must be up to date first. Every quantized
model (``load_quantized``, ``from_pretrained``, ``quantize_``) therefore carries a
``save_pretrained`` (``vq4dit.convert.guard_save_pretrained``) that records the model as it is,
runs diffusers' own ``save_pretrained`` with this quantizer (``get_state_dict_and_metadata``
packs the codes and drops the aliases), writes the model card and uploads with ``push_to_hub``.
The weights file is diffusers' ``diffusion_pytorch_model.safetensors``; ``save_quantized`` writes
the same tensors as ``model.safetensors``, which ``from_pretrained`` finds too
(:func:`_get_model_file`). Only safetensors, unsharded, one device (no multi-device ``device_map``).
"""

from __future__ import annotations

import functools
import json
import warnings
from enum import Enum
from pathlib import Path

import diffusers
import safetensors
from packaging import version

from .packed_state import (
    CHECKSUM_KEY, QUANT_METHOD, QuantizedCheckpointError, install_vq_layers, resolve_aliases,
    state_keys, tensor_digest, tie_tensors_, unpack_state_dict, validate_quant_config,
)

SUPPORTED = (version.parse("0.42"), version.parse("0.43"))  # [min, max): tested with 0.42.1
_CONFIG_FIELDS = ("quant_method", "format_version", "codebook_size", "subvector_dim", "layers")


class UnsupportedDiffusersError(ImportError):
    """The installed diffusers cannot host the vq4dit backend (from_pretrained / save_pretrained)."""


def diffusers_version() -> str:
    return diffusers.__version__


def check_diffusers_version() -> None:
    """Raise :class:`UnsupportedDiffusersError` unless diffusers is in :data:`SUPPORTED`."""
    found = version.parse(version.parse(diffusers_version()).base_version)
    if not SUPPORTED[0] <= found < SUPPORTED[1]:
        raise UnsupportedDiffusersError(
            f"vq4dit's diffusers backend supports diffusers >={SUPPORTED[0]},<{SUPPORTED[1]}; found "
            f"{diffusers_version()}. from_pretrained / save_pretrained of vq4dit models are not available: "
            "install a supported diffusers, or use vq4dit.load_quantized / vq4dit.save_quantized"
        )


from diffusers.quantizers.base import DiffusersQuantizer  # noqa: E402
from diffusers.quantizers.quantization_config import QuantizationConfigMixin  # noqa: E402


class VQ4DiTMethod(str, Enum):
    VQ4DIT = QUANT_METHOD


class VQ4DiTConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed model (written by vq4dit, not chosen by a user):
    ``layers`` (per quantized layer: in/out features, k, d, code bits, bias), the most common
    ``codebook_size`` / ``subvector_dim``, ``tensor_aliases`` (tensors stored once) and any other
    recorded key (e.g. ``card``), kept as read. ``to_dict`` gives the JSON of config.json."""

    def __init__(self, layers: dict, codebook_size: int, subvector_dim: int, format_version: int = 1,
                 quant_method: str = QUANT_METHOD, **extra) -> None:
        self.quant_method = VQ4DiTMethod(quant_method)
        self.format_version = format_version
        self.codebook_size = codebook_size
        self.subvector_dim = subvector_dim
        self.layers = layers
        self.extra = extra

    @property
    def tensor_aliases(self) -> dict[str, str]:
        return self.extra.get("tensor_aliases", {})

    def to_dict(self) -> dict:
        qc = {key: getattr(self, key) for key in _CONFIG_FIELDS}
        qc["quant_method"] = self.quant_method.value
        return json.loads(json.dumps({**qc, **self.extra}))  # a deep copy of JSON values

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class VQ4DiTQuantizer(DiffusersQuantizer):
    """Loads and saves pre-quantized (packed) vq4dit models; it cannot quantize on load (use
    ``vq4dit.quantize_`` and the calibration)."""

    requires_calibration = True
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: VQ4DiTConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.qc = validate_quant_config(quantization_config.to_dict(), "quantization_config")
        self._checksum: str | None = None
        self._model = None

    # -------------------------------------------------------------------------------- loading
    def validate_environment(self, *args, **kwargs) -> None:
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ImportError("diffusers loads quantized models only with accelerate: pip install accelerate "
                              "(a vq4dit dependency), or use vq4dit.load_quantized")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise ValueError(f"vq4dit models load onto one device; got device_map {device_map}")
        if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"vq4dit models load onto one device: device_map={device_map!r} is not supported")

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        if len(checkpoint_files) != 1:
            raise QuantizedCheckpointError(f"vq4dit models are one safetensors file, got {checkpoint_files}")
        file = str(checkpoint_files[0])
        if not file.endswith(".safetensors"):
            raise QuantizedCheckpointError(f"{file}: vq4dit models are safetensors files")
        with safetensors.safe_open(file, framework="pt") as handle:
            self._checksum = (handle.metadata() or {}).get(CHECKSUM_KEY)
        self._file = file
        return state_keys(loaded_keys, self.qc)

    def _process_model_before_weight_loading(self, model, **kwargs):
        install_vq_layers(model, self.qc, "quantization_config", device="meta")
        self._model = model
        return model

    def maybe_update_state_dict(self, state_dict: dict) -> dict:
        from .export import _check_finite

        where = getattr(self, "_file", "checkpoint")
        if self._checksum != tensor_digest(state_dict):
            raise QuantizedCheckpointError(f"{where} is corrupted: its tensors do not match the stored checksum")
        _check_finite(state_dict, where)
        stored = {key: value.clone() for key, value in state_dict.items()}  # not views of the mapped file
        tensors = resolve_aliases(stored, self.qc.get("tensor_aliases", {}), where)
        return unpack_state_dict(tensors, self.qc, self._model.state_dict(), where)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .convert import TIMESTEP_FREQ_SHIFT_KEY, apply_timestep_freq_shift, guard_save_pretrained

        tie_tensors_(model, self.qc.get("tensor_aliases", {}))
        if TIMESTEP_FREQ_SHIFT_KEY in model.config:
            apply_timestep_freq_shift(model)
        self._model = None
        return guard_save_pretrained(model)

    # --------------------------------------------------------------------------------- saving
    def get_state_dict_and_metadata(self, state_dict: dict, safe_serialization: bool = False):
        from .packed_state import pack_state_dict

        if not safe_serialization:
            raise QuantizedCheckpointError("vq4dit models are saved as safetensors (safe_serialization=True)")
        tensors = pack_state_dict(state_dict, self.qc)
        return tensors, {CHECKSUM_KEY: tensor_digest(tensors)}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False  # fine-tune with vq4dit.engine, not through diffusers' quantizer API

    @property
    def is_compileable(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# save_pretrained of a quantized model
# ---------------------------------------------------------------------------------------------


def save_pretrained_packed(model, save_directory, *, push_to_hub: bool = False, card: dict | None = None, **kwargs):
    """``model.save_pretrained`` of a model holding ``VQLinear`` layers: diffusers' own
    ``save_pretrained`` with the ``quantization_config`` of the model as it is now, then README.md
    (the model card) and, with ``push_to_hub``, an upload (``repo_id=``, ``token=``, ``private=``,
    ``commit_message=``, ``create_pr=``)."""
    from .export import checkpoint
    from .model_card import CARD_NAME, model_card, push_folder

    check_diffusers_version()
    register()
    hub = {key: kwargs.pop(key) for key in ("repo_id", "token", "private", "commit_message", "create_pr") if key in kwargs}
    config, tensors, _ = checkpoint(model, card)
    qc = VQ4DiTConfig(**config["quantization_config"])
    model.register_to_config(quantization_config=qc)
    missing = object()
    old = model.__dict__.get("hf_quantizer", missing)
    model.hf_quantizer = VQ4DiTQuantizer(qc)
    try:
        type(model).save_pretrained(model, save_directory, **kwargs)
    finally:
        if old is missing:
            del model.hf_quantizer
        else:
            model.hf_quantizer = old
    if kwargs.get("is_main_process", True):
        Path(save_directory, CARD_NAME).write_text(model_card(model, config, tensors), encoding="utf-8")
        if push_to_hub:
            repo_id = hub.pop("repo_id", None) or Path(save_directory).absolute().name
            push_folder(save_directory, repo_id, **hub)


def push_to_hub_packed(model, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                       token: str | None = None, create_pr: bool = False, subfolder: str | None = None, **save_kwargs):
    """``model.push_to_hub`` of a quantized model: :func:`save_pretrained_packed` into a temporary
    folder (model card included), uploaded to ``repo_id`` (under ``subfolder``)."""
    import tempfile

    from .model_card import push_folder

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained_packed(model, tmp, **save_kwargs)
        return push_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message,
                           create_pr=create_pr, path_in_repo=subfolder)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _vq4dit_folder(get_model_file, path, kwargs) -> bool:
    """Whether ``path`` (local folder or hub id, with ``subfolder``) holds a vq4dit config.json."""
    try:
        config_file = get_model_file(path, **{**kwargs, "weights_name": "config.json"})
        with open(config_file, encoding="utf-8") as handle:
            qc = json.load(handle).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _with_packed_name(get_model_file):
    """``_get_model_file`` that also finds save_quantized's ``model.safetensors`` of a vq4dit folder
    when diffusers' ``diffusion_pytorch_model.*`` is not there."""
    from .export import DIFFUSERS_WEIGHTS_NAME, WEIGHTS_NAME

    @functools.wraps(get_model_file)
    def _get_model_file(pretrained_model_name_or_path, **kwargs):
        try:
            return get_model_file(pretrained_model_name_or_path, **kwargs)
        except OSError:
            name = kwargs.get("weights_name")
            if name not in (DIFFUSERS_WEIGHTS_NAME, "diffusion_pytorch_model.bin") or not _vq4dit_folder(
                get_model_file, pretrained_model_name_or_path, kwargs
            ):
                raise
            return get_model_file(pretrained_model_name_or_path, **{**kwargs, "weights_name": WEIGHTS_NAME})

    _get_model_file.vq4dit_original = get_model_file
    return _get_model_file


def register() -> None:
    """Register the ``vq4dit`` backend with diffusers (idempotent; ``import vq4dit`` does it).

    Raises :class:`UnsupportedDiffusersError` for a diffusers outside :data:`SUPPORTED`."""
    check_diffusers_version()
    from diffusers.models import modeling_utils
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = VQ4DiTQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = VQ4DiTConfig
    if not hasattr(modeling_utils._get_model_file, "vq4dit_original"):
        modeling_utils._get_model_file = _with_packed_name(modeling_utils._get_model_file)


def register_on_import() -> bool:
    """:func:`register`, or a warning saying why not (``import vq4dit`` must work without it)."""
    try:
        register()
    except UnsupportedDiffusersError as err:
        warnings.warn(str(err), UserWarning, stacklevel=3)
        return False
    return True


__all__ = [
    "SUPPORTED", "UnsupportedDiffusersError", "VQ4DiTConfig", "VQ4DiTQuantizer", "check_diffusers_version",
    "push_to_hub_packed", "register", "save_pretrained_packed",
]
