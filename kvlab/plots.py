"""Plotting helpers with one house style; every figure is saved as PNG + PDF under figures/<notebook>/."""
from __future__ import annotations

from pathlib import Path

import matplotlib

from .paths import REPO_ROOT

PALETTE = "colorblind"


def style() -> None:
    """Apply the kvlab house style (seaborn whitegrid, readable fonts, tight layout)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE,
                  rc={"figure.dpi": 110, "savefig.dpi": 200, "axes.titleweight": "bold",
                      "figure.constrained_layout.use": True})


def figures_dir(notebook: str, root: str | Path | None = None) -> Path:
    path = Path(root) if root is not None else REPO_ROOT / "figures" / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(fig: "matplotlib.figure.Figure", name: str, folder: str | Path) -> list[Path]:
    """Save `fig` as `<folder>/<name>.png` and `.pdf`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for p in out:
        fig.savefig(p, bbox_inches="tight")
    return out


# ----------------------------------------------------------------------------- words for columns and methods
# The one mapping from result columns to axis / legend words (with units). Every function here labels its
# axes through `axis_label`; a column missing here is shown as its own name.
LABELS: dict[str, str] = {
    "avg_bits": "average bits per K/V element",
    "avg_bits_k": "average bits per K element",
    "avg_bits_v": "average bits per V element",
    "avg_bits_end": "average bits per K/V element (cache at the end)",
    "avg_bits_step_mean": "average bits per K/V element (mean over decode steps)",
    "bits": "bits per K/V element",
    "k_bits": "bits per K element",
    "v_bits": "bits per V element",
    "budget_bits": "allocated bits per K/V element",
    "ppl": "perplexity",
    "ppl_pct": "perplexity increase over fp16 (%)",
    "ppl_pd": "perplexity, prefill-decode",
    "ppl_decode": "perplexity, deployed decode",
    "delta_ppl_pct": "perplexity change (%)",
    "rel_delta_ppl": "relative perplexity change",
    "kl": "KL to fp16 (nats/token)",
    "nll": "negative log-likelihood (nats/token)",
    "nll_delta": "NLL minus NLL of fp16 (nats/token)",
    "top1": "top-1 agreement with fp16 (fraction of tokens)",
    "k_rel_err": "relative K error ||K^ - K|| / ||K||",
    "v_rel_err": "relative V error ||V^ - V|| / ||V||",
    "attn_rel_err": "relative attention-output error",
    "rel_err": "relative error ||x^ - x|| / ||x||",
    "acc": "accuracy (fraction correct)",
    "agree_fp": "same answer as fp16 (fraction of examples)",
    "rougeL": "ROUGE-L F1 against the reference summary",
    "rougeL_fp": "ROUGE-L F1 against the fp16 model's summary",
    "exact": "exact-match accuracy (fraction)",
    "digits": "key digits correct (fraction)",
    "position": "position in the window (tokens)",
    "tokens": "tokens in the cache",
    "context": "context length (tokens)",
    "depth": "needle depth (fraction of the context)",
    "outliers": "outliers kept in fp16 (% of values)",
    "layer": "layer index",
    "label": "method",
    "method": "method",
    "family": "method family",
    "tensor": "K/V tensor",
    "statistic": "summary statistic",
    "variant": "variant",
    "protocol": "protocol",
    "width": "bit width",
    "b": "bit width",
}
_SUFFIXES = {"_smooth": "smoothed", "_pct": "%"}


def axis_label(column: str) -> str:
    """Words with units for a result column (`LABELS`); `<col>_smooth` adds "(smoothed)"; unknown: the name."""
    column = str(column)
    if column in LABELS:
        return LABELS[column]
    if column.endswith("_smooth") and column[:-7] in LABELS:
        base = LABELS[column[:-7]]
        return base[:-1] + ", smoothed)" if base.endswith(")") else base + " (smoothed)"
    return column


_NAMES = {"fp16": "fp16", "int": "int", "kivi": "KIVI", "kvquant": "KVQuant", "qaq": "QAQ", "pmkvq": "PM-KVQ",
          "qhitter": "Q-Hitter", "h2o": "H2O", "quarot": "QuaRot", "hf": "HF QuantizedCache", "select": "select"}


def _bits_head(m, name: str, sep: str = "") -> str:
    vb = getattr(m, "v_bits", None)
    return f"{name}{sep}{m.bits}" if vb in (None, m.bits) else f"{name}{sep}K{m.bits}/V{vb}"


# head of a method's label, and the fields that head already shows
_HEADS = {
    "int": (lambda m: _bits_head(m, "int"), ("bits", "v_bits")),
    "kivi": (lambda m: _bits_head(m, "KIVI ", "") + "-bit" if getattr(m, "v_bits", None) in (None, m.bits)
             else _bits_head(m, "KIVI "), ("bits", "v_bits")),
    "quarot": (lambda m: _bits_head(m, "QuaRot int"), ("bits", "v_bits")),
    "kvquant": (lambda m: f"KVQuant {'nf' if m.nf else 'nuq' if m.nuq else 'int'}{m.bits}", ("bits", "nuq", "nf")),
    "pmkvq": (lambda m: f"PM-KVQ {m.budget:g} bits", ("budget",)),
    "hf": (lambda m: f"HF {m.backend}" + (f" int{m.nbits}" if m.nbits else ""), ("backend", "nbits")),
    "qhitter": (lambda m: f"Q-Hitter int{m.bits}", ("bits",)),
}
_FIELD_WORDS = {
    "outliers": lambda v: f"{100 * v:g}% outliers" if v else "no outliers",
    "group": lambda v: f"group {v}" if v is not None else "no groups",
    "residual": lambda v: f"fp16 window {v}",
    "sink": lambda v: f"{v} sink token" + ("s" if v != 1 else ""),
    "k_axis": lambda v: f"K per-{v}",
    "v_axis": lambda v: f"V per-{v}",
    "qnorm": lambda v: "Q-Norm" if v else "no Q-Norm",
    "symmetric": lambda v: "symmetric" if v else "asymmetric",
    "attention_aware": lambda v: "attention-aware" if v else "not attention-aware",
    "flush": lambda v: f"{v} flush",
    "axis_key": lambda v: "K per-channel" if v == -1 else f"K axis {v}",
    "axis_value": lambda v: "V per-channel" if v == -1 else f"V axis {v}",
    "budget": lambda v: f"{v:g} bits",
}


