"""The ``vq4dit`` quantization backend of diffusers: packed models load with diffusers'
``from_pretrained`` and save with ``save_pretrained`` / ``push_to_hub``, as bitsandbytes, GGUF or
torchao models do, through the quantizer hooks of ``diffusers.quantizers.base.DiffusersQuantizer``
only: no diffusers function or model method is replaced.

``import vq4dit`` calls :func:`register`, which adds :class:`VQ4DiTConfig` and
:class:`VQ4DiTQuantizer` to ``diffusers.quantizers.auto``'s ``AUTO_QUANTIZATION_CONFIG_MAPPING`` /
``AUTO_QUANTIZER_MAPPING`` under ``quant_method: vq4dit`` (diffusers has no other way to admit a
backend; both are lookup tables, nothing in them is replaced). Then::

    DiTTransformer2DModel.from_pretrained(folder_or_hub_id, torch_dtype=...)  # packed model
    DiTPipeline.from_pretrained(pipeline_folder)                               # transformer/ packed
    model.save_pretrained(folder) / pipe.save_pretrained(folder)               # writes it packed

Loading (``ModelMixin.from_pretrained`` calls the hooks in this order): ``maybe_update_loaded_keys``
reads the file's header (sizes against the file) and checksum, and gives the unpacked key set;
``_process_model_before_weight_loading`` swaps the listed ``nn.Linear`` of the meta-device skeleton
for empty ``VQLinear`` and checks the header's names and shapes against config.json;
``maybe_update_state_dict`` checks the checksum and unpacks the codes, resolves ``tensor_aliases``;
``_process_model_after_weight_loading`` ties the aliased tensors and re-applies a recorded timestep
frequency shift.

Saving: a model holding ``VQLinear`` layers carries this quantizer as ``model.hf_quantizer`` (set
by ``from_pretrained``, ``load_quantized`` and ``quantize_``: :func:`attach`). diffusers asks
``is_serializable`` before it writes anything: it records the model as it is now in the
``quantization_config`` that config.json is written from, and refuses soft, meta or non-finite
models (:class:`QuantizedCheckpointError`, nothing written). ``get_state_dict_and_metadata`` packs
the codes and drops the aliases. Stock ``save_pretrained`` writes config.json and the weights in
place, one after the other: it is not atomic, and no hook can make it so (none is given the
folder). ``vq4dit.save_pretrained`` / ``save_quantized`` are the atomic writers; a folder left
half-written by a killed stock save is refused by the loaders in one line. Only safetensors,
unsharded, one device (no multi-device ``device_map``).
"""

from __future__ import annotations

import copy
import json
import warnings
import weakref
from enum import Enum

import diffusers
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from packaging import version
from torch import nn

from ..convert import TIMESTEP_FREQ_SHIFT_KEY, apply_timestep_freq_shift
from ..quantize import QUANTIZED_HOOKS, vq_layers
from .packed import (
    CHECKSUM_KEY, QUANT_METHOD, QuantizedCheckpointError, check_header, install_vq_layers, pack_state_dict,
    quant_config_for, read_header, refuse_nonfinite, resolve_aliases, state_keys, tensor_digest, tie_tensors_,
    unpack_state_dict, validate_quant_config,
)

