"""Sweep specs: read the YAML, expand it into configs, identify and validate each config."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from ..errors import KVLabError
from ..paths import REPO_ROOT

_SPEC_KEYS = ("name", "notebook", "parameters", "grid", "zip", "description", "timeout")
INJECTED = ("store_path", "device")


def load_spec(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a sweep spec (YAML file or dict) and check its shape. Adds `_base` (folder of the file)."""
    if isinstance(path_or_dict, Mapping):
        spec = copy.deepcopy(dict(path_or_dict))
        spec.setdefault("_base", str(Path.cwd()))
        spec.setdefault("name", "sweep")
    else:
        path = Path(path_or_dict).expanduser()
        if not path.is_file():
            raise KVLabError(f"sweep spec '{path}' does not exist")
        import yaml

        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise KVLabError(f"sweep spec '{path}' is not valid YAML: {e}") from None
        if not isinstance(spec, dict):
            raise KVLabError(f"sweep spec '{path}' must be a mapping with notebook/parameters/grid/zip")
        spec["_base"] = str(path.resolve().parent)
        spec.setdefault("name", path.stem)
    unknown = [k for k in spec if k not in _SPEC_KEYS and k != "_base"]
    if unknown:
        raise KVLabError(f"sweep spec: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_SPEC_KEYS)}")
    if not spec.get("notebook"):
        raise KVLabError("sweep spec: 'notebook' is required (e.g. notebook: notebooks/02_sensitivity.ipynb)")
    name = str(spec["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise KVLabError(f"sweep spec: name {name!r} must be letters, digits, '.', '_' or '-' (it names runs/<name>/)")
    spec["name"] = name
    for key in ("parameters", "grid"):
        if spec.get(key) is None:
            spec[key] = {}
        if not isinstance(spec[key], dict):
            raise KVLabError(f"sweep spec: '{key}' must be a mapping of parameter -> value, got {spec[key]!r}")
    z = spec.get("zip")
    spec["zip"] = [] if z is None else [z] if isinstance(z, dict) else z
    if not isinstance(spec["zip"], list) or not all(isinstance(g, dict) for g in spec["zip"]):
        raise KVLabError("sweep spec: 'zip' must be a mapping of parameter -> list (or a list of such mappings)")
    return spec


def expand(spec: str | os.PathLike | Mapping[str, Any]) -> list[dict[str, Any]]:
    """All configs (notebook parameter dicts) of a sweep: `parameters` + product(`grid`) x zipped `zip` rows."""
    spec = load_spec(spec)
    seen: dict[str, str] = {k: "parameters" for k in spec["parameters"]}

    def claim(k: str, where: str) -> None:
        if k in seen:
            raise KVLabError(f"sweep spec: parameter '{k}' is set in both '{seen[k]}' and '{where}'")
        seen[k] = where

    axes: list[list[dict[str, Any]]] = []
    for k, values in spec["grid"].items():
        claim(k, "grid")
        if not isinstance(values, list):
            raise KVLabError(f"sweep spec: grid.{k} must be a list, got {values!r} (fixed values go under 'parameters')")
        if not values:
            raise KVLabError(f"sweep spec: grid.{k} is an empty list (the sweep would have no configs)")
        axes.append([{k: v} for v in values])
    for i, group in enumerate(spec["zip"]):
        lengths = {}
        for k, values in group.items():
            claim(k, "zip")
            if not isinstance(values, list):
                raise KVLabError(f"sweep spec: zip.{k} must be a list, got {values!r}")
            lengths[k] = len(values)
        if len(set(lengths.values())) > 1:
            raise KVLabError("sweep spec: zip lists must have the same length, got "
                             + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        if group and not next(iter(lengths.values())):
            raise KVLabError(f"sweep spec: zip group {i} has empty lists")
        if group:
            axes.append([dict(zip(group, row)) for row in zip(*group.values())])
    configs = []
    for combo in itertools.product(*axes):
        cfg = dict(spec["parameters"])
        for part in combo:
            cfg.update(part)
        configs.append(cfg)
    return configs


def _canonical(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise KVLabError(f"sweep parameters must be plain YAML/JSON values: {e}") from None


def notebook_id(notebook: Path) -> str:
    try:
        return notebook.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return notebook.resolve().as_posix()


def config_hash(notebook: str | os.PathLike, params: Mapping[str, Any]) -> str:
    """sha256 of (notebook path relative to the repo, parameters): a config's identity in `runs`."""
    return hashlib.sha256(_canonical({"notebook": notebook_id(Path(notebook)),
                                      "parameters": dict(params)}).encode()).hexdigest()


def find_notebook(spec: Mapping[str, Any]) -> Path:
    raw = Path(str(spec["notebook"])).expanduser()
    if raw.is_absolute():
        tried = [raw]
    else:
        tried = list(dict.fromkeys([Path(spec["_base"]) / raw, REPO_ROOT / raw, Path.cwd() / raw]))
    for p in tried:
        if p.is_file():
            return p.resolve()
    raise KVLabError(f"sweep '{spec['name']}': notebook '{spec['notebook']}' not found (looked in "
                     + ", ".join(str(p) for p in tried) + ")")


def _parameters_sources(notebook: str | os.PathLike) -> list[str]:
    """Sources of the notebook's code cells tagged `parameters` (an error naming the fix if none)."""
    import nbformat

    path = Path(notebook)
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as e:  # noqa: BLE001 - nbformat raises several kinds
        raise KVLabError(f"notebook '{path}' cannot be read: {e}") from None
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise KVLabError(f"notebook '{path}' has no code cell tagged 'parameters' (add the tag in Jupyter: "
                         f"View > Cell Toolbar > Tags), so its parameters cannot be checked")
    return [c.source for c in cells]


def notebook_parameters(notebook: str | os.PathLike) -> list[str]:
    """Names assigned in the notebook's cell tagged `parameters` (what papermill may set)."""
    from ..notebook import parameter_types

    names: list[str] = []
    for src in _parameters_sources(notebook):
        try:
            names.extend(parameter_types(src))
        except KVLabError as e:
            raise KVLabError(f"notebook '{notebook}': {e}") from None
    return list(dict.fromkeys(names))


def notebook_parameter_types(notebook: str | os.PathLike) -> dict[str, Any]:
    """Expected type of each parameter, inferred from its default in the `parameters` cell
    (`kvlab.notebook.parameter_types`, the same inference the notebooks' own check uses)."""
    from ..notebook import parameter_types

    types: dict[str, Any] = {}
    for src in _parameters_sources(notebook):
        try:
            types.update(parameter_types(src))
        except KVLabError as e:
            raise KVLabError(f"notebook '{notebook}': {e}") from None
    return types


def _method_specs(params: Mapping[str, Any]) -> list[str]:
    specs = []
    for key in ("method", "methods"):
        if key not in params or params[key] is None:
            continue
        v = params[key]
        specs.extend(v if isinstance(v, (list, tuple)) else [v])
    return [s for s in specs if s is not None]


def _check_types(spec: Mapping[str, Any], configs: list[dict[str, Any]], types: Mapping[str, Any]) -> None:
    """Every value must fit the type of its parameter's default in the notebook (int, float, list, ...)."""
    from ..notebook import describe_type, type_mismatch

    for i, cfg in enumerate(configs):
        for k, v in cfg.items():
            if k in types and type_mismatch(v, types[k]):
                raise KVLabError(
                    f"sweep '{spec['name']}': config #{i} {cfg}: parameter '{k}' must be {describe_type(types[k])} "
                    f"(the type of its default in the parameters cell of {spec['notebook']}), got "
                    f"{type(v).__name__} {v!r}; fix the value in the sweep spec")


def validate(spec: Mapping[str, Any], configs: list[dict[str, Any]], types: Mapping[str, Any],
              check_methods: bool) -> None:
    """Check names and types of every config (cheap); with `check_methods`, parse every method spec too."""
    allowed = list(types)
    for i, cfg in enumerate(configs):
        bad = [k for k in cfg if k not in types]
        if bad:
            raise KVLabError(
                f"sweep '{spec['name']}': parameter{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} "
                f"of config #{i} {cfg} {'are' if len(bad) > 1 else 'is'} not in the parameters cell of "
                f"{spec['notebook']}; allowed: {', '.join(allowed)}")
    _check_types(spec, configs, types)
    if not check_methods:
        return
    seen: dict[str, int] = {}
    for i, cfg in enumerate(configs):
        for s in _method_specs(cfg):
            if not isinstance(s, str):
                raise KVLabError(f"sweep '{spec['name']}': config #{i} {cfg}: method spec must be a string, got {s!r}")
            seen.setdefault(s, i)
    if not seen:
        return
    from ..quant import parse  # lazy: imports torch

    for s, i in seen.items():
        try:
            parse(s)
        except KVLabError as e:
            raise KVLabError(f"sweep '{spec['name']}': config #{i} {configs[i]}: invalid method spec {s!r}: {e}") from None
