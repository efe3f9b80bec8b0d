"""The Ray backend: one Ray task per config; the driver alone writes the results store."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import KVLabError
from .execute import error_text, execute_config


def ray_execute(job: dict[str, Any], notebook_text: str) -> dict[str, Any]:
    """A ray task: run the config against a temporary store, passed to the notebook explicitly (its
    `store_path` parameter and `$KVLAB_STORE`), and return the store's rows and the executed notebook."""
    from ..store import Store

    tmp = Path(tempfile.mkdtemp(prefix="kvlab-ray-"))
    try:
        (tmp / "input.ipynb").write_text(notebook_text)
        store_file = tmp / "results.sqlite"
        cwd = job["cwd"] if Path(job["cwd"]).is_dir() else str(tmp)
        local = dict(job, notebook=str(tmp / "input.ipynb"), output=str(tmp / "output.ipynb"), cwd=cwd,
                     store_path=str(store_file), threads=1)
        res = execute_config(local)
        rows: list[dict[str, Any]] = []
        if store_file.exists():
            with Store(store_file, readonly=True) as st:
                rows = st.rows()
        out = tmp / "output.ipynb"
        res.update(rows=rows, notebook=out.read_text() if out.exists() else None, output=job["output"])
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_ray(jobs: list[dict[str, Any]], notebook: Path, devs: list[str] | None, st, record, bar) -> None:
    try:
        import ray
    except ImportError:
        raise KVLabError("--backend ray needs ray: pip install 'kvlab[ray]'") from None
    if not ray.is_initialized():
        ray.init()   # honours RAY_ADDRESS (a cluster) or starts a local one
    gpu = bool(devs) and any(d.startswith("cuda") for d in devs)
    task = ray.remote(ray_execute).options(**({"num_gpus": 1} if gpu else {"num_cpus": 1}), max_retries=0)
    text = notebook.read_text()
    device = "cuda" if gpu else (devs[0] if devs else None)   # ray sets CUDA_VISIBLE_DEVICES per task
    refs = {task.remote(dict(job, device=device), text): job for job in jobs}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        job = refs[ready[0]]
        try:
            res = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - a lost task is a failed config
            res = {"status": "failed", "error": error_text(e), "seconds": 0.0, "output": job["output"], "rows": []}
        if res.get("rows"):
            st.put_many(res["rows"])
        if res.get("notebook"):
            out = Path(job["output"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(res["notebook"])
        record(job, res)
        bar.update()
