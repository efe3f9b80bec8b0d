"""Sensitivity sweeps: which layers, which of K and V, which bit widths and outlier budgets hurt.

* `layer_sensitivity`: quantize one layer's K or V at b bits, everything else full precision
  (the `select` method wrapping an inner method), and measure perplexity / KL to the fp model.
  -> notebooks/02_sensitivity (the layer x bits heatmaps, K vs V asymmetry).
* `outlier_grid`: KVQuant with a dense-and-sparse outlier budget x bits x datatype.
  -> notebooks/03_outliers.
* `evaluate_many`: `kvlab.evaluate` over a list of methods on one spec, reusing results already in a
  results store (a re-run with a full store computes nothing) and writing new ones to it.

Every evaluation goes through `kvlab.evaluate`, so the fp reference logits are computed once per
(model, data) per process and protocols behave exactly as in the other notebooks.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from .errors import KVLabError
from .calibration import calibrate_many
from .evaluation import EvalSpec
from .models import LoadedModel
from .quant.methods import select as _select  # noqa: F401  (registers "select")
from .quant.methods.select import select_spec
from .quant.registry import parse
from .tasks import Perplexity, run_task

RESULT_COLUMNS = ("ppl", "kl", "top1", "avg_bits", "avg_bits_k", "avg_bits_v", "k_rel_err", "v_rel_err")


def evaluate_many(lm: LoadedModel, methods: Iterable[str], spec: EvalSpec | None = None, store=None,
                  progress: bool = True, **spec_kwargs):
    """The perplexity task for each method (spec string) on the same windows (`kvlab.tasks.run_task`).

    With a `kvlab.store.Store`, results already stored for (model, data, method, protocol) are read
    back instead of computed (column `cached` = True) and new ones are written as they finish.
    Columns: label (as given), method (canonical spec), ppl, kl, top1, avg_bits(_k/_v), k/v_rel_err,
    seconds (the method's pass; NaN when cached), cached.
    """
    spec = EvalSpec.from_args(spec, spec_kwargs)
    df = run_task(lm, Perplexity(spec), methods, store=store, progress=progress)
    if "seconds" not in df:
        df["seconds"] = float("nan")
    df = df[["label", "method", *RESULT_COLUMNS, "seconds", "cached"]].copy()
    for c in RESULT_COLUMNS:
        df[c] = df[c].astype(float)
    return df


def fp_reference(lm: LoadedModel, spec: EvalSpec, store=None) -> dict:
    """Metrics of the fp16 (identity) method on `spec`: the baseline every delta is taken against."""
    return evaluate_many(lm, ["fp16"], spec, store=store, progress=False).iloc[0].to_dict()


# ----------------------------------------------------------------------------- per-layer sensitivity
def layer_sensitivity(lm: LoadedModel, bits: Sequence[int] = (2, 3, 4), kinds: Sequence[str] = ("k", "v"),
                      spec: EvalSpec | None = None, layers: Sequence[int] | None = None, store=None,
                      inner: str = "int:bits={bits}", progress: bool = True, **spec_kwargs):
    """Delta perplexity and KL when only one layer's K or V is quantized at b bits.

    For every (kind, layer, bits): `select:inner=<inner with bits>,layers=<layer>,kind=<kind>`,
    all other K/V tensors at full precision. `inner` is a spec template with `{bits}` (default:
    plain asymmetric per-token int-b, the setting under which keys and values differ most);
    `layers=None` means every layer. The fp reference is evaluated once (and its logits cached).

    Returns a DataFrame, one row per (kind, layer, bits): kind, layer, bits, method, ppl, kl,
    top1, avg_bits_k/v (of the whole cache), ppl_fp, delta_ppl (ppl - ppl_fp),
    rel_delta_ppl (ppl / ppl_fp - 1), cached, seconds.
    """
    spec = EvalSpec.from_args(spec, spec_kwargs)
    n_layers = len(_layer_modules(lm))
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise KVLabError(f"layers {bad} do not exist; '{lm.name}' has {n_layers} layers (0-{n_layers - 1})")
    kinds = list(kinds)
    if not kinds or any(k not in ("k", "v", "kv") for k in kinds):
        raise KVLabError(f"kinds must be a non-empty list of 'k', 'v' or 'kv', got {kinds!r}")
    if "{bits}" not in inner:
        raise KVLabError(f"inner={inner!r} must contain '{{bits}}' (e.g. 'int:bits={{bits}}')")
    grid = [(kind, layer, int(b)) for kind in kinds for layer in layers for b in bits]
    specs = [select_spec(inner.format(bits=b), [layer], kind) for kind, layer, b in grid]
    fp = fp_reference(lm, spec, store)
    df = evaluate_many(lm, specs, spec, store=store, progress=progress)
    df.insert(0, "bits", [b for _, _, b in grid])
    df.insert(0, "layer", [layer for _, layer, _ in grid])
    df.insert(0, "kind", [kind for kind, _, _ in grid])
    df["inner"] = [inner.format(bits=b) for _, _, b in grid]
    df["ppl_fp"] = float(fp["ppl"])
    df["delta_ppl"] = df["ppl"] - df["ppl_fp"]
    df["rel_delta_ppl"] = df["ppl"] / df["ppl_fp"] - 1.0
    return df.drop(columns=["label"]).reset_index(drop=True)


def sensitivity_matrix(df, metric: str = "kl", kind: str = "k"):
    """Pivot a `layer_sensitivity` frame to a bits x layer table of `metric` for one kind."""
    sub = df[df["kind"] == kind]
    if sub.empty:
        raise KVLabError(f"no rows for kind={kind!r}; kinds present: {sorted(df['kind'].unique())}")
    return sub.pivot_table(index="bits", columns="layer", values=metric, aggfunc="mean")


def _layer_modules(lm: LoadedModel):
    from .core.arch import find_attention

    return find_attention(lm.model)


# ----------------------------------------------------------------------------- outliers (KVQuant)
def kvquant_spec(bits: int, outliers: float, nuq: bool, extra: str = "") -> str:
    s = f"kvquant:bits={int(bits)},outliers={float(outliers)!r},nuq={'true' if nuq else 'false'}"
    return s + ("," + extra.strip(",") if extra and extra.strip(",") else "")


def outlier_grid(lm: LoadedModel, bits: Sequence[int] = (2, 3, 4),
                 ratios: Sequence[float] = (0.0, 0.005, 0.01, 0.02, 0.05), nuq: Sequence[bool] = (False, True),
                 spec: EvalSpec | None = None, store=None, extra: str = "", baseline: str | None = "int:bits={bits}",
                 progress: bool = True, **spec_kwargs):
    """KVQuant dense-and-sparse: quality for every (datatype, bits, outlier ratio).

    Each config is `kvquant:bits=b,outliers=r,nuq=true|false[,extra]` (e.g. extra="fisher=false").
    Calibration is shared: the calibration windows are captured once and every config is fitted
    from that capture (`kvlab.calibration.calibrate_many`), then cached on disk where each
    `kvlab.evaluate` that follows reads it.
    `baseline` (a template with `{bits}`, or None) adds a plain uniform row per bit width.
    Returns a DataFrame: family ("nuq" / "int" / "baseline"), bits, outliers, method, ppl, kl, top1,
    avg_bits, ..., ppl_fp, delta_ppl.
    """
    spec = EvalSpec.from_args(spec, spec_kwargs)
    rows = [("nuq" if q else "int", int(b), float(r), kvquant_spec(b, r, q, extra))
            for q in nuq for b in bits for r in ratios]
    if baseline:
        if "{bits}" not in baseline:
            raise KVLabError(f"baseline={baseline!r} must contain '{{bits}}'")
        rows += [("baseline", int(b), 0.0, baseline.format(bits=b)) for b in bits]
    methods = [m for *_, m in rows]
    for m in methods:
        parse(m)
    todo = methods if store is None else [m for m in methods if store.get_result(
        lm.model_id, spec.key, parse(m).spec, spec.protocol, Perplexity(spec=spec).required) is None]
    calibrate_many(lm, todo, data=spec.data, n_tokens=spec.calib_tokens, window=spec.window, skip=spec.n_tokens)
    fp = fp_reference(lm, spec, store)
    df = evaluate_many(lm, methods, spec, store=store, progress=progress)
    df.insert(0, "outliers", [r for _, _, r, _ in rows])
    df.insert(0, "bits", [b for _, b, _, _ in rows])
    df.insert(0, "family", [f for f, _, _, _ in rows])
    df["ppl_fp"] = float(fp["ppl"])
    df["kl_fp"] = float(fp["kl"])
    df["delta_ppl"] = df["ppl"] - df["ppl_fp"]
    return df.drop(columns=["label"]).reset_index(drop=True)
