"""Type checks for configuration knobs against their annotations.

gin passes whatever Python literal a binding holds, so a quoted number, a float for a count or
None for a budget would otherwise fail deep inside a phase, after compiling, with a message
that names no knob. `check_fields` (for the config dataclasses, from `__post_init__`) and
`checked` (for the factory functions gin calls) fail at once instead, naming the knob.

The annotations here are simple: int, float, str, bool, None, unions of them, `tuple[X, ...]`,
`dict[K, V]`, classes and callables. Counts accept any integer (numpy's too) but not a bool;
a float accepts an integer; a tuple accepts a list (gin writes either). Forms outside these
pass unchecked.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy as np


def matches(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type `hint` (the rules in the module doc)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint is tuple or origin is tuple:
        return isinstance(value, (tuple, list)) and _items_match(value, args)
    if hint is dict or origin is dict:
        key, item = args or (Any, Any)
        return isinstance(value, dict) and all(
            matches(k, key) and matches(v, item) for k, v in value.items()
        )
    if origin is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _items_match(items: tuple | list, args: tuple) -> bool:
    if not args:
        return True
    if len(args) == 2 and args[1] is Ellipsis:
        return all(matches(item, args[0]) for item in items)
    return len(items) == len(args) and all(map(matches, items, args))


def check(knob: str, value: Any, hint: Any) -> None:
    """ValueError naming `knob` unless `value` matches `hint`."""
    if not matches(value, hint):
        wanted = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        raise ValueError(f"{knob} must be {wanted}, got {value!r} ({type(value).__name__})")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every string annotation: once per class


def check_fields(instance: Any, prefix: str) -> None:
    """Every field of a dataclass instance against its annotation, as `prefix.field`."""
    hints = _field_hints(type(instance))
    for field in dataclasses.fields(instance):
        check(f"{prefix}.{field.name}", getattr(instance, field.name), hints[field.name])


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` checking the arguments it is called with against its annotations, as
    `fn_name.argument` (the name gin binds them by)."""

    @functools.cache
    def hints() -> dict[str, Any]:  # resolved at the first call: names may be defined later
        return typing.get_type_hints(fn)

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if name in hints():
                check(f"{fn.__name__}.{name}", value, hints()[name])
        return fn(*args, **kwargs)

    return wrapper


def named_function(
    name: str, registry: collections.abc.Mapping[str, Callable[..., Any]], what: str
) -> Callable[..., Any]:
    """`registry[name]`, or the function `module:function` names (the module importable on
    every host); ValueError naming `what` it was for, and the valid names, otherwise."""
    if ":" in name:
        return _imported_function(name, what)
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} {name!r}; valid: {valid}, or module:function") from None


def _imported_function(name: str, what: str) -> Callable[..., Any]:
    module_name, _, attribute = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import {what} {name!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{what} {name!r} is a {type(fn).__name__}, not a function")
    return fn
