"""Results store: one SQLite file (WAL mode) that notebooks, sweeps and the CLI share.

One row per (model, data spec, method spec, protocol, metric, result version) in table `results`,
keyed by the sha256 of a canonical JSON of those six fields, so writing the same result again
replaces it (upsert). Besides the value, a row keeps `config` (every config field: bits, window,
...; `load()` expands it into one DataFrame column per field), `extra` (per-layer arrays, CI
bounds, ...), when it was written, the kvlab version and the host.
Table `runs` holds one row per executed sweep config (written by `kvlab.sweep`); table `meta`
marks the file as a kvlab store, so a foreign SQLite file or a non-SQLite file is refused and left
byte-for-byte untouched (it is only ever opened read-only before that check).

Several local processes may write at once: every write is one `BEGIN IMMEDIATE` transaction,
with a busy timeout and retries on `database is locked`. A killed writer loses at most the
transaction it had open.

Where the store lives: `Store(path)`; else `$KVLAB_STORE`; else `data/results.sqlite` of a source
checkout (gitignored by `*.sqlite*`); else `~/.cache/kvlab/results.sqlite`.
`kvlab results` (`kvlab/cli.py`) prints or exports it.

    from kvlab.store import Store, load
    Store().put("smollm2", "wiki:512x4", "int4", "fake-quant", "ppl", 15.3, config={"bits": 4})
    df = load({"metric": "ppl"})                    # or load("metric == 'ppl' and bits <= 4")
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import random
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

from .errors import KVLabError
from .paths import REPO_ROOT

if TYPE_CHECKING:  # pandas is imported lazily: notebooks that only write should start fast
    import pandas as pd

__all__ = ["Store", "load", "default_path", "result_key", "spec_fields", "canonical_json", "RESULT_VERSION",
           "KEY_FIELDS", "HIDDEN_COLUMNS"]

APP_ID = "kvlab-results"
SCHEMA_VERSION = 1
#: Bump when a change in kvlab makes earlier results incomparable; it is part of every key.
RESULT_VERSION = 2   # 2: prefill-decode bits count the stored context only
#: The fields that identify a result (with the result version).
KEY_FIELDS = ("model", "data", "method", "protocol", "metric")
_BASE_COLUMNS = (*KEY_FIELDS, "value")
_IDENTITY = ("model", "data", "method", "protocol", "label")      # fields of a result that are not metrics
_META_COLUMNS = ("extra", "version", "created", "kvlab_version", "host", "run", "key")
_RUN_STATUS = ("ok", "failed")
TRACE_METRIC = "trace"       # the row holding a result's per-position trace in `extra` (`Store.put_trace`)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL, data TEXT NOT NULL, method TEXT NOT NULL,
    protocol TEXT NOT NULL, metric TEXT NOT NULL, version INTEGER NOT NULL,
    value REAL, config TEXT NOT NULL DEFAULT '{}', extra TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL, kvlab_version TEXT, host TEXT, run TEXT
);
CREATE INDEX IF NOT EXISTS results_metric ON results (metric, model, data);
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT PRIMARY KEY,
    sweep TEXT, notebook TEXT NOT NULL, params TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT, seconds REAL, output TEXT,
    created TEXT NOT NULL, host TEXT, kvlab_version TEXT, attempts INTEGER NOT NULL DEFAULT 1
);
"""
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------
# paths, keys, JSON
# ---------------------------------------------------------------------------------------------
def default_path() -> Path:
    """`$KVLAB_STORE`, else `<checkout>/data/results.sqlite`, else `~/.cache/kvlab/results.sqlite`."""
    env = os.environ.get("KVLAB_STORE")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "data" / "results.sqlite"
    return Path.home() / ".cache" / "kvlab" / "results.sqlite"


def _resolve_path(path: str | os.PathLike | None) -> Path:
    return Path(path).expanduser() if path is not None else default_path()


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "tolist"):          # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON: {obj!r}")


def canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as e:
        raise KVLabError(f"result field is not JSON-serialisable: {e}") from None


