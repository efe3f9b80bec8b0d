"""Running one sweep config with papermill (in the driver, a worker process or a Ray task)."""
from __future__ import annotations

import os
import re
import time
import traceback
from typing import Any

from ..threads import CHILD_VARS, ENV as THREADS_ENV

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_text(e: BaseException) -> str:
    if type(e).__name__ == "PapermillExecutionError":
        cell_tb = "\n".join(getattr(e, "traceback", []) or [])
        text = (f"{e.ename}: {e.evalue}\n(in cell {getattr(e, 'exec_count', '?')} of the notebook)\n\n{cell_tb}")
    else:
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return _ANSI.sub("", text)


def execute_config(job: dict[str, Any]) -> dict[str, Any]:
    """Run one config with papermill. Returns status, error, seconds, output (never raises for a cell error)."""
    t0 = time.perf_counter()
    params = dict(job["params"])
    device = job.get("device")
    if job["declares_device"] and device is not None and "device" not in params:
        params["device"] = device
    if job["declares_store"] and "store_path" not in params and job.get("store_path"):
        params["store_path"] = job["store_path"]
    env = {"KVLAB_RUN": job["hash"], **({"KVLAB_STORE": job["store_path"]} if job.get("store_path") else {})}
    if job.get("threads"):          # the kernel's torch threads: this worker's share of the cores
        env.update({var: str(job["threads"]) for var in (*CHILD_VARS, THREADS_ENV)})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from ..notebook import execute

        execute(job["notebook"], job["output"], params, cwd=job["cwd"], timeout=job.get("timeout"))
        status, error = "ok", None
    except Exception as e:  # noqa: BLE001 - any failure of a config is recorded, the sweep goes on
        status, error = "failed", error_text(e)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"status": status, "error": error, "seconds": time.perf_counter() - t0, "output": job["output"]}
