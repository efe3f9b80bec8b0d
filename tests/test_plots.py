"""Every public plotting function of kvlab.plots renders on small synthetic data (Agg backend) with
camera-ready words: axis labels, legend titles and titles are never raw column names, no finite point is
dropped on a log axis (zeros drawn at a marked floor), labels do not overlap, method specs get readable names."""
from __future__ import annotations

import inspect

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from kvlab import plots  # noqa: E402

METHODS = ["fp16", "int8", "int4", "int4-channel", "int2", "kivi-4", "kivi-2", "kvquant:bits=2,outliers=0.01",
           "qaq-low", "pmkvq:budget=3.0,max_tokens=1024"]


def _methods_frame():
    bits = [16.0, 8.5, 4.5, 4.375, 2.5, 5.0, 3.0, 3.1, 2.8, 3.05]
    kl = [0.0, 4e-4, 0.12, 0.04, 3.7, 0.02, 0.69, 0.3, 0.5, 0.35]
    ppl = [14.8, 14.77, 16.3, 15.3, 564.0, 14.99, 27.7, 20.0, 22.0, 21.0]
    fam = [m.split(":")[0].split("-")[0].rstrip("0123456789") for m in METHODS]
    n = len(METHODS)
    return pd.DataFrame({"label": METHODS, "method": METHODS, "family": fam, "avg_bits": bits, "ppl": ppl, "kl": kl,
                         "top1": np.linspace(1, 0.2, n), "acc": np.linspace(0.6, 0.3, n),
                         "acc_ci_low": np.linspace(0.5, 0.2, n), "acc_ci_high": np.linspace(0.7, 0.4, n),
                         "agree_fp": np.linspace(1.0, 0.4, n), "rougeL_fp": np.linspace(1.0, 0.3, n)})


def _outlier_grid():
    rows = []
    for fam in ("int", "nuq"):
        for b in (2, 3, 4):
            for r in (0.0, 0.005, 0.01, 0.05):
                ppl = 15 + 40 / b ** 2 + (5000.0 if (fam, b, r) == ("int", 2, 0.0) else 0) - 20 * r
                rows.append(dict(family=fam, bits=b, outliers=r, ppl=ppl, kl=0.5 / b ** 3 + r,
                                 avg_bits=b + 48 * r + 0.1, method=f"kvquant:bits={b}"))
    for b in (2, 4):
        rows.append(dict(family="baseline", bits=b, outliers=0.0, ppl=700.0 if b == 2 else 16.5, kl=2.0 / b,
                         avg_bits=b + 0.5, method=f"int:bits={b}"))
    return pd.DataFrame(rows)


def _decode_frame():
    rows = []
    for m in ("fp16", "kivi-2", "pmkvq:budget=3.0,max_tokens=1024"):
        for p in range(32, 64):
            kl = 0.0 if m == "fp16" else 0.01 * (1 + p % 5)
            rows.append(dict(label=m, position=p, kl=kl, kl_smooth=kl, nll_delta_smooth=kl / 2))
    return pd.DataFrame(rows)


def _retrieval_frame():
    rows = [dict(label=m, context=c, depth=d, exact=float((c + i) % 3 > 0), digits=0.5)
            for i, m in enumerate(("fp16", "kivi-2", "pmkvq:budget=3.0,max_tokens=256"))
            for c in (256, 512) for d in (0.0, 0.5, 1.0)]
    return pd.DataFrame(rows)


def _schedule():
    rows = [dict(layer=layer, tokens=t, bits=np.nan if t < 64 else (4 if layer % 2 else 2),
                 avg_bits=16.0 if t < 64 else 3.5, budget_bits=3.0)
            for layer in range(4) for t in range(16, 257, 16)]
    return pd.DataFrame(rows)


def _sensitivity():
    return pd.DataFrame([dict(kind=k, bits=b, layer=layer, kl=(0.0 if layer == 0 else 0.01 * layer / b))
                         for k in ("k", "v") for b in (2, 4) for layer in range(4)])


def _layers():
    return pd.DataFrame([dict(layer=layer, tensor=t, statistic=s, value=(0.0 if layer == 0 else 1.0 + layer))
                         for layer in range(4) for t in ("K", "V") for s in ("median", "max")])


def _matched():
    return pd.DataFrame([dict(protocol=p, variant=v, bits=b, kl=(0.0 if b == 8 else 0.1 / b))
                         for p in ("fake", "prefill-decode")
                         for v in ("QAQ attention-aware", "uniform int (matched)") for b in (2, 4, 8)])


