"""Helpers for the typed settings dataclasses (:class:`vq4dit.VQConfig`, the engine's configs, the
Lightning adapter's groups): one declaration per setting, marked where a recipe decides its value.

A field declared with :func:`recipe_field` holds the paper's value by default (what the engine does
without a recipe); the command line starts it at None ("the recipe decides", :func:`unset`), and a
recipe (:mod:`vq4dit.recipes`) fills every None with :func:`fill` before the engine sees it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")
_RECIPE = "recipe"


def recipe_field(default: Any) -> Any:
    """A dataclass field whose value a recipe decides when left None (``default``: the paper's)."""
    return dataclasses.field(default=default, metadata={_RECIPE: True})


def recipe_fields(cls_or_obj: Any) -> list[str]:
    """Names of the fields that a recipe decides (declared with :func:`recipe_field`)."""
    return [f.name for f in dataclasses.fields(cls_or_obj) if f.metadata.get(_RECIPE)]


def unset(cls: type[T]) -> T:
    """The command line's starting point of ``cls``: recipe fields None (the recipe decides), the
    others at their declared defaults, before ``__post_init__`` derives anything from them (a
    ``VQConfig``'s None codebook_size stays None, so ``--model.vq.bits 3`` still picks k=64). Only a
    parser default: building it with its values (``dataclasses.replace``) validates and derives."""
    template = object.__new__(cls)
    for f in dataclasses.fields(cls):
        object.__setattr__(template, f.name, None if f.metadata.get(_RECIPE) else f.default)
    return template


def fill(settings: T, **values: Any) -> T:
    """``settings`` with every recipe field that is None set to its value in ``values`` (an unknown
    name raises ``TypeError``, so a renamed setting cannot silently drop out of a recipe)."""
    unknown = sorted(set(values) - set(recipe_fields(settings)))
    if unknown:
        raise TypeError(f"{type(settings).__name__} has no recipe field {unknown}")
    return dataclasses.replace(settings, **{k: v for k, v in values.items() if getattr(settings, k) is None})


def fill_defaults(settings: T) -> T:
    """``settings`` with every recipe field that is None set to its declared default (the paper's)."""
    return fill(settings, **{f.name: f.default for f in dataclasses.fields(settings) if f.metadata.get(_RECIPE)})


def unresolved(settings: Any) -> list[str]:
    """Recipe fields of ``settings`` still None (the engine refuses them)."""
    return [name for name in recipe_fields(settings) if getattr(settings, name) is None]


def require_resolved(settings: Any) -> None:
    """``ValueError`` naming the recipe fields of ``settings`` left None (no recipe was applied)."""
    missing = unresolved(settings)
    if missing:
        raise ValueError(f"{type(settings).__name__}: {missing} left unset (None): apply a recipe first "
                         "(vq4dit.recipes.apply_recipe) or set them")
