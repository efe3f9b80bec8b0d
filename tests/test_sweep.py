"""kvlab.sweep: grid expansion, validation before running, papermill runs, skipping, failures, SIGKILL, ray."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from kvlab.errors import KVLabError
from kvlab.store import Store, load
from kvlab.cli import main as cli_main
from kvlab.sweep import config_hash, expand, notebook_parameters, run_sweep

FIXTURE = Path(__file__).parent / "fixtures" / "sweep_fixture.ipynb"


def _spec(**kw):
    spec = {"name": "fixture", "notebook": str(FIXTURE)}
    spec.update(kw)
    return spec


def _run(spec, tmp_path, **kw):
    kw.setdefault("progress", False)
    return run_sweep(spec, store=tmp_path / "results.sqlite", runs_dir=tmp_path / "runs", **kw)


def test_expand_product_and_zip():
    spec = _spec(parameters={"method": "int4"}, grid={"x": [1, 2], "sleep": [0, 1]},
                 zip={"store_path": ["a", "b", "c"], "device": ["cpu", "cpu", "cuda"]})
    configs = expand(spec)
    assert len(configs) == 2 * 2 * 3
    assert configs[0] == {"method": "int4", "x": 1, "sleep": 0, "store_path": "a", "device": "cpu"}
    assert {(c["store_path"], c["device"]) for c in configs} == {("a", "cpu"), ("b", "cpu"), ("c", "cuda")}
    assert len({tuple(sorted(c.items())) for c in configs}) == 12
    assert expand(_spec(parameters={"x": 3})) == [{"x": 3}]
    # several zip groups multiply with each other
    assert len(expand(_spec(zip=[{"x": [1, 2]}, {"sleep": [0, 1, 2]}]))) == 6


@pytest.mark.parametrize("bad, match", [
    ({"zip": {"x": [1, 2], "sleep": [1]}}, "same length"),
    ({"grid": {"x": 3}}, "must be a list"),
    ({"grid": {"x": []}}, "empty"),
    ({"parameters": {"x": 1}, "grid": {"x": [1, 2]}}, "both"),
    ({"gird": {"x": [1]}}, "unknown key"),
])
def test_expand_errors(bad, match):
    with pytest.raises(KVLabError, match=match):
        expand(_spec(**bad))


def test_notebook_parameters_and_hash():
    assert notebook_parameters(FIXTURE) == ["x", "method", "store_path", "device", "sleep"]
    assert config_hash(FIXTURE, {"x": 1, "sleep": 0}) == config_hash(FIXTURE, {"sleep": 0, "x": 1})
    assert config_hash(FIXTURE, {"x": 1}) != config_hash(FIXTURE, {"x": 2})


def test_unknown_parameter_fails_before_any_run(tmp_path):
    spec = _spec(grid={"x": [1, 2], "bitz": [4]})
    with pytest.raises(KVLabError) as err:
        _run(spec, tmp_path)
    msg = str(err.value)
    assert "'bitz'" in msg and "{'x': 1, 'bitz': 4}" in msg and "x, method, store_path, device, sleep" in msg
    assert not (tmp_path / "runs").exists()
    assert load(path=tmp_path / "results.sqlite").empty
    assert cli_main(["sweep", _write_yaml(tmp_path, spec), "--store", str(tmp_path / "r2.sqlite"),
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_invalid_method_spec_fails_before_any_run(tmp_path):
    spec = _spec(grid={"x": [1], "method": ["int4", "int:bits=3", "int:bitz=3"]})
    with pytest.raises(KVLabError, match="bitz") as err:
        _run(spec, tmp_path)
    assert "int:bitz=3" in str(err.value)
    with pytest.raises(KVLabError, match="nosuchmethod"):
        _run(_spec(grid={"method": ["nosuchmethod"]}), tmp_path)
    assert not (tmp_path / "runs").exists()


def test_missing_notebook(tmp_path):
    with pytest.raises(KVLabError, match="not found"):
        _run({"name": "x", "notebook": "notebooks/does_not_exist.ipynb"}, tmp_path)


def test_dry_run_runs_nothing(tmp_path, capsys):
    s = _run(_spec(grid={"x": [1, 2]}), tmp_path, dry_run=True)
    assert s["ran"] == 0 and len(s["planned"]) == 2 and s["skipped"] == 0
    assert not (tmp_path / "runs").exists()
    assert "2 to run" in capsys.readouterr().out


def _write_yaml(tmp_path, spec) -> str:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_parallel_failure_and_skip(tmp_path):
    store = tmp_path / "results.sqlite"
    # 4 configs, 2 workers, one failing config
    s = _run(_spec(grid={"x": [1, 2, 3, -1]}), tmp_path, workers=2)
    assert (s["ran"], s["ok"], s["failed"], s["skipped"]) == (4, 3, 1, 0), s
    df = load(path=store).sort_values("x")
    assert df["value"].tolist() == [2.0, 4.0, 6.0] and df["x"].tolist() == [1, 2, 3]
    assert df["run"].notna().all()                    # rows carry the config hash that made them
    assert df["device"].isna().all()                  # no --devices: `device` is not passed
    runs = Store(store).runs().set_index("status")
    failed = runs.loc["failed"]
    assert "ValueError: x must be >= 0, got -1" in failed["error"] and "Traceback" in failed["error"]
    assert failed["params"] == {"x": -1}
    assert len(list((tmp_path / "runs" / "fixture").glob("*.ipynb"))) == 4
    assert Path(failed["output"]).is_file()

    # re-run on one device: only the failed config runs again (failed is not "done"), it gets the
    # device as a parameter (the notebook declares `device`), and its attempts are counted
    s = _run(_spec(grid={"x": [1, 2, 3, -1]}), tmp_path, devices="cpu")
    assert (s["ran"], s["ok"], s["failed"], s["skipped"]) == (1, 0, 1, 3), s
    runs = Store(store).runs({"status": "failed"})
    assert runs["attempts"].tolist() == [2]
    injected = [c for c in nbformat.read(runs.loc[0, "output"], as_version=4).cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert 'device = "cpu"' in injected[0].source and f'store_path = "{store.resolve()}"' in injected[0].source

    # a finished sweep computes nothing
    t0 = time.perf_counter()
    s = _run(_spec(grid={"x": [1, 2, 3]}), tmp_path, workers=2)
    assert (s["ran"], s["skipped"]) == (0, 3), s
    assert time.perf_counter() - t0 < 5


def test_sigkill_midway_then_resume(tmp_path):
    nb = tmp_path / "nb.ipynb"
    shutil.copy(FIXTURE, nb)        # relative notebook path, resolved next to the YAML
    spec = {"name": "killed", "notebook": "nb.ipynb", "parameters": {"sleep": 0.5}, "grid": {"x": [1, 2, 3]}}
    yml = _write_yaml(tmp_path, spec)
    store = tmp_path / "results.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "sweep", yml, "--store", str(store),
                             "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hashes = [config_hash(nb, c) for c in expand(yml)]
    done: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if store.exists():
                with Store(store, readonly=True) as st:
                    done = st.runs_done(hashes)
                if done:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert 1 <= len(done) < 3

    st = Store(store)
    assert st.check() == "ok" and st.journal_mode == "wal"
    n_done = len(st.runs_done(hashes))
    assert 1 <= n_done < 3
    s = run_sweep(yml, store=store, runs_dir=tmp_path / "runs", progress=False)
    assert (s["skipped"], s["ran"], s["failed"]) == (n_done, 3 - n_done, 0), s
    assert sorted(load(path=store)["x"].tolist()) == [1, 2, 3]


@pytest.mark.ray
def test_ray_backend(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = _run(_spec(grid={"x": [5, -1]}), tmp_path, backend="ray")
    finally:
        ray.shutdown()
    assert (s["ran"], s["ok"], s["failed"]) == (2, 1, 1), s
    df = load(path=tmp_path / "results.sqlite")
    assert df["value"].tolist() == [10.0] and df["run"].notna().all()
    assert len(list((tmp_path / "runs" / "fixture").glob("*.ipynb"))) == 2
    runs = Store(tmp_path / "results.sqlite").runs({"status": "failed"})
    assert "x must be >= 0" in runs.loc[0, "error"]


def test_hung_cell_times_out_and_the_sweep_goes_on(tmp_path):
    s = _run(_spec(zip={"x": [1, 2], "sleep": [60.0, 0.0]}, timeout=4), tmp_path)
    assert (s["ran"], s["ok"], s["failed"]) == (2, 1, 1), s
    err = s["failures"][0]["error"]
    assert s["failures"][0]["params"]["sleep"] == 60.0 and "timed out" in err.lower(), err[-500:]
    assert s["seconds"] < 50
    with pytest.raises(KVLabError, match="timeout must be a positive"):
        _run(_spec(grid={"x": [1]}), tmp_path, timeout=-1)


def test_kernels_get_their_share_of_the_cores(tmp_path, monkeypatch):
    """Each config's kernel gets OMP_NUM_THREADS: $KVLAB_THREADS, else the cores divided among workers."""
    import os

    from kvlab.sweep.driver import worker_threads

    monkeypatch.delenv("KVLAB_THREADS", raising=False)
    cores = os.cpu_count() or 1
    assert worker_threads(1, 5) == cores and worker_threads(2, 5) == max(1, cores // 2)
    assert worker_threads(8, 1) == cores          # one job: one worker runs, it gets every core
    monkeypatch.setenv("KVLAB_THREADS", "3")
    assert worker_threads(2, 5) == 3
    res = _run(_spec(parameters={"x": 4}), tmp_path)
    assert res["ok"] == 1
    row = Store(tmp_path / "results.sqlite").rows()[0]
    assert row["extra"]["omp_threads"] == "3"
