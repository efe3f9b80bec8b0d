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


def quality_vs_bits(df, y: str = "ppl", hue: str = "method", ax=None, logy: bool = True, title: str | None = None):
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