def _spec(x: Any, what: str) -> str:
    """A key field as text: strings as they are, methods by `.spec`, models by `.model_id`, dicts as JSON."""
    if x is None:
        raise KVLabError(f"results store: '{what}' is required, got None")
    if isinstance(x, str):
        s = x.strip()
    elif isinstance(x, Path):
        s = str(x)
    elif hasattr(x, "model_id"):
        s = str(x.model_id)
    elif hasattr(x, "spec") and isinstance(getattr(x, "spec"), str):
        s = x.spec
    elif isinstance(x, (dict, list, tuple)):
        s = canonical_json(x)
    else:
        s = str(x)
    if not s:
        raise KVLabError(f"results store: '{what}' must not be empty")
    return s


def result_key(model: Any, data: Any, method: Any, protocol: Any, metric: Any,
               version: int = RESULT_VERSION) -> str:
    """The stable key of a result: sha256 of the canonical JSON of its identifying fields."""
    fields = {k: _spec(v, k) for k, v in zip(KEY_FIELDS, (model, data, method, protocol, metric))}
    fields["version"] = int(version)
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


_HOST: str | None = None
_VERSION: str | None = None


def _host() -> str:
    global _HOST
    if _HOST is None:
        _HOST = socket.gethostname()
    return _HOST


def _kvlab_version() -> str:
    global _VERSION
    if _VERSION is None:
        import importlib.metadata as md

        try:
            _VERSION = md.version("kvlab")
        except md.PackageNotFoundError:
            _VERSION = "unknown"
    return _VERSION


def _value(v: Any) -> float | None:
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (int, float)):
        v = v.item()
    try:
        return float(v)
    except (TypeError, ValueError):
        raise KVLabError(f"result value must be a number, got {type(v).__name__}: {v!r}") from None


def _is_busy(e: sqlite3.Error) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    msg = str(e).lower()
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in msg or "busy" in msg


def _is_transient(e: sqlite3.Error) -> bool:
    """Errors a WAL reader can meet while another process opens, recovers or checkpoints the file."""
    name = getattr(e, "sqlite_errorname", "") or ""
    msg = str(e).lower()
    return (name.startswith(("SQLITE_IOERR", "SQLITE_READONLY_RECOVERY", "SQLITE_READONLY_CANTINIT",
                             "SQLITE_PROTOCOL"))
            or "disk i/o error" in msg or "locking protocol" in msg)


