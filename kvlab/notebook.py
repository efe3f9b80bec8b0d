"""Helpers for parameterized notebooks: reject a wrong parameter name or type in the first cell."""
from __future__ import annotations

from typing import Any

from .errors import KVLabError


def names_before() -> set[str]:
    """Call in the cell before the `parameters` cell: the names that exist before any parameter."""
    import __main__

    return set(vars(__main__))


def check_parameters(namespace: dict, before: set[str], **expected: type | tuple) -> None:
    """Raise naming the parameter when papermill injected an unknown name or a value of the wrong type.

    `expected` maps each declared parameter to its type (or tuple of types); `None` is allowed for
    parameters whose default is None (pass `(type(None), int)`).
    """
    injected = {k for k in namespace if k not in before and not k.startswith("_")}
    unknown = sorted(k for k in injected - set(expected) if not callable(namespace[k]) and not _is_module(namespace[k]))
    if unknown:
        raise KVLabError(f"unknown notebook parameter(s) {unknown}; this notebook takes: {', '.join(expected)}")
    for name, typ in expected.items():
        if name not in namespace:
            raise KVLabError(f"parameter '{name}' is missing from the parameters cell")
        value = namespace[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise KVLabError(f"parameter '{name}' must be {want}, got {type(value).__name__} {value!r}")


def _is_module(x: Any) -> bool:
    import types

    return isinstance(x, types.ModuleType)
