"""Sweep benchmark: first run vs re-run of a 12-config sweep (target: re-run < 5% of the first run),
and 1 vs 2 local workers.

    python benchmarks/bench_sweep.py                      # tiny fixture-like notebook, 12 configs
    python benchmarks/bench_sweep.py --configs 6 --sleep 0.5
    python benchmarks/bench_sweep.py --notebook notebooks/02_sensitivity.ipynb \\
        --grid bits=2,3,4 --grid kind=k,v --param max_tokens=256

Everything (store, executed notebooks) goes to a temporary folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kvlab.sweep import expand, run_sweep

FIXTURE_CELLS = [
    ("x = 1\nsleep = 0.0\nstore_path = None", ["parameters"]),
    ("import time\nif sleep:\n    time.sleep(sleep)\nfrom kvlab.store import Store\n"
     "Store(store_path).put('bench-model', 'bench-data', 'int4', 'fake-quant', f'score-x{x}', 2.0 * x,"
     " config={'x': x})", []),
]


def _fixture_notebook(path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(src, metadata={"tags": tags}) for src, tags in FIXTURE_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def _value(text: str):
    return yaml.safe_load(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notebook", help="a real parameterized notebook (default: a tiny fixture notebook)")
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,..",
                    help="grid axis for --notebook (repeatable)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="fixed parameter")
    ap.add_argument("--configs", type=int, default=12, help="configs of the fixture sweep (default 12)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds of 'work' per fixture config")
    ap.add_argument("--workers", type=int, default=2, help="workers of the parallel run (default 2)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kvlab-bench-sweep-"))
    try:
        if args.notebook:
            if not args.grid:
                ap.error("--notebook needs at least one --grid NAME=V1,V2,..")
            notebook = str(Path(args.notebook).resolve())
            grid = {}
            for g in args.grid:
                k, _, vs = g.partition("=")
                grid[k] = [_value(v) for v in vs.split(",")]
        else:
            notebook = str(tmp / "bench.ipynb")
            _fixture_notebook(Path(notebook))
            grid = {"x": list(range(1, args.configs + 1))}
        params = {k: _value(v) for k, _, v in (p.partition("=") for p in args.param)}
        if not args.notebook and args.sleep:
            params["sleep"] = args.sleep
        spec = {"name": "bench", "notebook": notebook, "parameters": params, "grid": grid}
        spec_file = tmp / "bench.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        n = len(expand(spec))
        print(f"sweep of {n} configs over {Path(notebook).name} (temp dir {tmp})", flush=True)

        def timed(**kw):
            t0 = time.perf_counter()
            s = run_sweep(str(spec_file), progress=False, verbose=False, **kw)
            dt = time.perf_counter() - t0
            if s["failed"]:
                print(f"  {s['failed']} configs failed, e.g.:\n{s['failures'][0]['error'][-1500:]}", file=sys.stderr)
            return dt, s

        store1, runs = tmp / "one.sqlite", tmp / "runs"
        first, s1 = timed(workers=1, store=store1, runs_dir=runs)
        rerun, s2 = timed(workers=1, store=store1, runs_dir=runs)
        assert s2["ran"] == 0, s2
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "kvlab.sweep", str(spec_file), "--store", str(store1),
                              "--runs-dir", str(runs), "--no-progress"], capture_output=True, text=True)
        rerun_cli = time.perf_counter() - t0
        if cli.returncode != 0 or "ran 0" not in cli.stdout:
            print(cli.stdout, cli.stderr, file=sys.stderr)
        par, s3 = timed(workers=args.workers, store=tmp / "par.sqlite", runs_dir=tmp / "runs-par")

        rows = [
            ("first run, 1 worker", first, f"{first / n:.2f} s/config", f"ran {s1['ran']}, failed {s1['failed']}"),
            ("re-run (API, in process)", rerun, f"{rerun / first:.3%} of first", "target < 5%"),
            ("re-run (CLI, new process)", rerun_cli, f"{rerun_cli / first:.2%} of first", "python + imports"),
            (f"first run, {args.workers} workers", par, f"speed-up x{first / par:.2f}",
             f"ran {s3['ran']}, failed {s3['failed']}"),
        ]
        print(f"\n{'step':<28} {'seconds':>8}  {'ratio':<20} note")
        print("-" * 72)
        for name, secs, ratio, note in rows:
            print(f"{name:<28} {secs:>8.3f}  {ratio:<20} {note}")
        ok = rerun / first < 0.05
        print(f"\nre-run / first = {rerun / first:.4f} ({'meets' if ok else 'MISSES'} the < 0.05 target)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