def _field_default(f):
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
        return f.default_factory()                       # type: ignore[misc]
    return dataclasses.MISSING


def _describe(m) -> str:
    from .quant.base import config_fields, _fmt

    if m.name == "select":
        inner = method_label(m.inner)
        where = "all layers" if str(m.layers) == "all" else f"layer{'s' if ',' in str(m.layers) else ''} {m.layers}"
        what = {"k": ", K only", "v": ", V only"}.get(str(m.kind), "")
        return f"{inner} on {where}{what}"
    head, shown = _HEADS.get(m.name, (lambda m: _NAMES.get(m.name, m.name), ()))
    parts = []
    for f in config_fields(m):
        if f.name in shown:
            continue
        v, d = getattr(m, f.name), _field_default(f)
        if v == d:
            continue
        words = _FIELD_WORDS.get(f.name)
        parts.append(words(v) if words is not None else f"{f.name}={'none' if v is None else _fmt(v)}")
    text = head(m)
    return f"{text} {', '.join(parts)}" if parts else text


def method_label(spec) -> str:
    """A readable name for a method spec: a preset stays its name ("kivi-2"), a spec string shows the
    method and only the fields that differ from the method's defaults ("kvquant:bits=2,fisher=activation,
    outliers=0.01" -> "KVQuant nuq2 1% outliers"); anything that does not parse is returned unchanged."""
    from .quant.base import Method
    from .quant.registry import PRESETS, parse

    if isinstance(spec, Method):
        return _describe(spec)
    if not isinstance(spec, str):
        return str(spec)
    s = spec.strip()
    try:
        m = parse(s)                 # also registers the methods and presets
    except Exception:  # noqa: BLE001 - a free-form label ("QAQ attention-aware"): shown as it is
        return spec
    if s in PRESETS:
        return s
    try:
        return _describe(m)
    except Exception:  # noqa: BLE001 - a method with unusual fields: its spec string
        return spec


def _method_names(values) -> list[str]:
    return [method_label(v) for v in values]


# ----------------------------------------------------------------------------- log axes, clipped axes, labels
ZERO_LABEL = "0 (fp16)"


def log_floor(values) -> float:
    """Where to draw values <= 0 on a log axis: one decade below the power of ten under the smallest
    positive value (1e-6 when there is none)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    pos = v[np.isfinite(v) & (v > 0)]
    if not pos.size:
        return 1e-6
    return float(10.0 ** (np.floor(np.log10(pos.min())) - 1))


def _floored(values, floor: float | None):
    """`values` (array) with entries <= 0 replaced by `floor` (None: unchanged)."""
    import numpy as np

    v = np.asarray(values, dtype=float).copy()
    if floor is not None:
        v[np.isfinite(v) & (v <= 0)] = floor
    return v


def _needs_floor(values) -> bool:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return bool((np.isfinite(v) & (v <= 0)).any())


def _mark_floor(ax, floor: float, axis: str = "y", text: str = ZERO_LABEL) -> None:
    """A dashed line at `floor` with a legend entry saying that zeros are drawn there."""
    kw = dict(ls="--", color="0.45", lw=0.9, zorder=1, label=f"{text}, drawn at {floor:.0e} (log axis)")
    (ax.axhline if axis == "y" else ax.axvline)(floor, **kw)


def clip_top(values, log: bool, ref: float | None = None) -> float | None:
    """Upper axis limit that keeps a few huge values from squashing the rest, or None (nothing to clip).

    The rule: in log10
    units when `log`, Tukey's far-out fence q3 + 3 IQR of the values, at least one decade (log) or 50% of
    the value range (linear) above q3 and never below `ref`; values above it are drawn at the limit as
    triangles with their value printed."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if v.size < 4:
        return None
    t = np.log10(v) if log else v
    q1, q3 = np.percentile(t, [25, 75])
    span = float(t.max() - t.min())
    fence = q3 + max(3 * (q3 - q1), 1.0 if log else 0.5 * span)
    if ref is not None and np.isfinite(ref) and (ref > 0 or not log):
        fence = max(fence, np.log10(ref) if log else ref)
    if t.max() <= fence:
        return None
    return float(10 ** fence) if log else float(fence)


def _draw_clipped(ax, xs, ys, top: float | None, color, note: list) -> "object":
    """`ys` with values above `top` set to `top`; a triangle and the true value at each clipped point."""
    import numpy as np

    ys = np.asarray(ys, dtype=float)
    if top is None:
        return ys
    over = np.isfinite(ys) & (ys > top)
    for x, y in zip(np.asarray(xs, dtype=float)[over], ys[over]):
        ax.scatter([x], [top], marker="^", s=60, color=color, zorder=5, clip_on=False)
        ax.annotate(f"{y:.3g}", (x, top), textcoords="offset points", xytext=(7, -2), ha="left", va="top",
                    fontsize=7, color=color)
        note.append(y)
    return np.where(over, top, ys)


def _clip_note(ax, note: list) -> None:
    if note:
        ax.scatter([], [], marker="^", s=40, color="0.3", label="above the axis: drawn at the top, value printed")