def _calls():
    """(function name, callable drawing it, the DataFrame(s) whose columns must not appear as words)."""
    m, g, dec, ret, sch = _methods_frame(), _outlier_grid(), _decode_frame(), _retrieval_frame(), _schedule()
    sens, lay, mat = _sensitivity(), _layers(), _matched()
    bits = pd.DataFrame([dict(label=lab, tokens=t, bits=16 - t / 100) for lab in ("kivi-2", "fp16")
                         for t in range(10, 300, 10)])
    layer_bits = pd.DataFrame(np.full((4, 6), 3.0), columns=list(range(10, 70, 10)))
    return {
        "quality_vs_bits": (lambda: plots.quality_vs_bits(m, "kl"), [m]),
        "heatmap": (lambda: plots.heatmap(np.arange(12.0).reshape(3, 4), xlabel="token position",
                                          ylabel="layer index", title="a matrix", cbar_label="value (units)"), []),
        "sensitivity_heatmaps": (lambda: plots.sensitivity_heatmaps(sens, metric="kl"), [sens]),
        "layer_lines": (lambda: plots.layer_lines(lay, y="value", hue="tensor", style="statistic", logy=True,
                                                          ylabel="|x| (absolute value)"), [lay]),
        "channel_maps": (lambda: plots.channel_maps({"K": np.random.default_rng(0).random((4, 32)) + 0.1},
                                                    head_dim=16, title="per-channel absmax"), []),
        "outlier_curves": (lambda: plots.outlier_curves(g, y="ppl", ref=15.0), [g]),
        "bits_tradeoff": (lambda: plots.bits_tradeoff(g, y="kl"), [g]),
        "token_maps": (lambda: plots.token_maps([dict(data=np.random.default_rng(0).random((4, 64)),
                                                      title="attention", cbar="attention", ylabel="layer index")]),
                       []),
        "pareto_plot": (lambda: plots.pareto_plot(m, x="avg_bits", y="kl", legend="outside"), [m]),
        "retrieval_heatmaps": (lambda: plots.retrieval_heatmaps(ret), [ret]),
        "matched_bits": (lambda: plots.matched_bits(mat, y="kl"), [mat]),
        "retrieval_lines": (lambda: plots.retrieval_lines(ret), [ret]),
        "progressive_bits": (lambda: plots.progressive_bits(sch), [sch]),
        "interval_vs_x": (lambda: plots.interval_vs_x(m, "acc", "acc_ci_low", "acc_ci_high"), [m]),
        "labelled_scatter": (lambda: plots.labelled_scatter(m, "kl", "rougeL_fp", logx=True), [m]),
        "position_curves": (lambda: plots.position_curves(dec, y="kl_smooth", logy=True, start=32), [dec]),
        "layer_bits_over_steps": (lambda: plots.layer_bits_over_steps(layer_bits), []),
        "bits_vs_tokens": (lambda: plots.bits_vs_tokens(bits), [bits]),
    }


PUBLIC = sorted(n for n, f in vars(plots).items() if inspect.isfunction(f) and f.__module__ == plots.__name__
                and not n.startswith("_"))
NOT_FIGURES = {"style", "figures_dir", "save", "axis_label", "method_label", "log_floor", "clip_top", "place_labels",
               "pareto_mask"}


def test_every_public_plotting_function_is_rendered():
    assert set(PUBLIC) - NOT_FIGURES == set(_calls()), "add the new plotting function to _calls()"


def _figure(out):
    return out if isinstance(out, matplotlib.figure.Figure) else getattr(out, "figure", None) or out.axes.figure


def _words(fig):
    """Every axis label, title, suptitle and legend title / entry of the figure."""
    out = []
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        leg = ax.get_legend()
        if leg is not None:
            out.append(leg.get_title().get_text())
            out += [t.get_text() for t in leg.get_texts()]
    return [w for w in out if w]


def _log_points(ax):
    """Finite data coordinates of lines and scatter collections on each log axis of `ax`."""
    pts = {"x": [], "y": []}
    if getattr(ax, "_colorbar", None) is not None:          # a colour bar: no data points
        return {"x": np.zeros(0), "y": np.zeros(0)}
    data = [ln.get_xydata() for ln in ax.get_lines() if ln.get_transform() == ax.transData]   # not axhline & co
    data += [np.asarray(c.get_offsets()) for c in ax.collections
             if hasattr(c, "get_offsets") and c.get_offset_transform() == ax.transData]
    for d in data:
        d = np.asarray(d, dtype=float).reshape(-1, 2) if np.size(d) else np.zeros((0, 2))
        for i, a in enumerate("xy"):
            if getattr(ax, f"get_{a}scale")() == "log":
                v = d[:, i]
                pts[a].append(v[np.isfinite(v)])
    return {a: np.concatenate(v) if v else np.zeros(0) for a, v in pts.items()}


