"""`run_sweep`: expand and validate a sweep, skip configs already done, run the rest, record each one."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import KVLabError
from ..paths import REPO_ROOT
from ..threads import configured_threads
from .local import run_local
from .ray_backend import run_ray
from .spec import (config_hash, expand, find_notebook, load_spec, notebook_id, notebook_parameter_types,
                   validate)


def _parse_devices(devices: str | Iterable[str] | None) -> list[str] | None:
    if devices is None:
        return None
    items = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices)]
    items = [d for d in items if d]
    if not items:
        return None
    for d in items:
        if not re.fullmatch(r"(cpu|cuda(:\d+)?|mps(:\d+)?|xpu(:\d+)?)", d):
            raise KVLabError(f"--devices: {d!r} is not a device (e.g. cuda:0,cuda:1 or cpu)")
    return items


def run_sweep(path_or_dict: str | os.PathLike | Mapping[str, Any], workers: int = 1,
              devices: str | Iterable[str] | None = None, backend: str = "local",
              store: Any = None, dry_run: bool = False, *, runs_dir: str | os.PathLike | None = None,
              force: bool = False, progress: bool = True, verbose: bool = True,
              timeout: float | None = None) -> dict[str, Any]:
    """Expand, validate, skip what is done, run the rest; returns a summary dict.

    Args:
        path_or_dict: a sweep YAML file or the same structure as a dict.
        workers: CPU worker processes (local backend, ignored when `devices` is given).
        devices: "cuda:0,cuda:1" or a list: one worker per device, each config gets a device
            (passed as parameter `device` if the notebook declares it).
        backend: "local" or "ray".
        store: a Store, a path, or None for the default store.
        dry_run: validate and report what would run, run nothing.
        runs_dir: where executed notebooks go (default `<repo>/runs`); files are `<name>/<hash>.ipynb`.
        force: run configs even if they already ran ok.
        timeout: seconds one notebook cell may run before the config is recorded as failed
            (default: the spec's `timeout`, else no limit).

    Summary keys: name, notebook, store, configs, ran (executed, failed included), ok, failed,
    skipped, seconds, failures (list of {hash, params, error, output}), planned (dry run).
    """
    from ..store import Store

    t0 = time.perf_counter()
    if backend not in ("local", "ray"):
        raise KVLabError(f"backend must be 'local' or 'ray', got {backend!r}")
    if int(workers) < 1:
        raise KVLabError(f"workers must be >= 1, got {workers}")
    devs = _parse_devices(devices)
    spec = load_spec(path_or_dict)
    timeout = timeout if timeout is not None else spec.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise KVLabError(f"timeout must be a positive number of seconds, got {timeout!r}")
    configs = expand(spec)
    notebook = find_notebook(spec)
    types = notebook_parameter_types(notebook)
    allowed = list(types)
    validate(spec, configs, types, check_methods=False)   # cheap checks first (names, types), every config

    st = store if isinstance(store, Store) else Store(store, readonly=dry_run)
    hashes = [config_hash(notebook, c) for c in configs]
    unique: dict[str, dict[str, Any]] = {}
    for h, c in zip(hashes, configs):
        unique.setdefault(h, c)
    done = set() if force else st.runs_done(unique)
    todo = [(h, c) for h, c in unique.items() if h not in done]
    if todo or dry_run:
        validate(spec, configs, types, check_methods=True)

    out_root = Path(runs_dir).expanduser() if runs_dir is not None else REPO_ROOT / "runs"
    out_dir = out_root / spec["name"]
    summary: dict[str, Any] = {
        "name": spec["name"], "notebook": str(notebook), "store": str(st.path), "configs": len(unique),
        "ran": 0, "ok": 0, "failed": 0, "skipped": len(unique) - len(todo), "seconds": 0.0, "failures": [],
        "runs_dir": str(out_dir)}
    if dry_run:
        summary["planned"] = [{"hash": h, "params": c} for h, c in todo]
        summary["seconds"] = time.perf_counter() - t0
        if verbose:
            print(f"sweep {spec['name']}: {len(unique)} configs valid ({notebook.name}); "
                  f"{len(todo)} to run, {summary['skipped']} already done (dry run: nothing ran)")
            for h, c in todo:
                print(f"  {h[:12]}  {c}")
        return summary

    jobs = []
    declares_store, declares_device = "store_path" in allowed, "device" in allowed
    threads = worker_threads(len(devs) if devs else int(workers), len(todo))
    for h, c in todo:
        jobs.append({"hash": h, "params": c, "notebook": str(notebook), "output": str(out_dir / f"{h}.ipynb"),
                     "cwd": str(REPO_ROOT), "store_path": str(st.path.resolve()), "threads": threads,
                     "declares_store": declares_store, "declares_device": declares_device, "timeout": timeout})

    def record(job: dict[str, Any], res: dict[str, Any]) -> None:
        st.record_run(job["hash"], notebook_id(notebook), job["params"], res["status"], error=res["error"],
                      seconds=res["seconds"], output=res["output"], sweep=spec["name"])
        summary["ran"] += 1
        if res["status"] == "ok":
            summary["ok"] += 1
        else:
            summary["failed"] += 1
            summary["failures"].append({"hash": job["hash"], "params": job["params"], "error": res["error"],
                                        "output": res["output"]})

    if jobs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"sweep {spec['name']}", unit="config", disable=not progress,
                   file=sys.stderr)
        try:
            if backend == "ray":
                run_ray(jobs, notebook, devs, st, record, bar)
            else:
                run_local(jobs, workers, devs, record, bar)
        except KeyboardInterrupt:
            bar.close()
            print(f"sweep {spec['name']}: interrupted after {summary['ran']} of {len(jobs)} configs "
                  f"({summary['failed']} failed); what finished is recorded, run the same sweep again to continue",
                  file=sys.stderr)
            raise
        finally:
            bar.close()

    summary["seconds"] = time.perf_counter() - t0
    if verbose:
        print(f"sweep {spec['name']}: {len(unique)} configs: ran {summary['ran']} ({summary['ok']} ok, "
              f"{summary['failed']} failed), skipped {summary['skipped']}, {summary['seconds']:.1f} s")
        for f in summary["failures"]:
            last = (f["error"] or "").strip().splitlines()[:1]
            print(f"  FAILED {f['hash'][:12]} {f['params']}: {last[0] if last else ''}\n         see {f['output']}")
    return summary




def worker_threads(workers: int, n_jobs: int) -> int:
    """Torch threads per worker kernel: `$KVLAB_THREADS`, else the cores shared among the workers that run."""
    n = max(1, min(workers, n_jobs))
    return configured_threads(max(1, (os.cpu_count() or 1) // n))