_CANDIDATES = [(5, 3), (5, -3), (-5, 3), (-5, -3), (0, 9), (0, -9), (10, 10), (10, -10), (-10, 10), (-10, -10),
               (16, 0), (-16, 0), (0, 16), (0, -16), (20, 16), (20, -16), (-20, 16), (-20, -16), (0, 26), (0, -26),
               (30, 0), (-30, 0), (28, 26), (28, -26), (-28, 26), (-28, -26), (0, 36), (0, -36)]


def place_labels(ax, xs, ys, texts, fontsize: float = 7.5, bold=None, colors=None) -> list:
    """Label points without overlaps: each label takes the first of a fixed list of offsets (near to far)
    whose box overlaps no label placed before, no point and stays inside the axes; when none is free, the
    one with the least overlap. Deterministic (points taken left to right). Labels away from their point
    get a thin leader line. Call after the axes' scales and limits are set. Returns the annotations."""
    import numpy as np

    fig = ax.figure
    try:
        fig.draw_without_rendering()           # settle the (constrained) layout before measuring
    except Exception:  # noqa: BLE001 - measuring in the current layout is good enough
        pass
    renderer = fig.canvas.get_renderer()
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    pts = ax.transData.transform(np.column_stack([xs, ys])[ok]) if ok.any() else np.zeros((0, 2))
    r = 4.0 * fig.dpi / 72
    point_boxes = [(px - r, py - r, px + r, py + r) for px, py in pts]
    frame = ax.get_window_extent(renderer)
    placed, out = [], []

    def overlap(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(np.flatnonzero(ok), key=lambda i: (xs[i], ys[i]))
    for i in order:
        best = None
        for dx, dy in _CANDIDATES:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy >= 0 else "top"
            ann = ax.annotate(str(texts[i]), (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy),
                              ha=ha, va=va, fontsize=fontsize, annotation_clip=False,
                              fontweight="bold" if bold is not None and bold[i] else "normal",
                              color=colors[i] if colors is not None else None)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            cost = sum(overlap(box, p) for p in placed) + sum(overlap(box, p) for p in point_boxes)
            inside = overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost += 2 * ((box[2] - box[0]) * (box[3] - box[1]) - inside)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box, (dx, dy))
            else:
                ann.remove()
            if cost == 0:
                break
        cost, ann, box, (dx, dy) = best
        if abs(dx) + abs(dy) > 18:
            ann.arrow_patch = None
            ann.remove()
            ann = ax.annotate(ann.get_text(), (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy),
                              ha=ann.get_ha(), va=ann.get_va(), fontsize=fontsize, annotation_clip=False,
                              fontweight=ann.get_fontweight(), color=ann.get_color(),
                              arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=0, shrinkB=3))
        ann.set_in_layout(False)
        placed.append(box)
        out.append(ann)
    return out


def quality_vs_bits(df, y: str = "ppl", hue: str = "label", ax=None, logy: bool = True, title: str | None = None,
                    x: str = "avg_bits"):
    """Scatter of average bits per element vs a quality metric, one point per method, labelled with its
    readable name (`method_label`) without overlaps. On a log axis a value of 0 (fp16's KL) is drawn at a
    dashed floor named in the legend, never dropped."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    d = df[df[x].notna() & df[y].notna()]
    xs, ys = d[x].to_numpy(dtype=float), d[y].to_numpy(dtype=float)
    floor = log_floor(ys) if logy and _needs_floor(ys) else None
    ys = _floored(ys, floor)
    names = _method_names(d[hue])
    for i, (xv, yv) in enumerate(zip(xs, ys)):
        ax.scatter([xv], [yv], s=70, color=f"C{i % 10}", zorder=3)
    if logy:
        ax.set_yscale("log")
    if floor is not None:
        _mark_floor(ax, floor)
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(axis_label(x) + " (scales, zeros and fp16 tokens included)" if x == "avg_bits" else axis_label(x))
    ax.set_ylabel(axis_label(y))
    if np.isfinite(xs).any():
        lo, hi = float(np.nanmin(xs)), float(np.nanmax(xs))
        pad = max(0.6, 0.08 * (hi - lo))
        ax.set_xlim(lo - pad, hi + 2.5 * pad)
    if title:
        ax.set_title(title)
    place_labels(ax, xs, ys, names, fontsize=8)
    return ax


# ----------------------------------------------------------------------------- matrices, layers, curves
def _norm(values, log: bool, vmin=None, vmax=None, symlog: float | None = None):
    """A colour normalisation for `values`: log (positive part), symmetric log around 0, or linear."""
    import numpy as np
    from matplotlib import colors

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if symlog is not None:
        lim = max(abs(vmin) if vmin is not None else 0.0, abs(vmax) if vmax is not None else 0.0,
                  float(np.abs(v).max()) if v.size else 1.0, symlog * 10)
        return colors.SymLogNorm(linthresh=symlog, vmin=-lim, vmax=lim, base=10)
    if log:
        pos = v[v > 0]
        lo = vmin if vmin is not None else (float(pos.min()) if pos.size else 1e-6)
        hi = vmax if vmax is not None else (float(pos.max()) if pos.size else 1.0)
        return colors.LogNorm(vmin=lo, vmax=max(hi, lo * 10))
    return colors.Normalize(vmin=vmin if vmin is not None else (float(v.min()) if v.size else 0.0),
                            vmax=vmax if vmax is not None else (float(v.max()) if v.size else 1.0))


def heatmap(matrix, ax=None, norm=None, cmap: str = "viridis", xlabel: str | None = None, ylabel: str | None = None,
            title: str | None = None, cbar_label: str | None = None, annotate: bool = False, fmt: str = "{:.2g}",
            xticks=None, yticks=None, cbar: bool = True):
    """Draw a 2-D array or DataFrame (rows on y, top row first) with `imshow`; returns the image.

    A DataFrame's index/columns label the ticks; `norm` is a matplotlib normalisation (see `_norm`);
    `annotate` writes each value in its cell (for small matrices).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    rows = list(getattr(matrix, "index", range(np.shape(matrix)[0])))
    cols = list(getattr(matrix, "columns", range(np.shape(matrix)[1])))
    data = np.asarray(matrix, dtype=float)
    if norm is not None and hasattr(norm, "vmin") and isinstance(norm, matplotlib.colors.LogNorm):
        data = np.where(data > 0, data, np.nan)   # non-positive cells: blank, not a colour
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.grid(False)
    if xticks is not False:
        pos = range(len(cols)) if xticks is None else xticks
        if len(cols) <= 40 or xticks is not None:
            ax.set_xticks(list(pos), [str(cols[i]) for i in pos], fontsize=8)
    if yticks is not False:
        pos = range(len(rows)) if yticks is None else yticks
        if len(rows) <= 40 or yticks is not None:
            ax.set_yticks(list(pos), [str(rows[i]) for i in pos], fontsize=8)
    if annotate:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if np.isfinite(data[i, j]):
                    r, g, b, _ = im.cmap(im.norm(data[i, j]))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5      # text colour by the cell's luminance
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=6.5,
                            color="white" if dark else "black")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if cbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
        if cbar_label:
            cb.set_label(cbar_label)
    return im


