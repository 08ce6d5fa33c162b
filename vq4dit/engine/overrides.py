"""Per-layer settings (``overrides``: glob pattern -> VQConfig fields): checked for content before
any work, and merged with a bit allocation field by field.

Policy for a user's explicit ``codebook_size`` under bit allocation: refused in one line. The
allocation chooses every selected layer's ``k`` under one bit budget; keeping a user's ``k`` out of
it would change what the budget means, and silently overriding either choice is what issue 20
found. ``subvector_dim`` and every other field are the user's and stay (the allocation measures
its options with them).
"""

from __future__ import annotations

import fnmatch
import types as types_module
import typing
from collections.abc import Iterable, Mapping
from dataclasses import fields

from torch import nn

from ..vq_config import VQConfig
from .allocation import allocation_options

__all__ = ["check_overrides", "highest_bits_per_weight", "merge_overrides", "refuse_allocated_fields"]

ALLOCATED_FIELDS = ("codebook_size",)  # what the bit allocation chooses per layer


def _field_types() -> dict[str, object]:
    """Each VQConfig field's type, without the ``| None`` of fields a recipe may fill."""
    hints = typing.get_type_hints(VQConfig)
    types = {}
    for f in fields(VQConfig):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types_module.UnionType):
            kept = [arg for arg in typing.get_args(kind) if arg is not type(None)]
            kind = kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]
        types[f.name] = kind
    return types


def _fits(value: object, kind: object) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(kind) is typing.Literal:
        return value in typing.get_args(kind)
    return isinstance(value, kind) if isinstance(kind, type) else True


def check_overrides(overrides: Mapping[str, Mapping[str, object]] | None) -> None:
    """Raise one-line ``ValueError`` naming the pattern and field of an override that is not a
    dict of known :class:`VQConfig` fields with values of the field's type."""
    types = _field_types()
    for pattern, settings in (overrides or {}).items():
        if not isinstance(pattern, str) or not isinstance(settings, Mapping):
            raise ValueError(f"overrides[{pattern!r}] must map a layer name pattern to a dict of VQ settings, "
                             f"got {settings!r}")
        for name, value in settings.items():
            if name not in types:
                raise ValueError(f"overrides[{pattern!r}] has an unknown field {name!r}; known: {', '.join(types)}")
            kind = types[name]
            if not _fits(value, kind):
                expected = " or ".join(map(repr, typing.get_args(kind))) if typing.get_origin(kind) is typing.Literal \
                    else getattr(kind, "__name__", str(kind))
                raise ValueError(f"overrides[{pattern!r}].{name}={value!r} must be {expected}")


def refuse_allocated_fields(overrides: Mapping[str, Mapping[str, object]] | None, names: Iterable[str]) -> None:
    """Under bit allocation: raise one-line ``ValueError`` when an override sets a field the
    allocation chooses (``codebook_size``) for one of the layers ``names``."""
    names = list(names)
    for pattern, settings in (overrides or {}).items():
        chosen = [field for field in ALLOCATED_FIELDS if field in settings]
        hit = next((name for name in names if fnmatch.fnmatchcase(name, pattern)), None)
        if chosen and hit is not None:
            raise ValueError(f"overrides[{pattern!r}] sets {chosen[0]} of {hit}, which bit allocation chooses: "
                             f"drop it, or turn bit allocation off (--model.allocation.enabled false)")


def merge_overrides(
    overrides: Mapping[str, Mapping[str, object]] | None, allocation: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    """The user's ``overrides`` with a bit ``allocation`` (exact layer name -> fields) merged field by
    field: an exact-name entry in both keeps the user's fields and takes the allocation's; other
    allocation entries come after the user's patterns (``select_layers`` applies every matching
    pattern in order, so they win on the fields they set and nothing else)."""
    merged = {pattern: dict(settings) for pattern, settings in (overrides or {}).items()}
    for name, chosen in allocation.items():
        merged[name] = {**merged.get(name, {}), **dict(chosen)}
    return merged


def highest_bits_per_weight(selected: Iterable[tuple[str, nn.Linear, VQConfig]], span: int = 2) -> float:
    """The most all-in bits per weight any allocation of ``selected`` layers can spend (every layer
    at its largest option, ``k * 2^span`` where the layer allows it): a budget above is unreachable."""
    total = bits = 0.0
    for _, linear, config in selected:
        options = allocation_options(config, linear.out_features, linear.in_features, span)
        weights = linear.out_features * linear.in_features
        bits += max(o.stored_bits_per_weight(linear.out_features, linear.in_features) for o in options) * weights
        total += weights
    return bits / total
