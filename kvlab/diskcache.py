"""On-disk cache of computed tensors: calibration results, fp reference logits and task references.

`cached(kind, key_parts, compute)` returns `compute()`'s dict of tensors, stored under
`kvlab.paths.cache_dir(*kind.split("/"))` (e.g. "reference", "calibration/kvquant") in a file named
by the sha256 of a canonical JSON of `key_parts` (model fingerprint, data, method spec, ...). Writes
are atomic (temporary file + `os.replace`), so concurrent sweep workers never read half a file; a
file that cannot be read (truncated, corrupt, wrong format) is recomputed and overwritten.
A cache folder that cannot be written (read-only mount, no permission, full disk) does not lose the
computation: the tensors are returned and kept in memory for this process (up to `MEMORY_BUDGET`
bytes), with a one-line warning; files already in a read-only cache are read as usual.
`model_fingerprint(model)` identifies a model by name, config and weights, never by where it sits on
disk (a moved or shared cache hits its own files); it is computed once per model object and
recomputed only after a parameter changes in place (torch's version counters).
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import KVLabError
from .paths import CacheNotWritable, atomic_write, cache_dir, warn_not_writable

FORMAT_VERSION = 1
MEMORY_BUDGET = 2 << 30   # bytes of results kept in memory when the cache folder is not writable
# config entries that say where a model was loaded from, not what it is
_LOCATION_KEYS = ("_name_or_path", "_commit_hash")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace); tensors and other objects become strings."""
    def default(o):
        if torch.is_tensor(o):
            return tensor_digest(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        if isinstance(o, Path):
            return str(o)
        return repr(o)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def cache_key(key_parts: dict) -> str:
    """sha256 hex digest of the canonical JSON of `key_parts` (plus the file format version)."""
    return hashlib.sha256(canonical_json({"_format": FORMAT_VERSION, **key_parts}).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (e.g. the calibration input ids)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model) -> dict:
    """Identity of a model for cache keys: its portable name, a hash of its config and of its weights.

    The weights part is the sha256 of every parameter's (float64) sum and sum of squares, so two
    random-initialised models with the same config and different seeds do not share a cache entry.
    Nothing in it depends on where the model sits on disk: a local path is reduced to its folder
    name and the config's `_name_or_path` is left out of its hash.
    """
    from .models import LoadedModel

    name = ""
    if isinstance(model, LoadedModel):
        name = model.model_id
        model = model.model
    name = portable_name(name or str(getattr(model, "name_or_path", "") or ""))
    return {"name": name, "config": _config_digest(getattr(model, "config", None)), "weights": _weights_digest(model)}


def portable_name(name: str) -> str:
    """A model name that does not depend on the file system: a local path becomes its last folder name.

    Hub ids ("org/model") and kvlab names are kept; "/abs/path/smollm2-135m", "./models/x" and
    "~/m" (or any name that exists as a local path) keep only the last component.
    """
    if not name:
        return name
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name
    try:
        looks_local = looks_local or Path(name).expanduser().exists()
    except OSError:
        pass
    if not looks_local:
        return name
    return Path(name.rstrip("/\\").replace("\\", "/")).name or name


def _config_digest(config: Any) -> str:
    """sha256 of a model config's full JSON without the entries naming where it was loaded from."""
    if config is None or not hasattr(config, "to_json_string"):
        return hashlib.sha256(repr(config).encode()).hexdigest()
    try:
        cfg = config.to_json_string(use_diff=False)
    except TypeError:
        cfg = config.to_json_string()
    try:
        d = json.loads(cfg)
    except ValueError:
        return hashlib.sha256(cfg.encode()).hexdigest()
    if isinstance(d, dict):
        for k in _LOCATION_KEYS:
            d.pop(k, None)
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()


_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's float64 sum and sum of squares, memoised per model object.

    The memo is checked against each parameter's storage pointer, shape and in-place version counter,
    so loading new weights or editing one in place (`p.add_(...)`, `load_state_dict`) recomputes it
    while repeated calibrations of an unchanged model read no weights at all.
    """
    params = list(model.parameters())
    state = tuple((p.data_ptr(), tuple(p.shape), p._version) for p in params)
    try:
        memo = _WEIGHTS.get(model)
    except TypeError:          # not weak-referenceable: compute every time
        memo = None
    if memo is not None and memo[0] == state:
        return memo[1]
    with torch.no_grad():
        sums = [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in params]
        digest = tensor_digest(torch.stack(sums).cpu()) if sums else ""
    try:
        _WEIGHTS[model] = (state, digest)
    except TypeError:
        pass
    return digest


def cache_path(kind: str, key_parts: dict) -> Path:
    """The file that holds (or will hold) the tensors of `key_parts` in the cache folder `kind`."""
    parts = kind.split("/")
    if not kind or any(not p or p.startswith(".") or "\\" in p for p in parts):
        raise KVLabError(f"cache kind must be plain folder names joined by '/', got {kind!r}")
    return cache_dir(*parts) / f"{cache_key(key_parts)}.pt"


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (truncated / corrupt / foreign file: recompute)
        return None
    if not isinstance(data, dict) or data.get("_kvlab_format") != FORMAT_VERSION:
        return None
    tensors = data.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in tensors.items()):
        return None
    return tensors


_MEMORY: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes held by a dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _remember(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Keep results that could not be written in memory (oldest dropped beyond `MEMORY_BUDGET` bytes)."""
    _MEMORY[str(path)] = tensors
    _MEMORY.move_to_end(str(path))
    while len(_MEMORY) > 1 and sum(_nbytes(v) for v in _MEMORY.values()) > MEMORY_BUDGET:
        _MEMORY.popitem(last=False)


def _save(path: Path, kind: str, key_parts: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the payload of `tensors` atomically to `path`; `CacheNotWritable` when the folder is not writable."""
    payload = {"_kvlab_format": FORMAT_VERSION, "key": canonical_json(key_parts), "tensors": tensors}
    atomic_write(path, lambda fh: torch.save(payload, fh), f"the '{kind}' cache")


def cached(kind: str, key_parts: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return the tensors cached for `key_parts` in folder `kind`, computing and storing them on a miss.

    The tensors come back on the CPU (callers move them to the model's device once). When the cache
    folder cannot be written the computed tensors are returned anyway and kept in memory for this
    process, with a one-line warning (once per folder).
    """
    path = cache_path(kind, key_parts)
    if str(path) in _MEMORY:           # computed earlier in this process, the folder not writable
        _MEMORY.move_to_end(str(path))
        return {k: v.clone() for k, v in _MEMORY[str(path)].items()}
    if path.exists():
        hit = _load(path)
        if hit is not None:
            return hit
    result = compute()
    if not isinstance(result, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in result.items()):
        raise KVLabError(f"cache '{kind}': compute() must return a dict[str, Tensor]")
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.items()}
    try:
        _save(path, kind, key_parts, tensors)
    except CacheNotWritable as err:
        warn_not_writable(err, f"'{kind}' results are computed and kept in memory for this process only")
        _remember(path, tensors)
    return tensors
