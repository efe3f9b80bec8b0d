"""CPU threads: one setting for tests, notebook kernels and sweep workers (`KVLAB_THREADS`).

torch's intra-op threads busy-wait (spin) at the end of every parallel region. When another process
holds a core, the spinning thread and the descheduled one wait on each other and a forward that
takes 1 s alone takes 5-10 s. Pinning the thread count to what the process really has avoids that
collapse; child processes (papermill kernels, sweep workers, Ray tasks) read the same count from
`OMP_NUM_THREADS` / `MKL_NUM_THREADS`, which `pin_threads` exports before they start.
"""
from __future__ import annotations

import os

from .errors import KVLabError

ENV = "KVLAB_THREADS"
CHILD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def configured_threads(default: int | None = None) -> int | None:
    """The thread count asked for in `$KVLAB_THREADS` (a positive integer), else `default`."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise KVLabError(f"{ENV}={raw!r} is not a positive integer thread count; set e.g. {ENV}=1, or unset it")
    return n


def pin_threads(n: int | None = None, default: int = 1) -> int:
    """Set torch's intra-op threads to `n` (else `$KVLAB_THREADS`, else `default`) in this process and
    export it to child processes through OMP_NUM_THREADS / MKL_NUM_THREADS. Returns the count."""
    import torch

    n = n if n is not None else configured_threads(default)
    if n < 1:
        raise KVLabError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    for var in CHILD_VARS:
        os.environ[var] = str(n)
    return n


def child_env(n: int | None = None, base: dict | None = None) -> dict[str, str]:
    """An environment for a worker process with its thread count pinned (`n`, else `$KVLAB_THREADS`, else 1)."""
    env = dict(os.environ if base is None else base)
    n = n if n is not None else configured_threads(1)
    for var in CHILD_VARS:
        env[var] = str(n)
    env[ENV] = str(n)
    return env
