"""kvlab.store: keys, upsert, DataFrame loading, concurrent writers, refusing foreign files."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kvlab.errors import KVLabError
from kvlab.store import RESULT_VERSION, Store, load, result_key


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "results.sqlite"


def test_put_get_upsert(store_path):
    st = Store(store_path)
    key = st.put("m", "wiki:512x4", "int4", "fake-quant", "ppl", 15.5, config={"bits": 4, "window": 512},
                 extra={"per_layer": [1.0, 2.0]})
    assert key == result_key("m", "wiki:512x4", "int4", "fake-quant", "ppl", RESULT_VERSION)
    assert st.has("m", "wiki:512x4", "int4", "fake-quant", "ppl")
    assert not st.has("m", "wiki:512x4", "int2", "fake-quant", "ppl")
    assert not st.has("m", "wiki:512x4", "int4", "fake-quant", "ppl", version=RESULT_VERSION + 1)
    row = st.get("m", "wiki:512x4", "int4", "fake-quant", "ppl")
    assert row["value"] == 15.5 and row["config"] == {"bits": 4, "window": 512}
    assert row["extra"] == {"per_layer": [1.0, 2.0]} and row["host"] and row["kvlab_version"]
    # same key replaces (upsert), a new version is a new row
    assert st.put("m", "wiki:512x4", "int4", "fake-quant", "ppl", 16.0, config={"bits": 4}) == key
    st.put("m", "wiki:512x4", "int4", "fake-quant", "ppl", 17.0, version=RESULT_VERSION + 1)
    assert len(st) == 2
    assert st.value("m", "wiki:512x4", "int4", "fake-quant", "ppl") == 16.0
    assert st.get("m", "wiki:512x4", "int2", "fake-quant", "ppl") is None
    # key fields: dict data specs are canonical (key order does not matter)
    assert result_key("m", {"a": 1, "b": 2}, "x", "p", "ppl") == result_key("m", {"b": 2, "a": 1}, "x", "p", "ppl")
    with pytest.raises(KVLabError, match="number"):
        st.put("m", "d", "int4", "p", "ppl", "not a number")
    with pytest.raises(KVLabError, match="config"):
        st.put("m", "d", "int4", "p", "ppl", 1.0, config=[1, 2])


def test_put_many_and_load_columns(store_path):
    st = Store(store_path)
    keys = st.put_many([
        {"model": "m", "data": "wiki", "method": "int4", "protocol": "fake-quant", "metric": "ppl", "value": 15.0,
         "config": {"bits": 4, "window": 128}},
        {"model": "m", "data": "wiki", "method": "int2", "protocol": "fake-quant", "metric": "ppl", "value": 30.0,
         "config": {"bits": 2, "window": 128, "model": "shadow"}},
        ("m", "wiki", "int2", "fake-quant", "kl", 0.5, {"bits": 2}),
    ])
    assert len(keys) == 3 and len(st) == 3
    df = load(path=store_path)
    assert list(df.columns[:6]) == ["model", "data", "method", "protocol", "metric", "value"]
    for col in ("bits", "window", "config.model", "extra", "version", "created", "host", "key"):
        assert col in df.columns, col
    assert sorted(df["bits"].tolist()) == [2, 2, 4]
    assert len(load({"metric": "ppl"}, path=store_path)) == 2
    assert load({"metric": "ppl", "bits": 2}, path=store_path)["value"].tolist() == [30.0]
    assert len(load({"method": ["int2", "int4"]}, path=store_path)) == 3
    q = load("metric == 'ppl' and bits >= 4", path=store_path)
    assert q["method"].tolist() == ["int4"]
    assert st.load({"metric": "kl"})["value"].tolist() == [0.5]
    with pytest.raises(KVLabError, match="bits"):
        load("nonsense_column > 3", path=store_path)
    with pytest.raises(KVLabError, match="no column"):
        load({"nonsense": 3}, path=store_path)


def test_load_missing_store_is_empty_and_creates_nothing(tmp_path):
    path = tmp_path / "nothing.sqlite"
    df = load(path=path)
    assert len(df) == 0 and "value" in df.columns
    assert not path.exists()


def test_wal_mode_and_runs(store_path):
    st = Store(store_path)
    assert st.journal_mode == "wal"
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not st.run_done("h1")
    st.record_run("h1", "nb.ipynb", {"x": 1}, "failed", error="Traceback ...", seconds=1.0)
    assert not st.run_done("h1")
    st.record_run("h1", "nb.ipynb", {"x": 1}, "ok", seconds=2.0, output="runs/s/h1.ipynb")
    assert st.run_done("h1") and st.runs_done(["h1", "h2"]) == {"h1"}
    runs = st.runs()
    assert len(runs) == 1 and runs.loc[0, "attempts"] == 2 and runs.loc[0, "params"] == {"x": 1}
    with pytest.raises(KVLabError, match="status"):
        st.record_run("h2", "nb.ipynb", {}, "weird")


def _writer(path: str, worker: int, n: int, barrier, timeout: float = 120) -> None:
    st = Store(path, timeout=timeout)
    barrier.wait(60)     # start together so the transactions really interleave
    for i in range(n):
        # the first 50 keys are shared by every worker (overlap), the rest are the worker's own
        method = f"shared{i}" if i < 50 else f"w{worker}-{i}"
        st.put("m", "d", method, "fake-quant", "ppl", float(worker * 1000 + i), config={"worker": worker, "i": i})
    st.close()


def test_concurrent_writers_lose_nothing(store_path):
    Store(store_path).close()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(str(store_path), w, 250, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    st = Store(store_path)
    assert st.check() == "ok"
    df = st.load()
    assert len(df) == 4 * 200 + 50               # none lost, none duplicated
    assert df["key"].is_unique
    own = df[df["method"].str.startswith("w")]
    assert len(own) == 800 and set(own["worker"]) == {0, 1, 2, 3}
    shared = df[df["method"].str.startswith("shared")]
    # each shared key holds one writer's value, consistent with its config
    assert (shared["value"] == shared["worker"] * 1000 + shared["i"]).all()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(os.urandom(8192))
    before = _digest(path)
    for kwargs in ({}, {"readonly": True}):
        with pytest.raises(KVLabError, match="not a kvlab results store") as err:
            Store(path, **kwargs)
        assert str(path) in str(err.value)
    with pytest.raises(KVLabError):
        load(path=path)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.sqlite"]


def test_corrupt_sqlite_body_is_refused_and_untouched(tmp_path):
    path = tmp_path / "broken.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    before = _digest(path)
    with pytest.raises(KVLabError, match="not a kvlab results store"):
        Store(path)
    assert _digest(path) == before


def test_foreign_sqlite_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE people (name TEXT, age INTEGER)")
        conn.execute("INSERT INTO people VALUES ('ada', 36)")
    conn.close()
    before = _digest(path)
    with pytest.raises(KVLabError, match="people") as err:
        Store(path)
    assert str(path) in str(err.value) and "not a kvlab results store" in str(err.value)
    with pytest.raises(KVLabError):
        Store(path).put("m", "d", "int4", "p", "ppl", 1.0)
    assert _digest(path) == before
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["people"]
    conn.close()


def test_results_cli(store_path, tmp_path, capsys):
    from kvlab.cli import main as cli_main

    def main(argv):
        return cli_main(["results", *argv])

    st = Store(store_path)
    st.put("m", "wiki", "int4", "fake-quant", "ppl", 15.0, config={"bits": 4})
    st.put("m", "wiki", "int2", "fake-quant", "kl", 0.3, config={"bits": 2})
    st.record_run("h" * 64, "nb.ipynb", {"x": 1}, "ok", seconds=1.0)
    args = ["--store", str(store_path), "--where", "metric=='ppl'"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "int4" in out and "int2" not in out and "1 results" in out
    csv_path = tmp_path / "out.csv"
    assert main(args + ["--csv", str(csv_path)]) == 0
    import pandas as pd

    csv = pd.read_csv(csv_path)
    assert csv["method"].tolist() == ["int4"] and csv["bits"].tolist() == [4]
    assert main(["--store", str(store_path), "--runs"]) == 0 and "1 runs" in capsys.readouterr().out
    assert main(["--store", str(store_path), "--where", "nosuch > 1"]) == 2
    assert "not a valid pandas query" in capsys.readouterr().err


def test_second_open_keeps_this_process_locks(store_path):
    # Opening the store again in a process that already has it open must not drop that process's
    # POSIX locks (which happens if the file is opened and closed outside SQLite): otherwise another
    # process closing its connection believes it is the last one and deletes -wal/-shm under us.
    a = Store(store_path)
    a.put("m", "d", "a", "p", "ppl", 1.0)
    b = Store(store_path, readonly=True)
    assert len(b) == 1
    # another process writes and closes its connection (plain sqlite3: starts fast)
    code = (f"import sqlite3; c = sqlite3.connect({str(store_path)!r}); "
            "c.execute(\"INSERT INTO meta VALUES ('probe', '1')\"); c.commit(); c.close()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert Path(f"{store_path}-wal").exists() and Path(f"{store_path}-shm").exists()
    a.put("m", "d", "a2", "p", "ppl", 3.0)
    assert len(a) == 2 and len(b) == 2 and a.check() == "ok"