def sensitivity_heatmaps(df, metric: str = "kl", kinds=("k", "v"), log: bool = True, symlog: float | None = None,
                         cbar_label: str | None = None, title: str | None = None, annotate: bool | None = None):
    """K and V heatmaps (bits x layer) of `metric` from `kvlab.sensitivity.layer_sensitivity`, one shared
    colour scale so the two panels compare directly. Returns the figure."""
    import matplotlib.pyplot as plt

    mats = {k: df[df["kind"] == k].pivot_table(index="bits", columns="layer", values=metric) for k in kinds}
    mats = {k: m.sort_index(ascending=True) for k, m in mats.items() if not m.empty}
    n_layers = max(m.shape[1] for m in mats.values())
    if annotate is None:
        annotate = n_layers <= 32
    import numpy as np
    allv = np.concatenate([m.to_numpy().ravel() for m in mats.values()])
    norm = _norm(allv, log=log, symlog=symlog)
    fig, axes = plt.subplots(len(mats), 1, figsize=(max(7.0, 0.36 * n_layers + 2.5), 1.0 + 1.05 * sum(
        m.shape[0] for m in mats.values()) + 0.5 * len(mats)), squeeze=False)
    names = {"k": "keys (K)", "v": "values (V)", "kv": "K and V"}
    for ax, (kind, m) in zip(axes[:, 0], mats.items()):
        heatmap(m, ax=ax, norm=norm, cmap="magma_r", ylabel="bit width (bits per element)",
                title=f"{names.get(kind, kind)} quantized", annotate=annotate,
                cbar_label=cbar_label or axis_label(metric))
        ax.set_xlabel("layer (only this layer's tensor quantized)")
    if title:
        fig.suptitle(title)
    return fig


def layer_lines(df, y: str, hue: str = "tensor", style: str | None = None, x: str = "layer", ax=None,
                logy: bool = False, title: str | None = None, ylabel: str | None = None, markers: bool = True):
    """Line plot of a per-layer statistic (one line per `hue` / `style` value). Returns the axes.
    Axis and legend words come from `axis_label`; on a log axis zeros are drawn at a marked floor."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    d = df.copy()
    floor = log_floor(d[y]) if logy and _needs_floor(d[y]) else None
    if floor is not None:
        d[y] = _floored(d[y], floor)
    names = {c: axis_label(c) for c in (hue, style) if c}
    d = d.rename(columns=names)
    sns.lineplot(data=d, x=x, y=y, hue=names.get(hue, hue), style=names.get(style, style) if style else None,
                 markers=markers, dashes=style is not None, ax=ax, markersize=5)
    if logy:
        ax.set_yscale("log")
    if floor is not None:
        _mark_floor(ax, floor)
        ax.legend(fontsize=8)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(ylabel or axis_label(y))
    if title:
        ax.set_title(title)
    return ax


def channel_maps(maps: dict, head_dim: int | None = None, log: bool = True, title: str | None = None,
                 cbar_label: str = "per-channel absmax"):
    """One heatmap (layer x channel) per named [layers, channels] array, shared colour scale, with
    lines between KV heads when `head_dim` is given. Returns the figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = {k: np.asarray(v, dtype=float) for k, v in maps.items()}
    allv = np.concatenate([a.ravel() for a in arrays.values()])
    norm = _norm(allv, log=log)
    n_layers, n_ch = next(iter(arrays.values())).shape
    fig, axes = plt.subplots(1, len(arrays), figsize=(4.6 * len(arrays) + 1, 1.2 + 0.16 * max(n_layers, 12)),
                             squeeze=False, sharey=True)
    step = max(1, n_layers // 10)
    for i, (ax, (name, a)) in enumerate(zip(axes[0], arrays.items())):
        im = heatmap(a, ax=ax, norm=norm, cmap="magma", title=name, cbar=False, xticks=False,
                     yticks=list(range(0, n_layers, step)))
        ax.set_xlabel("channel (KV head x head_dim)")
        if i == 0:
            ax.set_ylabel("layer index")
        if head_dim:
            for h in range(head_dim, n_ch, head_dim):
                ax.axvline(h - 0.5, color="white", lw=0.8, alpha=0.8)
            ticks = list(range(0, n_ch, head_dim))
            ax.set_xticks(ticks, [f"h{t // head_dim}" for t in ticks], fontsize=8)
    cb = fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01)
    cb.set_label(cbar_label)
    if title:
        fig.suptitle(title)
    return fig


