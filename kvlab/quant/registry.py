"""Name -> method class, presets, and spec-string parsing (`kivi:bits=2,group=32,residual=128`)."""
from __future__ import annotations

import typing
import warnings

from ..errors import KVLabError
from .base import Method, config_fields

METHODS: dict[str, type[Method]] = {}
PRESETS: dict[str, str] = {}
# names (methods and presets) whose optional dependency is missing here -> the cause and the fix
UNAVAILABLE: dict[str, str] = {}


def _qualified(cls: type) -> str:
    """`module.QualName` of a class, how registry messages name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_builtin(cls: type) -> bool:
    """Whether a method class ships with kvlab (defined in a `kvlab.` module)."""
    return cls.__module__ == "kvlab" or cls.__module__.startswith("kvlab.")


def _replaces(old: type[Method], new: type[Method]) -> bool:
    """Whether registering `new` under `old`'s name is a re-definition (replace) rather than a clash.

    A re-definition: the same qualified name (a re-run notebook cell, a reloaded module), or a class
    defined interactively (`__main__`) replacing a method that is not one of kvlab's own.
    """
    return _qualified(old) == _qualified(new) or (new.__module__ == "__main__" and not _is_builtin(old))


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method reachable by its `name` in spec strings.

    Re-running a notebook cell that defines a registered method replaces the earlier definition
    with a warning; a different class under a name already taken (a built-in kvlab method's name,
    or another module's method) is an error naming both classes.
    """
    old = METHODS.get(cls.name)
    if old is not None and old is not cls:
        if not _replaces(old, cls):
            owner = "kvlab's built-in method" if _is_builtin(old) else "the method"
            raise KVLabError(f"method name '{cls.name}' is already registered by {owner} {_qualified(old)}; "
                             f"{_qualified(cls)} cannot take it: give it another `name = \"...\"`")
        warnings.warn(f"method '{cls.name}': replacing the registered {_qualified(old)} with the new definition "
                      f"{_qualified(cls)} (re-defined, e.g. a re-run notebook cell)", stacklevel=2)
    METHODS[cls.name] = cls
    return cls


def preset(name: str, spec: str) -> None:
    """Register a named preset (a paper's headline setting) that expands to a spec string."""
    PRESETS[name] = spec


def unavailable(names, reason: str) -> None:
    """Register method/preset names that need an optional dependency this environment lacks: `parse`
    then raises a KVLabError with `reason` (the cause and the fix) instead of "unknown method"."""
    for n in names:
        UNAVAILABLE[n] = reason


def available() -> dict[str, list[str]]:
    _import_methods()
    return {"methods": sorted(METHODS), "presets": sorted(PRESETS)}


def representatives() -> list[str]:
    """One name per registered method: its alphabetically first preset, or the method's own name when
    it has none (what the contract tests run on every tiny family)."""
    available()
    chosen: dict[str, str] = {}
    for name in sorted(PRESETS):
        chosen.setdefault(type(parse(name)).name, name)
    for name in sorted(METHODS):
        chosen.setdefault(name, name)
    return sorted(chosen.values())


def parse(spec: str | Method) -> Method:
    """Build a method from a spec string or preset name; every error names the field and the fix."""
    if isinstance(spec, Method):
        return spec
    _import_methods()
    spec = spec.strip()
    if spec in PRESETS:
        spec = PRESETS[spec]
    name, _, args = spec.partition(":")
    if name not in METHODS and name in UNAVAILABLE:
        raise KVLabError(f"'{spec}': {UNAVAILABLE[name]}")
    if name not in METHODS:
        raise KVLabError(f"unknown method '{name}' in spec '{spec}'. Methods: {', '.join(sorted(METHODS))}; "
                         f"presets: {', '.join(sorted(PRESETS))}")
    cls = METHODS[name]
    fields = {f.name: f for f in config_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise KVLabError(f"{name}: expected 'field=value' in spec, got '{item}'")
        if key not in fields:
            raise KVLabError(f"{name}: unknown field '{key}'. Fields: {', '.join(fields)}")
        kwargs[key] = _convert(name, key, raw.strip(), hints.get(key, str))
    return cls(**kwargs)


def _convert(method: str, key: str, raw: str, hint):
    base = typing.get_origin(hint)
    options = typing.get_args(hint) if base is typing.Union or str(base) == "<class 'types.UnionType'>" else (hint,)
    if base is typing.Literal:
        options = (type(typing.get_args(hint)[0]),)
    if raw.lower() in ("none", "null") and type(None) in options:
        return None
    for t in options:
        try:
            if t is bool:
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                continue
            if t in (int, float, str):
                return t(raw)
        except ValueError:
            continue
    raise KVLabError(f"{method}: field '{key}' cannot take the value '{raw}' (expected {hint})")


def _import_methods() -> None:
    from . import methods  # noqa: F401  (registers every method module)
