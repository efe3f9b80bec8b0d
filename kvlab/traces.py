"""Quality and bits along the sequence: the per-position traces of `kvlab.evaluate` as tables.

`kvlab.evaluate(...).trace` (and the `trace` column of `kvlab.tasks.run_task` rows, read back from
the results store) holds, per scored position averaged over windows, the NLL of the predicted
token, the KL to the fp model and top-1 agreement; in the decode protocol also the bits per element
of the cache each step read, overall and per layer. These functions turn them into long
DataFrames for plotting (`build_trace` makes the trace from the evaluator's per-position sums) (`kvlab.plots.position_curves`, `kvlab.plots.layer_bits_over_steps`):

    df = run_task(lm, "ppl", ["fp16", "kivi-2"], protocol="decode", window=1024, prefill=512, store=store)
    quality = traces.position_frame(df, smooth=32)     # label, position, nll, kl, top1, nll_delta (+ smoothed)
    bits = traces.bits_frame(df)                        # label, tokens, bits
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .errors import KVLabError

if TYPE_CHECKING:
    import torch

QUALITY = ("nll", "kl", "top1")
TRACE_STEPS = 256      # per-layer bits are kept at (at most) this many evenly spaced decode steps


def build_trace(pos_sums: torch.Tensor, pos_count: torch.Tensor, steps: dict | None) -> dict:
    """The trace `kvlab.evaluate` returns: per-position means over windows of `pos_sums` [3, positions]
    (NLL, KL, top-1 summed over windows; `pos_count` windows per position; position = token index in
    the window of the predicted token) and, in decode, the bits of the cache each step read
    (`steps` = `run.step_bits()`), averaged over windows by stored tokens; per-layer bits at no more
    than `TRACE_STEPS` evenly spaced step lengths."""
    import numpy as np

    scored = (pos_count > 0).nonzero().flatten()
    means = (pos_sums.cpu()[:, scored] / pos_count[scored]).tolist()
    trace = {"position": (scored + 1).tolist(), "nll": means[0], "kl": means[1], "top1": means[2]}
    if steps is not None and len(steps["avg_bits"]):
        tokens = np.unique(steps["tokens"])
        at = np.searchsorted(tokens, steps["tokens"])
        count = np.bincount(at, minlength=len(tokens))
        avg = np.bincount(at, weights=steps["avg_bits"], minlength=len(tokens)) / count
        layer = np.stack([np.bincount(at, weights=steps["layer_bits"][:, j], minlength=len(tokens)) / count
                          for j in range(steps["layer_bits"].shape[1])], axis=1)
        keep = np.unique(np.linspace(0, len(tokens) - 1, min(TRACE_STEPS, len(tokens))).round().astype(int))
        trace.update(bits_tokens=tokens.tolist(), bits=avg.tolist(), layer_bits_tokens=tokens[keep].tolist(),
                     layer_bits=layer[keep].tolist())
    return trace


def _rows_with_traces(df) -> list:
    if "trace" not in df.columns:
        raise KVLabError("no 'trace' column: traces come from the perplexity task (kvlab.tasks.run_task(lm, 'ppl', "
                         "...) or kvlab.evaluate(...).trace); a result stored before traces existed has none — "
                         "re-run it with recompute=True")
    rows = [r for _, r in df.iterrows() if isinstance(r["trace"], dict) and r["trace"].get("position")]
    if not rows:
        raise KVLabError("none of these rows has a trace; re-run them with recompute=True to record one")
    return rows


def rolling(values, window: int):
    """Centred moving average over `window` positions (shorter at the ends), as a float numpy array."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    kernel = np.ones(min(window, len(v)))
    num = np.convolve(v, kernel, mode="same")
    den = np.convolve(np.ones_like(v), kernel, mode="same")
    return num / den


def position_frame(df, smooth: int = 1, reference: str | None = "fp16", label: str = "label"):
    """One row per (method, scored position): `nll`, `kl`, `top1`, `nll_delta` (NLL minus the `reference`
    row's NLL at the same position, when that row is present) and, with `smooth` > 1, each smoothed over
    `smooth` positions (`<name>_smooth`)."""
    import pandas as pd

    parts = []
    for r in _rows_with_traces(df):
        t = r["trace"]
        part = pd.DataFrame({"position": t["position"], **{q: t[q] for q in QUALITY}})
        part.insert(0, label, r[label])
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    if reference is not None and (out[label] == reference).any():
        ref = out[out[label] == reference].set_index("position")["nll"]
        out["nll_delta"] = out["nll"] - out["position"].map(ref)
    cols = [c for c in (*QUALITY, "nll_delta") if c in out.columns]
    for c in cols:
        out[f"{c}_smooth"] = out.groupby(label, sort=False)[c].transform(lambda s: rolling(s.to_numpy(), smooth))
    return out


def bits_frame(df, label: str = "label"):
    """One row per (method, decode step): `tokens` (stored tokens the step read) and `bits` (bits per
    element of that cache, fp16 sink/residual and metadata included). Decode-protocol rows only."""
    import pandas as pd

    parts = [pd.DataFrame({label: r[label], "tokens": r["trace"]["bits_tokens"], "bits": r["trace"]["bits"]})
             for r in _rows_with_traces(df) if r["trace"].get("bits_tokens")]
    if not parts:
        raise KVLabError("no per-step bits in these traces: they are recorded in the decode protocol only")
    return pd.concat(parts, ignore_index=True)


def layer_bits_matrix(trace: dict):
    """Bits per element per layer (rows) at the recorded decode steps (columns: stored tokens), a DataFrame."""
    import pandas as pd

    if not trace.get("layer_bits_tokens"):
        raise KVLabError("this trace has no per-layer bits: they are recorded in the decode protocol only")
    mat = pd.DataFrame(trace["layer_bits"], index=trace["layer_bits_tokens"]).T
    mat.index.name, mat.columns.name = "layer", "tokens"
    return mat


def summary(df, labels: Iterable[str] | None = None, parts: int = 4, label: str = "label"):
    """Mean KL and NLL over `parts` equal stretches of the scored positions, per method: where along the
    sequence the error accumulates (a rising KL from the first to the last stretch)."""
    import numpy as np
    import pandas as pd

    frame = position_frame(df, label=label)
    if labels is not None:
        frame = frame[frame[label].isin(list(labels))]
    rows = []
    for name, g in frame.groupby(label, sort=False):
        g = g.sort_values("position")
        for i, idx in enumerate(np.array_split(np.arange(len(g)), parts)):
            chunk = g.iloc[idx]
            rows.append({label: name, "part": i + 1, "positions": f"{chunk['position'].min()}-{chunk['position'].max()}",
                         "kl": chunk["kl"].mean(), "nll": chunk["nll"].mean()})
    return pd.DataFrame(rows)
