"""The local backend: configs run in worker processes (or in-process for one worker)."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .execute import error_text, execute_config


def _watch_parent(parent: int) -> None:
    """Exit this worker as soon as the driver that started it is gone (e.g. SIGKILL)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)       # the kernel we started notices our exit and stops too
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="kvlab-parent-watch").start()


def _worker_main() -> None:
    """A local sweep worker: reads jobs as JSON lines on stdin, answers one JSON line each."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)               # whatever else prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    _watch_parent(os.getppid())
    import papermill  # noqa: F401  (import once, before the first job)

    for line in sys.stdin:
        if not line.strip():
            continue
        proto.write(json.dumps(execute_config(json.loads(line))) + "\n")
        proto.flush()


# A worker only runs papermill: it imports kvlab.sweep (errors, paths) under a bare `kvlab` package
# module, skipping kvlab/__init__ (torch, transformers: seconds per worker). The notebooks' kernels
# are separate processes and import kvlab normally.
_WORKER_BOOT = ("import sys, types\n"
                "pkg = types.ModuleType('kvlab'); pkg.__path__ = [%r]; sys.modules['kvlab'] = pkg\n"
                "from kvlab.sweep.local import _worker_main\n"
                "_worker_main()\n")


class _WorkerProcess:
    """One worker subprocess (`python -c ...kvlab.sweep.local._worker_main`) bound to an optional device."""

    def __init__(self, device: str | None) -> None:
        self.device = device
        self.proc: Any = None

    def _start(self) -> None:
        import subprocess

        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parent.parent.parent)   # the same kvlab as the driver's
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT % str(Path(__file__).resolve().parent.parent)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=os.name == "posix")   # Ctrl-C goes to the driver only

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(dict(job, device=self.device)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"status": "failed", "error": f"sweep worker process died (exit code {code})",
                    "seconds": 0.0, "output": job["output"]}
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def run_local(jobs: list[dict[str, Any]], workers: int, devs: list[str] | None, record, bar) -> None:
    n = min(len(devs) if devs else int(workers), len(jobs))
    if n <= 1 and not _in_event_loop():   # in-process: no worker start-up cost
        device = devs[0] if devs else None
        for job in jobs:
            record(job, execute_config(dict(job, device=device)))
            bar.update()
        return
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    done: queue.Queue = queue.Queue()
    pool = [_WorkerProcess(devs[i] if devs else None) for i in range(max(n, 1))]

    def feed(worker: _WorkerProcess) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                res = worker.run(job)
            except Exception as e:  # noqa: BLE001 - recorded as the config's failure
                res = {"status": "failed", "error": error_text(e), "seconds": 0.0, "output": job["output"]}
            done.put((job, res))

    threads = [threading.Thread(target=feed, args=(w,), daemon=True) for w in pool]
    for t in threads:
        t.start()
    ok = False
    try:
        for _ in range(len(jobs)):
            job, res = done.get()
            record(job, res)
            bar.update()
        ok = True
    finally:
        if not ok:   # interrupted: stop feeding, stop the workers
            while not todo.empty():
                try:
                    todo.get_nowait()
                except queue.Empty:
                    break
        for w in pool:
            w.close(kill=not ok)