# [min, max): the quantizer hooks used here (maybe_update_loaded_keys, maybe_update_state_dict,
# get_state_dict_and_metadata) exist from diffusers 0.39.0; 0.42.x is the newest release.
# `make test-diffusers-range` runs the backend tests with both ends.
SUPPORTED = (version.parse("0.39"), version.parse("0.43"))
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

    def update_(self, qc: dict) -> None:
        """Take the fields of ``qc`` (a fresh :func:`quant_config_for`); a recorded card is kept."""
        card = qc.get("card", self.extra.get("card"))
        self.__init__(**qc)
        if card:
            self.extra["card"] = card

    def to_dict(self) -> dict:
        qc = {key: getattr(self, key) for key in _CONFIG_FIELDS}
        qc["quant_method"] = self.quant_method.value
        return json.loads(json.dumps({**qc, **self.extra}))  # a deep copy of JSON values

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class VQ4DiTQuantizer(DiffusersQuantizer):
    """Loads and saves pre-quantized (packed) vq4dit models; it cannot quantize on load (use
    ``vq4dit.quantize_`` and the calibration). Bound to the model it serves (a weak reference that
    follows ``copy.deepcopy`` and pickling)."""

    requires_calibration = True
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: VQ4DiTConfig, model: nn.Module | None = None, **kwargs) -> None:
        """``model``: the model to serve when saving (:func:`attach`); its config is then filled
        from it at save time. Without it (``from_pretrained``), the config is checked now."""
        super().__init__(quantization_config, **kwargs)
        self._checksum: str | None = None
        self._header: dict | None = None
        self._file = "checkpoint"
        self._model_ref = None
        self.allow_nonfinite = False  # vq4dit.save_quantized(..., allow_nonfinite=True) sets it for one save
        if model is None:
            self.qc = validate_quant_config(quantization_config.to_dict(), "quantization_config")
        else:
            self.qc = {}
            self.bind(model)

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    def bind(self, model: nn.Module) -> None:
        self._model_ref = weakref.ref(model)

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_model_ref"})
        model = self.model  # deepcopy of the model: bind the copy to the copied model
        new._model_ref = weakref.ref(memo[id(model)]) if model is not None and id(model) in memo else None
        return new

    def __getstate__(self):  # pickling the model pickles this with it: keep the binding
        return {**self.__dict__, "_model_ref": None, "_pickled_model": self.model}

    def __setstate__(self, state):
        model = state.pop("_pickled_model", None)
        self.__dict__.update(state)
        if model is not None:
            self.bind(model)

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
        self._file = str(checkpoint_files[0])
        if not self._file.endswith(".safetensors"):
            raise QuantizedCheckpointError(f"{self._file}: vq4dit models are safetensors files")
        self._header, metadata = read_header(self._file)
        self._checksum = metadata.get(CHECKSUM_KEY)
        return state_keys(loaded_keys, self.qc)

    def _process_model_before_weight_loading(self, model, **kwargs):
        install_vq_layers(model, self.qc, "quantization_config", device="meta")
        if self._header is not None:
            check_header(self._header, self.qc, model.state_dict(), self._file)
        self.bind(model)
        return model

    def maybe_update_state_dict(self, state_dict: dict) -> dict:
        if self._checksum != tensor_digest(state_dict):
            raise QuantizedCheckpointError(f"{self._file} is corrupted: its tensors do not match the stored checksum")
        refuse_nonfinite(state_dict, self._file)
        stored = {key: value.clone() for key, value in state_dict.items()}  # not views of the mapped file
        tensors = resolve_aliases(stored, self.qc.get("tensor_aliases", {}), self._file)
        return unpack_state_dict(tensors, self.qc, self.model.state_dict(), self._file)

    def _process_model_after_weight_loading(self, model, **kwargs):
        tie_tensors_(model, self.qc.get("tensor_aliases", {}))
        if TIMESTEP_FREQ_SHIFT_KEY in model.config:
            apply_timestep_freq_shift(model)
        model.register_to_config(quantization_config=self.quantization_config)  # the object save_config writes
        self.bind(model)
        return model

    # --------------------------------------------------------------------------------- saving
    def prepare_(self) -> None:
        """Record the bound model as it is now in the ``quantization_config`` (config.json is
        written from it), or refuse it with a :class:`QuantizedCheckpointError` (soft rows, meta
        device, NaN/Inf unless ``allow_nonfinite``)."""
        model = self.model
        if model is None and not self.qc.get("layers"):
            raise QuantizedCheckpointError(
                "the vq4dit quantizer of this model lost its model (pickled or copied alone); call "
                "vq4dit.io.attach(model) again before save_pretrained"
            )
        if model is not None:
            check_diffusers_version()
            self.quantization_config.update_(quant_config_for(model))
            if not self.allow_nonfinite:
                refuse_nonfinite(dict(model.state_dict()), "the model")
            self.qc = validate_quant_config(self.quantization_config.to_dict(), "quantization_config")

    @property
    def is_serializable(self) -> bool:
        """Asked by ``save_pretrained`` before it writes anything: :meth:`prepare_`."""
        self.prepare_()
        return True

    def get_state_dict_and_metadata(self, state_dict: dict, safe_serialization: bool = False):
        if not safe_serialization:
            raise QuantizedCheckpointError("vq4dit models are saved as safetensors (safe_serialization=True)")
        tensors = pack_state_dict(state_dict, self.qc)
        return tensors, {CHECKSUM_KEY: tensor_digest(tensors)}

    @property
    def is_trainable(self) -> bool:
        return False  # fine-tune with vq4dit.engine, not through diffusers' quantizer API

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model: nn.Module) -> VQ4DiTConfig | None:
    """Give a diffusers ``model`` holding ``VQLinear`` layers this backend as ``model.hf_quantizer``
    (as ``from_pretrained`` does), so that stock ``save_pretrained`` writes it packed. A config
    recorded before (e.g. its ``card``) is kept. Returns the config, or None for a model that is
    not a diffusers model or has no ``VQLinear`` (left as it is)."""
    if not callable(getattr(model, "register_to_config", None)) or not vq_layers(model):
        return None
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(quantizer, VQ4DiTQuantizer):
        quantizer.bind(model)
        return quantizer.quantization_config
    old = model.config.get("quantization_config")
    old = old.to_dict() if isinstance(old, VQ4DiTConfig) else old if isinstance(old, dict) else {}
    try:
        qc = dict(old) if old.get("layers") else quant_config_for(model)  # old: load_quantized's, checked
    except QuantizedCheckpointError:  # soft rows (being calibrated): filled at save time by is_serializable
        qc = {"quant_method": QUANT_METHOD, "codebook_size": 0, "subvector_dim": 0, "layers": {}}
    if old.get("card"):
        qc["card"] = old["card"]
    config = VQ4DiTConfig(**qc)
    model.hf_quantizer = VQ4DiTQuantizer(config, model=model, pre_quantized=True)
    model.register_to_config(quantization_config=config)
    return config


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _attach_after_quantize(model: nn.Module) -> None:
    attach(model)


if _attach_after_quantize not in QUANTIZED_HOOKS:
    QUANTIZED_HOOKS.append(_attach_after_quantize)  # quantize_ (a lower layer) calls it


def register() -> None:
    """Register the ``vq4dit`` backend with diffusers (idempotent; ``import vq4dit`` does it).

    Raises :class:`UnsupportedDiffusersError` for a diffusers outside :data:`SUPPORTED`."""
    check_diffusers_version()
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = VQ4DiTQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = VQ4DiTConfig


def register_on_import() -> bool:
    """:func:`register`, or a warning saying why not (``import vq4dit`` must work without it)."""
    try:
        register()
    except UnsupportedDiffusersError as err:
        warnings.warn(str(err), UserWarning, stacklevel=3)
        return False
    return True


__all__ = [
    "SUPPORTED", "UnsupportedDiffusersError", "VQ4DiTConfig", "VQ4DiTQuantizer", "attach", "check_diffusers_version",
    "register",
]