@pytest.mark.parametrize("name", sorted(_calls()))
def test_plot_is_camera_ready(name):
    plots.style()
    draw, frames = _calls()[name]
    fig = _figure(draw())
    try:
        fig.canvas.draw()
        columns = {str(c) for f in frames for c in f.columns}
        raw = [w for w in _words(fig) if w in columns or w.strip() in columns]
        assert not raw, f"{name}: raw column names as words: {raw}"
        specs = [w for w in _words(fig) if ":" in w and "=" in w]
        assert not specs, f"{name}: raw spec strings in titles or legends: {specs}"
        for ax in fig.axes:
            pts = _log_points(ax)
            for a in "xy":
                assert (pts[a] > 0).all(), f"{name}: a point at <= 0 on a log {a} axis is dropped by matplotlib"
    finally:
        plt.close(fig)


def _boxes(ax):
    r = ax.figure.canvas.get_renderer()
    # the text's own box (an annotation's extent would include its leader line)
    return [matplotlib.text.Text.get_window_extent(t, r) for t in ax.texts if t.get_text() and t.get_visible()]


@pytest.mark.parametrize("name", ["quality_vs_bits", "pareto_plot", "labelled_scatter", "interval_vs_x"])
def test_point_labels_do_not_overlap(name):
    plots.style()
    draw, _ = _calls()[name]
    fig = _figure(draw())
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            boxes = _boxes(ax)
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i], boxes[j]
                    w = min(a.x1, b.x1) - max(a.x0, b.x0)
                    h = min(a.y1, b.y1) - max(a.y0, b.y0)
                    assert not (w > 1 and h > 1), f"{name}: labels overlap: {ax.texts[i].get_text()!r}, " \
                                                  f"{ax.texts[j].get_text()!r}"
    finally:
        plt.close(fig)


def test_zero_kl_is_drawn_at_a_marked_floor():
    m = _methods_frame()
    ax = plots.pareto_plot(m, x="avg_bits", y="kl")
    floor = plots.log_floor(m["kl"])
    assert floor < m.loc[m["kl"] > 0, "kl"].min()
    ys = np.concatenate([np.asarray(c.get_offsets())[:, 1] for c in ax.collections if len(c.get_offsets())])
    assert np.isclose(ys, floor).any()                                    # fp16's point is there, at the floor
    assert any("0 (fp16)" in t.get_text() for t in ax.get_legend().get_texts())
    assert sum(len(c.get_offsets()) for c in ax.collections[:-1]) == len(m)  # every method drawn (last: rings)
    plt.close(ax.figure)


def test_outlier_curves_clip_a_huge_value_and_print_it():
    g = _outlier_grid()
    fig = plots.outlier_curves(g, y="ppl", ref=15.0)
    ax = fig.axes[0]
    top = ax.get_ylim()[1]
    assert top < 1000, "the 5000 outlier must not set the y-range"
    assert any(t.get_text() == "5.02e+03" for t in ax.texts)           # its value printed at the top
    for ln in ax.get_lines():
        y = ln.get_ydata()
        assert (np.asarray(y, dtype=float) <= top * 1.0001).all()
    plt.close(fig)


@pytest.mark.parametrize("spec, expected", [
    ("kvquant:bits=2,fisher=activation,outliers=0.01", "KVQuant nuq2 1% outliers"),
    ("kvquant:bits=3,nuq=false", "KVQuant int3"),
    ("kivi:bits=2,flush=authors", "KIVI 2-bit"),
    ("kivi:bits=2,group=32,residual=128", "KIVI 2-bit"),
    ("int:bits=4,k_axis=channel,group=128", "int4 K per-channel, group 128"),
    ("kivi-2", "kivi-2"),                                   # presets keep their names
    ("kvquant-nuq2-1%", "kvquant-nuq2-1%"),
    ("fp16", "fp16"),
    ("QAQ attention-aware", "QAQ attention-aware"),         # not a spec: unchanged
    ("nosuchmethod:bits=2", "nosuchmethod:bits=2"),
])
def test_method_label(spec, expected):
    assert plots.method_label(spec) == expected


def test_method_label_shows_only_what_differs_from_the_defaults():
    from kvlab.quant import parse

    m = parse("kvquant:bits=2,outliers=0.01")
    assert plots.method_label(m.spec) == plots.method_label("kvquant:bits=2,outliers=0.01")
    label = plots.method_label("kvquant:bits=2,qnorm=true,fisher=none")
    assert label.startswith("KVQuant nuq2") and "Q-Norm" in label and "fisher=none" in label
    assert plots.method_label("select:inner=int4,layers=3,kind=k") == "int4 on layer 3, K only"


def test_axis_label_words():
    assert plots.axis_label("avg_bits") == "average bits per K/V element"
    assert plots.axis_label("kl") == "KL to fp16 (nats/token)"
    assert plots.axis_label("kl_smooth") == "KL to fp16 (nats/token, smoothed)"
    assert plots.axis_label("unknown_col") == "unknown_col"
