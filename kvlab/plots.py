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
        mid = np.nanmedian(data) if np.isfinite(data).any() else 0
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if np.isfinite(data[i, j]):
                    light = im.norm(data[i, j]) < 0.5 if im.norm is not None else data[i, j] < mid
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=6.5,
                            color="white" if light else "black")
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
    for ax, fam in zip(axes[0], families):
        sub = df[df["family"] == fam].copy()
        sub["bits "] = sub["bits"].astype(str) + " bits"
        sub["pct"] = 100 * sub["outliers"]
        sns.lineplot(data=sub, x="pct" if x == "outliers" else x, y=y, hue="bits ", marker="o", ax=ax)
        for _, r in base.iterrows():
            if x == "outliers":
                ax.axhline(r[y], ls=":", lw=1, color="grey")
                ax.annotate(f"int{int(r['bits'])} per token", (ax.get_xlim()[1], r[y]), fontsize=7, color="grey",
                            ha="right", va="bottom")
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