def outlier_curves(df, y: str = "ppl", families=None, ref: float | None = None, logy: bool = True,
                   x: str = "outliers", title: str | None = None, clip: bool = True):
    """Quality vs outlier ratio (or vs `x`), one panel per datatype family, one line per bit width.

    `df` comes from `kvlab.sensitivity.outlier_grid`; `ref` draws the fp value as a dashed line; the
    per-token int baselines are dotted lines. y-range: with `clip`, a few values far above the rest (e.g.
    2-bit with no outliers on a small model) do not squash the curves: the axis stops at `clip_top` (Tukey's
    far-out fence, in decades on a log axis) and those points are drawn at the top as triangles with their
    value printed; baselines above it are listed as "off scale". On a log axis zeros are drawn at a marked
    floor. Returns the figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    families = families or [f for f in ("int", "nuq") if f in set(df["family"])]
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.0), squeeze=False, sharey=True)
    names = {"int": "KVQuant, uniform datatype (nuq=false)", "nuq": "KVQuant, non-uniform datatype (nuq=true)"}
    base = df[df["family"] == "baseline"]
    main = df[df["family"].isin(families)][y].to_numpy(dtype=float)
    floor = log_floor(np.concatenate([main, base[y].to_numpy(dtype=float)])) \
        if logy and _needs_floor(np.concatenate([main, base[y].to_numpy(dtype=float)])) else None
    top = clip_top(_floored(main, floor), log=logy, ref=ref) if clip else None
    limit = top if top is not None else float(np.nanmax(main)) * (3.0 if logy else 1.3)
    all_bits = sorted(set(df[df["family"].isin(families)]["bits"]))
    note: list = []
    for ax, fam in zip(axes[0], families):
        note = []
        sub = df[df["family"] == fam]
        for b, g in sub.groupby("bits", sort=True):
            g = g.sort_values(x)
            xs = (100 * g[x] if x == "outliers" else g[x]).to_numpy(dtype=float)
            color = f"C{all_bits.index(b) % 10}"
            ys = _draw_clipped(ax, xs, _floored(g[y], floor), top, color, note)
            ax.plot(xs, ys, marker="o", color=color, label=f"{int(b)} bits", lw=1.6)
        off = []
        for _, r in base.iterrows():
            if x != "outliers":
                continue
            name = f"int{int(r['bits'])} per token"
            yv = _floored([r[y]], floor)[0]
            if yv > limit:
                off.append(f"{name}: {r[y]:.3g}")
                continue
            ax.axhline(yv, ls=":", lw=1, color="grey")
            ax.annotate(name, (1.0, yv), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        ha="right", va="bottom")
        if off:
            ax.text(0.99, 0.98, "off scale: " + ", ".join(off), transform=ax.transAxes, fontsize=7, color="grey",
                    ha="right", va="top")
        if ref is not None:
            ax.axhline(ref, ls="--", color="black", lw=1, label="fp16")
        if floor is not None:
            _mark_floor(ax, floor)
        if logy:
            ax.set_yscale("log")
        if top is not None:
            ax.set_ylim(top=top)
        _clip_note(ax, note)
        ax.legend(fontsize=8, title=None)
        ax.set_xlabel(axis_label("outliers") if x == "outliers" else axis_label(x))
        ax.set_ylabel(axis_label(y))
        ax.set_title(names.get(fam, fam), fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def bits_tradeoff(df, y: str = "kl", x: str = "avg_bits", line_by=("family", "bits"), label: str | None = "outliers",
                  ref: float | None = None, ax=None, logy: bool = True, title: str | None = None, clip: bool = True):
    """Quality vs average bits with one line per `line_by` group (e.g. one KVQuant datatype and bit
    width across outlier ratios), points labelled by `label` (ratios as %) without overlaps. Values far
    above the rest are clipped as in `outlier_curves`; zeros on a log axis drawn at a marked floor.
    Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"int": ("o", "-"), "nuq": ("s", "-"), "baseline": ("x", ":")}
    fam_words = {"int": "KVQuant int", "nuq": "KVQuant nuq", "baseline": "int per token"}
    floor = log_floor(df[y]) if logy and _needs_floor(df[y]) else None
    top = clip_top(_floored(df[y], floor), log=logy, ref=ref) if clip else None
    colors, note, pts = {}, [], []
    for key, sub in df.sort_values(x).groupby(list(line_by), sort=True):
        fam, bits = key if isinstance(key, tuple) else (key, None)
        c = colors.setdefault(bits, f"C{len(colors)}")
        mk, ls = styles.get(fam, ("o", "-"))
        xs = sub[x].to_numpy(dtype=float)
        ys = _draw_clipped(ax, xs, _floored(sub[y], floor), top, c, note)
        name = fam_words.get(fam, str(fam))
        ax.plot(xs, ys, marker=mk, ls=ls, color=c, label=f"{name}, {int(bits)} bits" if bits is not None else name)
        if label and fam != "baseline":
            pts += [(xv, yv, f"{100 * r:g}%", c) for xv, yv, r in zip(xs, ys, sub[label])]
    if ref is not None:
        ax.axhline(ref, ls="--", color="black", lw=1, label="fp16")
    if floor is not None:
        _mark_floor(ax, floor)
    if logy:
        ax.set_yscale("log")
    if top is not None:
        ax.set_ylim(top=top)
    _clip_note(ax, note)
    ax.set_xlabel(axis_label(x) + " (outliers, scales and sink tokens included)" if x == "avg_bits" else axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title)
    if pts:
        place_labels(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], fontsize=6.5,
                     colors=[p[3] for p in pts])
    return ax


