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


def quality_vs_bits(df, y: str = "ppl", hue: str = "label", ax=None, logy: bool = True, title: str | None = None):
    """Scatter of average bits per element vs a quality metric, one point per method, labelled."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(data=df, x="avg_bits", y=y, hue=hue, s=70, ax=ax, legend=False)
    for _, r in df.iterrows():
        ax.annotate(str(r[hue]), (r["avg_bits"], r[y]), textcoords="offset points", xytext=(4, 3), fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("average bits per K/V element (metadata included)")
    ax.set_ylabel(y)
    if title:
        ax.set_title(title)
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
        heatmap(m, ax=ax, norm=norm, cmap="magma_r", ylabel="bits", title=f"{names.get(kind, kind)} quantized",
                annotate=annotate, cbar_label=cbar_label or metric)
        ax.set_xlabel("layer (only this layer's tensor quantized)")
    if title:
        fig.suptitle(title)
    return fig


def layer_lines(df, y: str, hue: str = "tensor", style: str | None = None, x: str = "layer", ax=None,
                logy: bool = False, title: str | None = None, ylabel: str | None = None, markers: bool = True):
    """Line plot of a per-layer statistic (one line per `hue` / `style` value). Returns the axes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=df, x=x, y=y, hue=hue, style=style, markers=markers, dashes=style is not None, ax=ax,
                 markersize=5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
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
            ax.set_ylabel("layer")
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
                   x: str = "outliers", title: str | None = None):
    """Quality vs outlier ratio (or vs `x`), one panel per datatype family, one line per bit width.

    `df` comes from `kvlab.sensitivity.outlier_grid`; `ref` draws the fp value as a dashed line.
    Returns the figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    families = families or [f for f in ("int", "nuq") if f in set(df["family"])]
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.0), squeeze=False, sharey=True)
    names = {"int": "KVQuant, uniform datatype (nuq=false)", "nuq": "KVQuant, non-uniform datatype (nuq=true)"}
    base = df[df["family"] == "baseline"]
    main = df[df["family"].isin(families)][y]
    top = float(main.max()) * (3.0 if logy else 1.3)      # baselines far above the curves are noted, not drawn
    for ax, fam in zip(axes[0], families):
        sub = df[df["family"] == fam].copy()
        sub["bits "] = sub["bits"].astype(str) + " bits"
        sub["pct"] = 100 * sub["outliers"]
        sns.lineplot(data=sub, x="pct" if x == "outliers" else x, y=y, hue="bits ", marker="o", ax=ax)
        ax.legend(fontsize=8, title=None)
        off = []
        for _, r in base.iterrows():
            if x != "outliers":
                continue
            name = f"int{int(r['bits'])} per token"
            if r[y] > top:
                off.append(f"{name}: {r[y]:.3g}")
                continue
            ax.axhline(r[y], ls=":", lw=1, color="grey")
            ax.annotate(name, (ax.get_xlim()[1], r[y]), fontsize=7, color="grey", ha="right", va="bottom")
        if off:
            ax.text(0.99, 0.98, "off scale: " + ", ".join(off), transform=ax.transAxes, fontsize=7, color="grey",
                    ha="right", va="top")
        if ref is not None:
            ax.axhline(ref, ls="--", color="black", lw=1)
            ax.annotate("fp16", (ax.get_xlim()[0], ref), fontsize=8, va="bottom")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("outliers kept in fp16 (% of values)" if x == "outliers" else x)
        ax.set_ylabel(y)
        ax.set_title(names.get(fam, fam), fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def bits_tradeoff(df, y: str = "kl", x: str = "avg_bits", line_by=("family", "bits"), label: str | None = "outliers",
                  ref: float | None = None, ax=None, logy: bool = True, title: str | None = None):
    """Quality vs average bits with one line per `line_by` group (e.g. one KVQuant datatype and bit
    width across outlier ratios), points labelled by `label` (ratios as %). Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"int": ("o", "-"), "nuq": ("s", "-"), "baseline": ("x", ":")}
    colors = {}
    for key, sub in df.sort_values(x).groupby(list(line_by), sort=True):
        fam, bits = key if isinstance(key, tuple) else (key, None)
        c = colors.setdefault(bits, f"C{len(colors)}")
        mk, ls = styles.get(fam, ("o", "-"))
        ax.plot(sub[x], sub[y], marker=mk, ls=ls, color=c, label=f"{fam} {bits}b" if bits is not None else str(fam))
        if label and fam != "baseline":
            for _, r in sub.iterrows():
                ax.annotate(f"{100 * r[label]:g}%", (r[x], r[y]), textcoords="offset points", xytext=(3, 3),
                            fontsize=6.5, color=c)
    if ref is not None:
        ax.axhline(ref, ls="--", color="black", lw=1, label="fp16")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("average bits per K/V element (outliers, scales and sink tokens included)")
    ax.set_ylabel(y)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title)
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
                legend: str | None = "inside", linthresh: float = 0.1):
    """Quality vs bits, one point per method (marker/colour by `group`), the Pareto-optimal points ringed
    and joined by a step line, every point labelled. `ref` draws the fp value; `budget` a vertical line.
    `logy`: True (log), "symlog" (symmetric log, linear within +-`linthresh`: for changes that may be
    negative) or False. `legend`: "inside", "outside" (right of the axes) or None."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    d = df[df[y].notna() & df[x].notna()].copy()
    d["_pareto"] = pareto_mask(d, x, y)
    groups = list(dict.fromkeys(d[group])) if group else [None]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, g in enumerate(groups):
        sub = d if g is None else d[d[group] == g]
        ax.scatter(sub[x], sub[y], s=46, marker=markers[i % len(markers)], color=f"C{i}", label=g, zorder=3)
    front = d[d["_pareto"]].sort_values(x)
    ax.scatter(front[x], front[y], s=190, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4,
               label="Pareto-optimal")
    ax.step(front[x], front[y], where="post", color="black", lw=1, alpha=0.6, zorder=2)
    for _, r in d.iterrows():
        ax.annotate(str(r[label]), (r[x], r[y]), textcoords="offset points", xytext=(5, 3), fontsize=7,
                    fontweight="bold" if r["_pareto"] else "normal")
    if ref is not None:
        ax.axhline(ref, ls="--", color="black", lw=1)
        ax.annotate("fp16", (ax.get_xlim()[0], ref), fontsize=8, va="bottom")
    if budget is not None:
        ax.axvline(budget, ls=":", color="grey", lw=1)
    if logy == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh)
    elif logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if legend == "outside":
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif legend:
        ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title)
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
                     xlabel="context length (tokens)", ylabel="needle depth")
        ax.set_title(str(name), fontsize=9)
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
    sorted by bits, uniform points as crosses (rows whose `line` value starts with "uniform")."""
    import matplotlib.pyplot as plt

    prots = list(dict.fromkeys(df[protocol]))
    fig, axes = plt.subplots(1, len(prots), figsize=(5.6 * len(prots), 4.2), squeeze=False)
    for ax, p in zip(axes[0], prots):
        sub = df[df[protocol] == p]
        for i, (name, g) in enumerate(sub.groupby(line, sort=True)):
            g = g.sort_values(x)
            uni = str(name).startswith("uniform")
            ax.plot(g[x], g[y], marker="x" if uni else "o", ls=":" if uni else "-", color=f"C{i}", label=name,
                    markersize=8 if uni else 6)
        if ref is not None and p in ref:
            ax.axhline(ref[p], ls="--", color="black", lw=1, label="fp16")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("average bits per K/V element (stored context, metadata included)")
        ax.set_ylabel({"kl": "KL to fp16 (per token)", "ppl": "perplexity"}.get(y, y))
        ax.set_title(p, fontsize=10)
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
    titles = {"exact": "exact-match accuracy", "digits": "key digits correct"}
    fig, axes = plt.subplots(1, len(values), figsize=(6.2 * len(values), 4.2), squeeze=False)
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for ax, col in zip(axes[0], values):
        for i, name in enumerate(others):
            g = agg[agg[by] == name].sort_values(x)
            shift = 2.0 ** (0.05 * (i - (len(others) - 1) / 2))
            ax.plot(g[x] * shift, g[col], marker=markers[i % len(markers)], color=f"C{i}", label=name, lw=1.4)
        if reference in names:
            g = agg[agg[by] == reference].sort_values(x)
            ax.plot(g[x], g[col], color="black", ls="--", lw=2.4, marker="_", markersize=16, label=reference, zorder=5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(titles.get(col, col))
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
    im = heatmap(mat, ax=axes[0], norm=norm, cmap=cmap, cbar=False, ylabel="layer", xticks=ticks,
                 yticks=list(range(0, mat.shape[0], max(1, mat.shape[0] // 10))))
    axes[0].set_xlabel("tokens in the cache")
    axes[0].set_title("stored code width per layer (blank: every token still in the fp16 window)", fontsize=10)
    cb = fig.colorbar(im, ax=axes[0], ticks=[w for w in widths], fraction=0.04, pad=0.01)
    cb.ax.set_yticklabels([f"{int(w)}" for w in widths])
    cb.set_label("bits")
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
    labelled; the `ref` method's interval is drawn as a shaded band across the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    d = df.sort_values(x)
    r = d[d[label] == ref] if ref is not None else d.iloc[:0]
    if len(r):
        ax.axhspan(float(r[lo].iloc[0]), float(r[hi].iloc[0]), color="0.85", zorder=0, label=f"{ref} 95% interval")
        ax.axhline(float(r[y].iloc[0]), color="0.4", lw=1, ls="--", zorder=1)
    ax.errorbar(d[x], d[y], yerr=[d[y] - d[lo], d[hi] - d[y]], fmt="o", ms=6, capsize=3, zorder=3)
    for _, row in d.iterrows():
        ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    if len(r):
        ax.legend(loc="lower right", fontsize=8)
    return ax


def labelled_scatter(df, x: str, y: str, label: str = "label", ax=None, logx: bool = False,
                     xlabel: str | None = None, ylabel: str | None = None, title: str | None = None):
    """One labelled point per row at (x, y); x values <= 0 on a log axis are drawn at the smallest positive x / 3."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    xs = df[x].astype(float).copy()
    if logx:
        pos = xs[xs > 0]
        xs[xs <= 0] = (pos.min() / 3) if len(pos) else 1e-6
        ax.set_xscale("log")
    ax.scatter(xs, df[y], s=40, zorder=3)
    for xv, (_, row) in zip(xs, df.iterrows()):
        ax.annotate(str(row[label]), (xv, row[y]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------- along the sequence
def position_curves(frame, y: str = "kl", label: str = "label", ax=None, logy: bool = False,
                    xlabel: str = "position in the window (token index)", title: str | None = None,
                    marker_x: float | None = None, marker_label: str = "end of prefill"):
    """One line per method of `y` against the scored position (`kvlab.traces.position_frame`; pass
    `y="kl_smooth"` for the smoothed curve). `marker_x` draws a vertical line (e.g. the prefill length)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.2))
    sns.lineplot(data=frame, x="position", y=y, hue=label, ax=ax, lw=1.2)
    if marker_x is not None:
        ax.axvline(marker_x, color="grey", ls=":", lw=1, label=marker_label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y.replace("_smooth", " (smoothed)"))
    ax.legend(fontsize=8)
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
    heatmap(matrix, ax=ax, cmap="viridis", ylabel="layer", xticks=list(range(0, len(toks), step)),
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
    sns.lineplot(data=frame, x="tokens", y="bits", hue=label, ax=ax, lw=1.2)
    ax.set_xlabel("tokens in the cache the step read")
    ax.set_ylabel("bits per K/V element")
    ax.set_ylim(0, 17)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
