"""Check a config dataclass's values against its field annotations, so a wrong type fails at once, naming the field.

Configs come from JSON (adapter_config.json), YAML (job files) and Python. Without a check, "use_rslora": "false"
is a truthy string that turns rsLoRA on, and YAML 1.1 reads ``lr: 1e-3`` as the string "1e-3". Numbers written as
text become numbers; anything else that does not fit is a ValueError naming the field, its value and its type.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Mapping
from typing import Any, Union

_NO = object()  # "does not fit"
INFINITY_OK = "infinity_ok"  # a dataclass's ClassVar naming the float fields that take infinity (max_grad_norm)
_SEQUENCES = (list, tuple, set, frozenset, range)


class FieldTypeError(TypeError, ValueError):
    """A config value of the wrong type (both a TypeError and a ValueError: callers catch either)."""


def check_types(obj: Any) -> None:
    """Check (and where a number came as text, convert) every field of the dataclass instance ``obj``."""
    try:
        hints = typing.get_type_hints(type(obj))
    except (NameError, TypeError):  # an annotation this Python cannot resolve: nothing to check against
        return
    for field in dataclasses.fields(obj):
        hint, value = hints.get(field.name, Any), getattr(obj, field.name)
        fitted = _fit(value, hint, infinity_ok=field.name in getattr(type(obj), INFINITY_OK, ()))
        if fitted is _NO:
            raise FieldTypeError(f"{type(obj).__name__}.{field.name} = {value!r} ({type(value).__name__}) does not fit: "
                             f"it takes {_describe(hint)}{_hint_for(value, hint)}")
        if fitted is not value:
            object.__setattr__(obj, field.name, fitted)


def _fit(value: Any, hint: Any, infinity_ok: bool) -> Any:
    """``value`` (as plain Python, or its number for text where a number is wanted: YAML 1.1 reads 1e-3 and inf as
    text) if it fits ``hint``, else _NO. A float must be finite, or infinite where ``infinity_ok``; never NaN."""
    if _fits_exactly(value, hint):
        value = _plain(value)
    elif isinstance(value, str) and _wants(hint, float):
        value = _parse_number(value, ints=_wants(hint, int, exact_type=True),
                              floats=_wants(hint, float, exact_type=True))
        if value is None:
            return _NO
    else:
        return _NO
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not infinity_ok)):
        return _NO
    return value


def _plain(value: Any) -> Any:
    """``value`` with numpy numbers as Python's, ranges as lists and other mappings as dicts (what JSON writes);
    ``value`` itself where nothing changes."""
    if value is None or type(value) in (bool, str, int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (set, frozenset)):  # JSON has no sets: a sorted list, as the configs store them
        items = [_plain(v) for v in value]
        try:
            return sorted(items)
        except TypeError:  # mixed types (the field's own check then says what is wrong)
            return sorted(items, key=repr)
    if isinstance(value, (list, tuple, range)):
        items = [_plain(v) for v in value]
        if isinstance(value, range):
            return items
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, Mapping):
        items = {k: _plain(v) for k, v in value.items()}
        return value if type(value) is dict and all(items[k] is v for k, v in value.items()) else items
    return value


def _fits_exactly(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_fits_exactly(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:  # any real number (numpy's too); infinity only where the class says so (INFINITY_OK)
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint in (list, tuple):
        return isinstance(value, _SEQUENCES)
    if hint is dict:
        return isinstance(value, Mapping)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set):  # tuples, sets and ranges are taken where a list is wanted
        item = args[0] if args else Any
        return isinstance(value, _SEQUENCES) and all(_fits_exactly(v, item) for v in value)
    if origin is dict:
        key, item = args if len(args) == 2 else (Any, Any)
        return isinstance(value, Mapping) and all(_fits_exactly(k, key) and _fits_exactly(v, item)
                                                  for k, v in value.items())
    if origin is typing.Literal:
        return value in args
    return not isinstance(hint, type) or isinstance(value, hint)  # other classes: an instance of them


def _wants(hint: Any, kind: type, exact_type: bool = False) -> bool:
    """Whether ``hint`` takes a number (float or int; with ``exact_type``, ``kind`` itself)."""
    if typing.get_origin(hint) is Union:
        return any(_wants(arg, kind, exact_type) for arg in typing.get_args(hint))
    return hint is kind if exact_type else hint in (int, float)


def _parse_number(text: str, ints: bool, floats: bool) -> Union[int, float, None]:
    """The number ``text`` spells: an int where an int is taken and it is a whole-number literal ("3": a count, not
    3.0), else a float where floats are taken; None where it spells none of those."""
    text = text.strip()
    if ints and re.fullmatch(r"[+-]?[0-9]+", text):
        return int(text)  # exactly: not through a float, which rounds past 2**53
    if not floats:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None (null)"
    if origin is not None:
        inner = ", ".join(getattr(a, "__name__", str(a)) for a in args) or "values"
        return f"a {origin.__name__} of {inner}"
    if hint is float:
        return "a finite number"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _hint_for(value: Any, hint: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no") and _fits_exactly(True, hint):
        return f"; write {'true' if value.strip().lower() in ('true', 'yes') else 'false'} without quotes"
    return ""