# ----------------------------------------------------------------------------- token maps, Pareto fronts, retrieval
def token_maps(panels, xlabel: str = "token position", title: str | None = None, width: float = 11.0,
               row_height: float | None = None, marks=None):
    """Stack 2-D maps that share their x axis (tokens) in one column, each with its own colour bar.

    `panels`: list of dicts with `data` ([rows, tokens] array or DataFrame) and optional `title`, `cmap`,
    `log` (log colour scale, zeros blank), `vmin`, `vmax`, `cbar` (colour-bar label), `ylabel`, `yticks`.
    `marks`: optional {token index: label} drawn as dashed vertical lines on every panel (e.g. the needle).
    Returns the figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [np.asarray(p["data"], dtype=float).shape[0] for p in panels]
    rh = row_height if row_height is not None else (0.09 if max(rows) > 8 else 0.28)
    heights = [max(1.1, rh * r + 0.5) for r in rows]
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, sum(heights) + 0.8), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, p in zip(axes[:, 0], panels):
        data = np.asarray(p["data"], dtype=float)
        norm = _norm(data, log=p.get("log", False), vmin=p.get("vmin"), vmax=p.get("vmax"))
        n = data.shape[0]
        yt = p.get("yticks")
        if yt is None:
            step = max(1, n // 6)
            yt = list(range(0, n, step))
        heatmap(data, ax=ax, norm=norm, cmap=p.get("cmap", "viridis"), title=p.get("title"),
                ylabel=p.get("ylabel"), cbar_label=p.get("cbar"), xticks=False, yticks=yt)
        ax.title.set_fontsize(10)
        for x, lab in (marks or {}).items():
            ax.axvline(x, color="red", ls="--", lw=0.9, alpha=0.8)
    ax = axes[-1, 0]
    T = np.asarray(panels[-1]["data"]).shape[1]
    step = max(1, int(round(T / 8 / 32)) * 32) if T > 64 else max(1, T // 8)
    ax.set_xticks(list(range(0, T, step)), [str(t) for t in range(0, T, step)], fontsize=8)
    ax.set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    return fig


def pareto_mask(df, x: str = "avg_bits", y: str = "ppl"):
    """Boolean Series: rows no other row beats on both `x` and `y` (lower is better on both; ties kept)."""
    import numpy as np
    import pandas as pd

    xs, ys = df[x].to_numpy(dtype=float), df[y].to_numpy(dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    mask = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        mask[i] = not dominated.any()
    return pd.Series(mask, index=df.index, name="pareto")


def pareto_plot(df, x: str = "avg_bits", y: str = "ppl", label: str = "label", group: str | None = "family",
                ax=None, ref: float | None = None, logy: bool | str = True, title: str | None = None,
                xlabel: str | None = None, ylabel: str | None = None, budget: float | None = None,
                legend: str | None = "inside", linthresh: float = 0.1, max_labels: int = 24):
    """Quality vs bits, one point per method (marker/colour by `group`), the Pareto-optimal points ringed
    and joined by a step line, every point labelled with its readable name (`method_label`), labels nudged
    apart so none overlaps (`place_labels`); with more than `max_labels` points the points are numbered
    and the names go to a key beside the axes. `ref` draws the fp value; `budget` a vertical line.
    `logy`: True (log; a value of 0, e.g. fp16's KL, is drawn at a dashed floor named in the legend),
    "symlog" (symmetric log, linear within +-`linthresh`: for changes that may be negative) or False.
    `legend`: "inside", "outside" (right of the axes) or None."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    d = df[df[y].notna() & df[x].notna()].copy()
    d["_pareto"] = pareto_mask(d, x, y)
    floor = log_floor(d[y]) if logy is True and _needs_floor(d[y]) else None
    d["_y"] = _floored(d[y], floor)
    groups = list(dict.fromkeys(d[group])) if group else [None]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, g in enumerate(groups):
        sub = d if g is None else d[d[group] == g]
        ax.scatter(sub[x], sub["_y"], s=46, marker=markers[i % len(markers)], color=f"C{i % 10}",
                   label=_NAMES.get(str(g), str(g)) if g is not None else None, zorder=3)
    front = d[d["_pareto"]].sort_values(x)
    ax.scatter(front[x], front["_y"], s=190, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4,
               label="Pareto-optimal")
    ax.step(front[x], front["_y"], where="post", color="black", lw=1, alpha=0.6, zorder=2)
    if ref is not None:
        ax.axhline(ref, ls="--", color="black", lw=1, label="fp16")
    if floor is not None:
        _mark_floor(ax, floor)
    if budget is not None:
        ax.axvline(budget, ls=":", color="grey", lw=1, label=f"budget {budget:g} bits")
    if logy == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh)
    elif logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or axis_label(x))
    ax.set_ylabel(ylabel or axis_label(y))
    if title:
        ax.set_title(title)
    names = _method_names(d[label])
    keyed = len(d) > max_labels
    if keyed:
        names = [str(i + 1) for i in range(len(d))]
        key = "\n".join(f"{i + 1}: {n}" for i, n in enumerate(_method_names(d[label])))
        ax.text(1.02, 0.0, key, transform=ax.transAxes, fontsize=6.5, va="bottom", ha="left")
    if legend == "outside" and keyed:            # the key holds the right side: the legend goes below the axes
        n_entries = len(ax.get_legend_handles_labels()[1])
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(4, max(n_entries, 1)),
                  frameon=False)
    elif legend == "outside":
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif legend:
        ax.legend(fontsize=7, loc="upper right")
    place_labels(ax, d[x], d["_y"], names, fontsize=7, bold=d["_pareto"].to_numpy())
    return ax