# ---------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------
class Store:
    """A kvlab results store (SQLite, WAL mode). Safe to use from several processes at once.

    Args:
        path: the SQLite file; None = `default_path()`. Created (with its folder) on first use
            unless `readonly`.
        readonly: open without ever writing; a missing file then reads as an empty store.
        timeout: seconds to wait for another writer's lock before giving up.

    Raises KVLabError when the file exists but is not a kvlab store (other SQLite schema, not
    SQLite at all, corrupt); such a file is never written to.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False,
                 timeout: float = 60.0) -> None:
        self.path = _resolve_path(path)
        self.readonly = readonly
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._empty = False   # readonly and no file yet
        self._ro_uri = False  # readonly and the file is not writable: open with ?mode=ro
        self._open()

    # -- opening ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    def _not_a_store(self, why: str) -> KVLabError:
        return KVLabError(
            f"'{self.path}' is not a kvlab results store ({why}); it was left untouched. "
            f"Point kvlab at another file (Store(path), --store PATH or $KVLAB_STORE) or move this one away.")

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            target, uri = self.path.resolve().as_uri() + "?mode=ro", True
        else:
            target, uri = str(self.path), False
        conn = sqlite3.connect(target, uri=uri, timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _inspect(self) -> str:
        """Classify an existing file without writing to it: 'kvlab', 'empty'; raise otherwise."""
        if self.path.is_dir():
            raise self._not_a_store("it is a directory")
        if self.path.stat().st_size == 0:
            return "empty"
        # The header is checked by SQLite itself (read-only), never by opening the file from Python:
        # closing any other descriptor of the file would drop the POSIX locks that this process's
        # live SQLite connections hold on it (see sqlite.org/howtocorrupt.html, section 2.2).

        def look() -> str:
            conn = self._connect(readonly=True)
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not tables:
                    return "empty"
                if "meta" not in tables:
                    raise self._not_a_store(f"an SQLite database with other tables: {', '.join(sorted(tables))}")
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            finally:
                conn.close()
            if meta.get("app") != APP_ID:
                raise self._not_a_store(f"an SQLite database whose meta table names app {meta.get('app')!r}")
            if int(meta.get("schema", 0)) > SCHEMA_VERSION:
                raise KVLabError(f"'{self.path}' was written by a newer kvlab (store schema {meta.get('schema')}, "
                                 f"this kvlab reads up to {SCHEMA_VERSION}); upgrade kvlab")
            return "kvlab"

        try:
            return self._retry(look)
        except sqlite3.OperationalError as e:
            if _is_busy(e) or _is_transient(e):
                raise KVLabError(f"results store '{self.path}' cannot be read now ({e}); try again") from None
            raise self._not_a_store(f"SQLite says: {e}") from None
        except sqlite3.DatabaseError as e:   # SQLITE_NOTADB, SQLITE_CORRUPT
            why = "not an SQLite database" if "not a database" in str(e) else f"SQLite says: {e}"
            raise self._not_a_store(why) from None

    def _open(self) -> None:
        state = self._inspect() if self.path.exists() else "missing"
        if self.readonly:
            self._empty = state in ("missing", "empty")
            # a kvlab store is read through a normal connection (never used to write) where the file
            # is writable: WAL readers that may create -shm and run recovery meet fewer transient errors
            self._ro_uri = not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK))
            return
        if state == "missing":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect(readonly=False)
        try:
            if state != "kvlab":
                self._retry(lambda: self._create_schema(conn))
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
        except sqlite3.DatabaseError as e:
            conn.close()
            if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
                raise KVLabError(f"results store '{self.path}' stayed locked for {self.timeout:.0f} s") from None
            raise self._not_a_store(f"SQLite says: {e}") from None
        conn.execute("PRAGMA synchronous = NORMAL")
        self._conn, self._pid = conn, os.getpid()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:   # someone else made it foreign meanwhile
                raise self._not_a_store(f"an SQLite database with other tables: {', '.join(sorted(tables))}")
            if "meta" in tables:
                app = conn.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
                if not app or app[0] != APP_ID:
                    raise self._not_a_store("an SQLite database with a foreign meta table")
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(stmt)
            conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                             [("app", APP_ID), ("schema", str(SCHEMA_VERSION)), ("created", _now())])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # journal mode cannot change inside a transaction
        conn.execute("PRAGMA journal_mode = WAL").fetchone()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():   # closed, or inherited through fork
            self._conn = self._connect(self.readonly and self._ro_uri)
            self._conn.execute(f"PRAGMA query_only = {'ON' if self.readonly else 'OFF'}")
            if not self.readonly:
                self._conn.execute("PRAGMA synchronous = NORMAL")
            self._pid = os.getpid()
        return self._conn

    def close(self) -> None:
        """Close the connection (it reopens on the next call)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], _T]) -> _T:
        """Call `fn`, retrying while the file is locked (up to `timeout`) or on a transient I/O error
        (a few times, reopening the connection)."""
        deadline = time.monotonic() + self.timeout
        delay, transient = 0.005, 0
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if _is_transient(e) and transient < 5:
                    transient += 1
                    self._drop_connection()
                elif not _is_busy(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.25)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self.readonly:
            raise KVLabError(f"{self!r} was opened read-only")

        def attempt() -> _T:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
                return out
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        with self._lock:
            try:
                return self._retry(attempt)
            except sqlite3.OperationalError as e:
                if _is_busy(e):
                    raise KVLabError(f"results store '{self.path}' stayed locked for {self.timeout:.0f} s") from None
                raise

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        if self._empty:
            return []
        with self._lock:
            return self._retry(lambda: self._connection().execute(sql, tuple(params)).fetchall())

    # -- results ---------------------------------------------------------------------------------
    @staticmethod
    def _row(model: Any, data: Any, method: Any, protocol: Any, metric: Any, value: Any, *,
             config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
             version: int = RESULT_VERSION, created: str | None = None, host: str | None = None,
             kvlab_version: str | None = None, run: str | None = None) -> tuple:
        fields = [_spec(v, k) for k, v in zip(KEY_FIELDS, (model, data, method, protocol, metric))]
        key = result_key(*fields, version=version)
        for name, m in (("config", config), ("extra", extra)):
            if m is not None and not isinstance(m, Mapping):
                raise KVLabError(f"results store: '{name}' must be a dict, got {type(m).__name__}")
        return (key, *fields, int(version), _value(value), canonical_json(dict(config or {})),
                canonical_json(dict(extra or {})), created or _now(), kvlab_version or _kvlab_version(),
                host or _host(), run if run is not None else os.environ.get("KVLAB_RUN"))

    _INSERT = ("INSERT OR REPLACE INTO results (key, model, data, method, protocol, metric, version, value, "
               "config, extra, created, kvlab_version, host, run) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)")

    def put(self, model: Any, data: Any, method: Any, protocol: str, metric: str, value: Any, *,
            config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
            version: int = RESULT_VERSION) -> str:
        """Write one result in its own transaction; the same key replaces the earlier row.

        `model` may be a LoadedModel (its `model_id` is used), `method` a Method (its `spec`),
        `data` a spec string or dict. `config` holds every config field (bits, window, ...) and
        becomes one column each in `load()`; `extra` holds anything else JSON-able (per-layer
        lists, numpy arrays, CI bounds). Returns the result key.
        """
        row = self._row(model, data, method, protocol, metric, value, config=config, extra=extra, version=version)
        self._write(lambda c: c.execute(self._INSERT, row))
        return row[0]

    def put_many(self, rows: Iterable[Mapping[str, Any] | tuple]) -> list[str]:
        """Write many results in one transaction (all or none). Returns their keys.

        Each row is a dict with model, data, method, protocol, metric, value and optionally
        config, extra, version, created, host, kvlab_version, run (as `rows()` returns them),
        or a tuple (model, data, method, protocol, metric, value[, config[, extra]]).
        """
        prepared = []
        for r in rows:
            if isinstance(r, Mapping):
                missing = [k for k in _BASE_COLUMNS if k not in r]
                if missing:
                    raise KVLabError(f"put_many: row lacks {', '.join(missing)}: {dict(r)!r}")
                opt = {k: r[k] for k in ("config", "extra", "version", "created", "host", "kvlab_version", "run")
                       if r.get(k) is not None}
                prepared.append(self._row(*(r[k] for k in _BASE_COLUMNS), **opt))
            else:
                r = tuple(r)
                if not 6 <= len(r) <= 8:
                    raise KVLabError(f"put_many: a tuple row is (model, data, method, protocol, metric, value"
                                     f"[, config[, extra]]), got {len(r)} items")
                prepared.append(self._row(*r[:6], config=r[6] if len(r) > 6 else None,
                                          extra=r[7] if len(r) > 7 else None))
        if prepared:
            self._write(lambda c: c.executemany(self._INSERT, prepared))
        return [p[0] for p in prepared]

    def put_result(self, model: Any, data: Any, method: Any, protocol: str, metrics: Mapping[str, Any],
                   config: Mapping[str, Any] | None = None, names: Iterable[str] | None = None) -> list[str]:
        """Write one evaluation result — every numeric metric (or those in `names`) — in one transaction.

        Identity fields inside `metrics` (model, data, method, protocol, label) and non-numbers are
        skipped; NaN is stored (a metric that was not measurable), infinities are not. Returns the keys."""
        names = None if names is None else set(names)
        rows = []
        for k, v in metrics.items():
            if k in _IDENTITY or (names is not None and k not in names):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isinf(v)):
                continue
            rows.append(dict(model=model, data=data, method=method, protocol=protocol, metric=k, value=float(v),
                             config=dict(config or {})))
        return self.put_many(rows)

    def put_trace(self, model: Any, data: Any, method: Any, protocol: str, trace: Mapping[str, Any],
                  config: Mapping[str, Any] | None = None) -> str:
        """Write a result's per-position / per-step trace (`kvlab.evaluate`'s `result.trace`: lists of
        numbers) as the row with metric `trace`: value = number of positions, the lists in `extra`
        (6 significant digits). Returns its key."""
        def compact(v: Any) -> Any:
            if isinstance(v, float):
                return float(f"{v:.6g}")
            if isinstance(v, (list, tuple)):
                return [compact(x) for x in v]
            return v
        extra = {k: compact(v.tolist() if hasattr(v, "tolist") else v) for k, v in trace.items()}
        return self.put(model, data, method, protocol, TRACE_METRIC, len(extra.get("position", ())),
                        config=config, extra=extra)

    def get_trace(self, model: Any, data: Any, method: Any, protocol: str) -> dict[str, list] | None:
        """The stored trace of one result (see `put_trace`), or None."""
        row = self.get(model, data, method, protocol, TRACE_METRIC)
        return None if row is None else row["extra"]

    def get_result(self, model: Any, data: Any, method: Any, protocol: str,
                   required: Iterable[str] = ()) -> dict[str, float] | None:
        """The stored metrics of one result {metric: value}, or None unless every `required` metric is
        stored — the one rule for "this result is already computed"."""
        fields = [_spec(v, k) for k, v in zip(KEY_FIELDS[:4], (model, data, method, protocol))]
        got = {m: v for m, v in self._read(
            "SELECT metric, value FROM results WHERE model = ? AND data = ? AND method = ? AND protocol = ? "
            "AND version = ?", (*fields, RESULT_VERSION))}
        got.pop(TRACE_METRIC, None)           # a trace row is not a metric (`get_trace`)
        if not got or any(r not in got for r in required):
            return None
        return {m: (float("nan") if v is None else v) for m, v in got.items()}

    def has(self, model: Any, data: Any, method: Any, protocol: str, metric: str, *,
            version: int = RESULT_VERSION) -> bool:
        """Whether this result is stored."""
        key = result_key(model, data, method, protocol, metric, version)
        return bool(self._read("SELECT 1 FROM results WHERE key = ?", (key,)))

    def get(self, model: Any, data: Any, method: Any, protocol: str, metric: str, *,
            version: int = RESULT_VERSION) -> dict[str, Any] | None:
        """The stored row as a dict (config and extra parsed), or None."""
        key = result_key(model, data, method, protocol, metric, version)
        rows = self._rows("WHERE key = ?", (key,))
        return rows[0] if rows else None

    def value(self, model: Any, data: Any, method: Any, protocol: str, metric: str, *,
              version: int = RESULT_VERSION) -> float | None:
        """Just the stored value (None if absent)."""
        row = self.get(model, data, method, protocol, metric, version=version)
        return None if row is None else row["value"]

    def delete(self, where: Mapping[str, Any]) -> int:
        """Delete results matching equality filters on model/data/method/protocol/metric/version/key."""
        clause, params = _sql_filter(where, strict=True)
        return self._write(lambda c: c.execute(f"DELETE FROM results {clause}", params).rowcount)

    _COLS = ("key", "model", "data", "method", "protocol", "metric", "version", "value", "config", "extra",
             "created", "kvlab_version", "host", "run")

    def _rows(self, clause: str = "", params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        out = []
        for r in self._read(f"SELECT {', '.join(self._COLS)} FROM results {clause} ORDER BY created, key", params):
            d = dict(zip(self._COLS, r))
            d["config"] = json.loads(d["config"])
            d["extra"] = json.loads(d["extra"])
            out.append(d)
        return out

    def rows(self, where: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Raw rows as dicts (what `put_many` accepts), filtered by equality on key columns."""
        clause, params = _sql_filter(where or {}, strict=True)
        return self._rows(clause, params)

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM results")[0][0]) if not self._empty else 0

    def load(self, where: Mapping[str, Any] | str | None = None) -> "pd.DataFrame":
        """Results as a DataFrame: model, data, method, protocol, metric, value, one column per config
        field (a field named like a base column becomes `config.<name>`), then extra, version,
        created, kvlab_version, host, run, key. Trace rows (metric `trace`, `put_trace`) are left out
        unless `where` filters on `metric`.

        `where`: a dict of equality filters (a list value means "any of"), or a pandas query
        string such as "metric == 'ppl' and bits <= 4". Besides the columns, a query may name the
        fields of the method spec (`bits`, `group`, ... of "int:bits=4,group=128"; NaN where a
        method has no such field) and the other metrics of the same result (`avg_bits`, `ppl`,
        ...: "metric == 'kl' and avg_bits <= 3"); they are not added to the returned table.
        """
        import pandas as pd

        sql_where: dict[str, Any] = {}
        df_where: dict[str, Any] = {}
        if isinstance(where, Mapping):
            for k, v in where.items():
                (sql_where if k in (*KEY_FIELDS, "version", "key") else df_where)[k] = v
        elif where is not None and not isinstance(where, str):
            raise KVLabError(f"where must be a dict or a pandas query string, got {type(where).__name__}")
        clause, params = _sql_filter(sql_where, strict=True)
        records, config_cols = [], {}
        for r in self._rows(clause, params):
            rec = {k: r[k] for k in _BASE_COLUMNS}
            for k, v in r["config"].items():
                col = f"config.{k}" if k in _BASE_COLUMNS or k in _META_COLUMNS else k
                config_cols.setdefault(col, None)
                rec[col] = v
            rec.update({k: r[k] for k in _META_COLUMNS})
            records.append(rec)
        columns = [*_BASE_COLUMNS, *config_cols, *_META_COLUMNS]
        df = pd.DataFrame.from_records(records, columns=columns)
        if "metric" not in sql_where:            # trace rows are not metrics: only when asked for (`get_trace`)
            df = df[df["metric"] != TRACE_METRIC]
        if len(df):
            df["created"] = pd.to_datetime(df["created"], utc=True, format="ISO8601")
        for k, v in df_where.items():
            if k not in df.columns:
                if not len(df):
                    continue
                raise KVLabError(f"where: no column '{k}'. Columns: {', '.join(map(str, df.columns))}")
            if isinstance(v, (list, tuple, set, frozenset)):
                df = df[df[k].isin(list(v))]
            elif v is None:
                df = df[df[k].isna()]
            else:
                df = df[df[k] == v]
        if isinstance(where, str) and where.strip():
            if not len(df):
                return df
            df = _query(df, where)
        return df.reset_index(drop=True)

    # -- runs ------------------------------------------------------------------------------------
    def record_run(self, config_hash: str, notebook: str | os.PathLike, params: Mapping[str, Any], status: str,
                   error: str | None = None, seconds: float | None = None, output: str | os.PathLike | None = None,
                   *, sweep: str | None = None) -> None:
        """Record one executed sweep config (status 'ok' or 'failed'); a re-run replaces the row."""
        if status not in _RUN_STATUS:
            raise KVLabError(f"run status must be one of {_RUN_STATUS}, got {status!r}")
        row = (config_hash, sweep, str(notebook), canonical_json(dict(params)), status, error,
               None if seconds is None else float(seconds), None if output is None else str(output),
               _now(), _host(), _kvlab_version())
        self._write(lambda c: c.execute(
            "INSERT INTO runs (config_hash, sweep, notebook, params, status, error, seconds, output, created, host, "
            "kvlab_version) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (config_hash) DO UPDATE SET "
            "sweep = excluded.sweep, notebook = excluded.notebook, params = excluded.params, "
            "status = excluded.status, error = excluded.error, seconds = excluded.seconds, "
            "output = excluded.output, created = excluded.created, host = excluded.host, "
            "kvlab_version = excluded.kvlab_version, attempts = runs.attempts + 1", row))

    def run_done(self, config_hash: str) -> bool:
        """Whether this sweep config already ran successfully."""
        return bool(self._read("SELECT 1 FROM runs WHERE config_hash = ? AND status = 'ok'", (config_hash,)))

    def runs_done(self, config_hashes: Iterable[str]) -> set[str]:
        """The subset of these config hashes that already ran successfully (one query per 500)."""
        hashes, done = list(config_hashes), set()
        for i in range(0, len(hashes), 500):
            chunk = hashes[i:i + 500]
            done.update(r[0] for r in self._read(
                f"SELECT config_hash FROM runs WHERE status = 'ok' AND config_hash IN ({','.join('?' * len(chunk))})",
                chunk))
        return done

    def runs(self, where: Mapping[str, Any] | None = None) -> "pd.DataFrame":
        """The runs table as a DataFrame (params parsed), filtered by equality on its columns."""
        import pandas as pd

        cols = ("config_hash", "sweep", "notebook", "params", "status", "error", "seconds", "output",
                "created", "host", "kvlab_version", "attempts")
        conds, params = [], []
        for k, v in (where or {}).items():
            if k not in cols:
                raise KVLabError(f"runs: no column '{k}'. Columns: {', '.join(cols)}")
            conds.append(f"{k} = ?")
            params.append(v)
        clause = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = [dict(zip(cols, r)) for r in self._read(f"SELECT {', '.join(cols)} FROM runs {clause} ORDER BY created",
                                                        params)]
        for r in rows:
            r["params"] = json.loads(r["params"])
        return pd.DataFrame.from_records(rows, columns=cols)

    def check(self) -> str:
        """SQLite's integrity check ('ok' when the file is sound)."""
        if self._empty:
            return "ok"
        return "\n".join(r[0] for r in self._read("PRAGMA integrity_check"))

    @property
    def journal_mode(self) -> str:
        """The SQLite journal mode ('wal' for every store kvlab created)."""
        if self._empty:
            return "missing"
        return str(self._read("PRAGMA journal_mode")[0][0]).lower()


def _spec_value(raw: str) -> Any:
    """A method-spec field value typed as a query compares it: int, float, bool, None or the text."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw.strip()


def spec_fields(method: str) -> dict[str, Any]:
    """The fields written in a method spec string: 'int:bits=4,group=128' -> {'bits': 4, 'group': 128}."""
    _, _, args = str(method).partition(":")
    fields = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, raw = item.partition("=")
        if eq and key.strip().isidentifier():
            fields[key.strip()] = _spec_value(raw)
    return fields


def _query_columns(df: "pd.DataFrame") -> dict[str, "pd.Series"]:
    """Names a `where` query may use besides the table's columns: method-spec fields, then the
    value of every metric of the same result (model, data, method, protocol, version)."""
    import pandas as pd

    extra: dict[str, pd.Series] = {}
    fields = {m: spec_fields(m) for m in df["method"].unique()}
    for name in dict.fromkeys(k for f in fields.values() for k in f):
        if name not in df.columns:
            extra[name] = df["method"].map(lambda m, n=name: fields[m].get(n, float("nan")))
    ident = [*KEY_FIELDS[:-1], "version"]
    wide = df.pivot_table(index=ident, columns="metric", values="value", aggfunc="first", dropna=False)
    rows = pd.MultiIndex.from_frame(df[ident])
    for metric in wide.columns:
        if metric not in df.columns and metric not in extra and str(metric).isidentifier():
            extra[metric] = pd.Series(wide[metric].reindex(rows).to_numpy(), index=df.index)
    return extra


def _query(df: "pd.DataFrame", where: str) -> "pd.DataFrame":
    """`df.query(where)` where the query may also name method-spec fields and same-result metrics
    (`_query_columns`); returns `df`'s own columns only, or raises a KVLabError listing the names."""
    extra = _query_columns(df)
    try:
        picked = df.assign(**extra).query(where).index
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        raise KVLabError(
            f"where {where!r} is not a valid pandas query on the results ({type(e).__name__}: {e}). "
            f"Columns: {', '.join(map(str, df.columns))}; also usable: {', '.join(extra) or '(none)'} "
            f"(backquote names with dots, quote strings: metric == 'ppl')") from None
    return df.loc[picked]


def _sql_filter(where: Mapping[str, Any], strict: bool) -> tuple[str, list[Any]]:
    allowed = (*KEY_FIELDS, "version", "key")
    conds, params = [], []
    for k, v in where.items():
        if k not in allowed:
            if strict:
                raise KVLabError(f"filter on '{k}': only {', '.join(allowed)} can be filtered here")
            continue
        if isinstance(v, (list, tuple, set, frozenset)):
            vals = [int(x) if k == "version" else _spec(x, k) if k != "key" else x for x in v]
            conds.append(f"{k} IN ({','.join('?' * len(vals))})" if vals else "0")
            params.extend(vals)
        else:
            conds.append(f"{k} = ?")
            params.append(int(v) if k == "version" else _spec(v, k) if k != "key" else v)
    return (f"WHERE {' AND '.join(conds)}" if conds else ""), params


def load(where: Mapping[str, Any] | str | None = None, path: str | os.PathLike | None = None) -> "pd.DataFrame":
    """Results of the store at `path` (default store if None) as a DataFrame; see `Store.load`.

    A store that does not exist yet reads as an empty table (nothing is created).
    """
    store = Store(path, readonly=True)
    try:
        return store.load(where)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# CLI: kvlab results
# ---------------------------------------------------------------------------------------------
HIDDEN_COLUMNS = ("extra", "created", "kvlab_version", "host", "run", "key")   # `kvlab results` without --all

#: the epilog of `kvlab results --help`; tests run every `kvlab results ...` line of it