def retrieval_heatmaps(df, value: str = "exact", by: str = "label", index: str = "depth", columns: str = "context",
                       title: str | None = None, cbar_label: str = "retrieval accuracy"):
    """One heatmap per method: needle depth (rows) x context length (columns), colour = mean of `value`
    over the cell's examples (0..1), annotated. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib import colors

    names = list(dict.fromkeys(df[by]))
    n = len(names)
    ncol = min(n, 3)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol + 1.2, 2.9 * nrow + 0.4), squeeze=False)
    norm = colors.Normalize(0, 1)
    im = None
    for ax, name in zip(axes.ravel(), names):
        m = df[df[by] == name].pivot_table(index=index, columns=columns, values=value, aggfunc="mean")
        im = heatmap(m, ax=ax, norm=norm, cmap="RdYlGn", annotate=True, fmt="{:.2f}", cbar=False,
                     xlabel=axis_label("context"), ylabel=axis_label("depth"))
        ax.set_title(method_label(name), fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes.ravel()[:n]), fraction=0.025, pad=0.02)
        cb.set_label(cbar_label)
    if title:
        fig.suptitle(title)
    return fig


def matched_bits(df, y: str = "kl", x: str = "bits", line: str = "variant", protocol: str = "protocol",
                 logy: bool = True, title: str | None = None, ref=None):
    """Quality vs bits per protocol panel: one line per `line` value (e.g. QAQ attention-aware on/off),
    sorted by bits, uniform points as crosses (rows whose `line` value starts with "uniform"). On a log
    axis zeros are drawn at a marked floor."""
    import matplotlib.pyplot as plt

    prots = list(dict.fromkeys(df[protocol]))
    floor = log_floor(df[y]) if logy and _needs_floor(df[y]) else None
    fig, axes = plt.subplots(1, len(prots), figsize=(5.6 * len(prots), 4.2), squeeze=False)
    for ax, p in zip(axes[0], prots):
        sub = df[df[protocol] == p]
        for i, (name, g) in enumerate(sub.groupby(line, sort=True)):
            g = g.sort_values(x)
            uni = str(name).startswith("uniform")
            ax.plot(g[x], _floored(g[y], floor), marker="x" if uni else "o", ls=":" if uni else "-", color=f"C{i}",
                    label=method_label(name), markersize=8 if uni else 6)
        if ref is not None and p in ref:
            ax.axhline(ref[p], ls="--", color="black", lw=1, label="fp16")
        if floor is not None:
            _mark_floor(ax, floor)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(axis_label("avg_bits") + " (stored context, metadata included)" if x in ("bits", "avg_bits")
                      else axis_label(x))
        ax.set_ylabel(axis_label(y))
        ax.set_title(f"{p} protocol", fontsize=10)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def retrieval_lines(df, by: str = "label", x: str = "context", values=("exact", "digits"), reference: str | None = "fp16",
                    title: str | None = None):
    """Retrieval vs context length (mean over depths and examples), one panel per column of `values`, one line per
    method in order of appearance; the `reference` method (fp16) drawn as a thick dashed black line and the others
    nudged sideways a little so identical results stay visible. Returns the figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(df[by]))
    others = [n for n in names if n != reference]
    agg = df.groupby([by, x])[list(values)].mean().reset_index()
    xs = sorted(set(agg[x]))
    fig, axes = plt.subplots(1, len(values), figsize=(6.2 * len(values), 4.2), squeeze=False)
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for ax, col in zip(axes[0], values):
        for i, name in enumerate(others):
            g = agg[agg[by] == name].sort_values(x)
            shift = 2.0 ** (0.05 * (i - (len(others) - 1) / 2))
            ax.plot(g[x] * shift, g[col], marker=markers[i % len(markers)], color=f"C{i}", label=method_label(name),
                    lw=1.4)
        if reference in names:
            g = agg[agg[by] == reference].sort_values(x)
            ax.plot(g[x], g[col], color="black", ls="--", lw=2.4, marker="_", markersize=16, label=method_label(reference),
                    zorder=5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(axis_label("context"))
        ax.set_ylabel(axis_label(col))
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    return fig


def progressive_bits(schedule, measured=None, title: str | None = None):
    """PM-KVQ's progressive cache: left, each layer's stored width as the cache grows (layers x tokens);
    right, bits per element vs tokens: the whole cache (schedule line, the session's report as points) and
    the mean code width of the quantized tokens, against the allocated average width.
    `schedule` from `kvlab.bitmaps.progressive_schedule`, `measured` from `progressive_measured`."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import colors

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    mat = schedule.pivot_table(index="layer", columns="tokens", values="bits", dropna=False)
    widths = sorted(v for v in np.unique(mat.to_numpy()) if np.isfinite(v))
    cmap = plt.get_cmap("viridis", max(len(widths), 1))
    bounds = [w * 0.75 for w in widths] + [widths[-1] * 1.5] if widths else [0, 1]
    norm = colors.BoundaryNorm(bounds, cmap.N)
    toks = list(mat.columns)
    span = toks[-1] - toks[0] if len(toks) > 1 else 1
    nice = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 14, 1 << 15, 1 << 20)
                if span / s <= 8)
    ticks = [i for i, t in enumerate(toks) if t % nice == 0] or list(range(0, len(toks), max(1, len(toks) // 8)))
    im = heatmap(mat, ax=axes[0], norm=norm, cmap=cmap, cbar=False, ylabel="layer index", xticks=ticks,
                 yticks=list(range(0, mat.shape[0], max(1, mat.shape[0] // 10))))
    axes[0].set_xlabel("tokens in the cache")
    axes[0].set_title("stored code width per layer (blank: every token still in the fp16 window)", fontsize=10)
    cb = fig.colorbar(im, ax=axes[0], ticks=[w for w in widths], fraction=0.04, pad=0.01)
    cb.ax.set_yticklabels([f"{int(w)}" for w in widths])
    cb.set_label("code width (bits)")
    avg = schedule.groupby("tokens")["avg_bits"].mean()
    code = schedule.groupby("tokens")["bits"].mean()
    axes[1].plot(avg.index, avg.values, color="C0", label="whole cache: codes + scales + fp16 sink/window")
    axes[1].plot(code.index, code.values, color="C2", ls="-.", label="code width of quantized tokens (mean)")
    bud = schedule.groupby("tokens")["budget_bits"].mean().iloc[0]
    axes[1].axhline(bud, ls="--", color="grey", lw=1, label=f"allocated average width ({bud:.2f} bits)")
    if measured is not None and len(measured):
        mm = measured.groupby("tokens")[["k_bits", "v_bits"]].mean()
        axes[1].scatter(mm.index, (mm["k_bits"] + mm["v_bits"]) / 2, color="C3", zorder=3, s=40,
                        label="whole cache, session report (measured)")
    axes[1].set_xlabel("tokens in the cache")
    axes[1].set_ylabel("bits per K/V element")
    axes[1].set_ylim(0, 17)
    axes[1].legend(fontsize=8)
    axes[1].set_title("memory per element as the sequence grows", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- downstream tasks
def interval_vs_x(df, y: str, lo: str, hi: str, x: str = "avg_bits", label: str = "label", ref: str | None = "fp16",
                  ax=None, logx: bool = False, xlabel: str | None = None, ylabel: str | None = None,
                  title: str | None = None):
    """One point per method at (x, y) with a vertical interval [lo, hi] (e.g. accuracy and its Wilson 95% CI),
    labelled with readable names without overlaps; the `ref` method's interval is drawn as a shaded band."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    d = df.sort_values(x)
    r = d[d[label] == ref] if ref is not None else d.iloc[:0]
    if len(r):
        ax.axhspan(float(r[lo].iloc[0]), float(r[hi].iloc[0]), color="0.85", zorder=0,
                   label=f"{method_label(ref)} 95% interval")
        ax.axhline(float(r[y].iloc[0]), color="0.4", lw=1, ls="--", zorder=1)
    xs = d[x].to_numpy(dtype=float)
    floor = log_floor(xs) if logx and _needs_floor(xs) else None
    xs = _floored(xs, floor)
    ax.errorbar(xs, d[y], yerr=[d[y] - d[lo], d[hi] - d[y]], fmt="o", ms=6, capsize=3, zorder=3)
    if logx:
        ax.set_xscale("log")
    if floor is not None:
        _mark_floor(ax, floor, axis="x")
    ax.set_xlabel(xlabel or axis_label(x))
    ax.set_ylabel(ylabel or axis_label(y))
    if title:
        ax.set_title(title)
    if len(r) or floor is not None:
        ax.legend(loc="lower right", fontsize=8)
    place_labels(ax, xs, d[y], _method_names(d[label]), fontsize=8)
    return ax


def labelled_scatter(df, x: str, y: str, label: str = "label", ax=None, logx: bool = False,
                     xlabel: str | None = None, ylabel: str | None = None, title: str | None = None):
    """One point per row at (x, y), labelled with readable names without overlaps; x values <= 0 on a log
    axis (fp16's KL) are drawn at a dashed floor named in the legend."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    xs = df[x].to_numpy(dtype=float)
    floor = log_floor(xs) if logx and _needs_floor(xs) else None
    xs = _floored(xs, floor)
    ax.scatter(xs, df[y], s=40, zorder=3)
    if logx:
        ax.set_xscale("log")
    if floor is not None:
        _mark_floor(ax, floor, axis="x")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(xlabel or axis_label(x))
    ax.set_ylabel(ylabel or axis_label(y))
    if title:
        ax.set_title(title)
    place_labels(ax, xs, df[y], _method_names(df[label]), fontsize=8)
    return ax


# ----------------------------------------------------------------------------- along the sequence
def position_curves(frame, y: str = "kl", label: str = "label", ax=None, logy: bool = False,
                    xlabel: str | None = None, title: str | None = None,
                    marker_x: float | None = None, marker_label: str = "end of prefill", start: int | None = None):
    """One line per method of `y` against the scored position (`kvlab.traces.position_frame`; pass
    `y="kl_smooth"` for the smoothed curve). `start`: positions counted from this token (the prefill
    length), x labelled "position in the continuation (tokens)". `marker_x` draws a vertical line (e.g. the
    prefill length). On a log axis zeros (fp16's KL) are drawn at a marked floor."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.2))
    d = frame.copy()
    floor = log_floor(d[y]) if logy and _needs_floor(d[y]) else None
    if floor is not None:
        d[y] = _floored(d[y], floor)
    if start is not None:
        d["position"] = d["position"] - start
        marker_x = None if marker_x is None else marker_x - start
    d["_method"] = _method_names(d[label])
    sns.lineplot(data=d, x="position", y=y, hue="_method", ax=ax, lw=1.2)
    if marker_x is not None:
        ax.axvline(marker_x, color="grey", ls=":", lw=1, label=marker_label)
    if floor is not None:
        _mark_floor(ax, floor)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or ("position in the continuation (tokens)" if start is not None else axis_label("position")))
    ax.set_ylabel(axis_label(y))
    ax.legend(fontsize=8, title=None)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def layer_bits_over_steps(matrix, title: str | None = None, ax=None):
    """Heatmap of bits per element per layer (rows) at each decode step (columns: tokens in the cache it
    read), from `kvlab.traces.layer_bits_matrix`: a progressive cache shows each layer stepping down."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4.5))
    toks = list(matrix.columns)
    step = max(1, len(toks) // 8)
    heatmap(matrix, ax=ax, cmap="viridis", ylabel="layer index", xticks=list(range(0, len(toks), step)),
            yticks=list(range(0, matrix.shape[0], max(1, matrix.shape[0] // 10))), cbar_label="bits per element")
    ax.set_xlabel("tokens in the cache the step read")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def bits_vs_tokens(frame, label: str = "label", ax=None, title: str | None = None):
    """One line per method of the bits per element of the cache each decode step read, against the tokens
    in that cache (`kvlab.traces.bits_frame`)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4.5))
    d = frame.assign(_method=_method_names(frame[label]))
    sns.lineplot(data=d, x="tokens", y="bits", hue="_method", ax=ax, lw=1.2)
    ax.set_xlabel("tokens in the cache the step read")
    ax.set_ylabel("bits per K/V element")
    ax.set_ylim(0, 17)
    ax.legend(fontsize=8, title=None)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
