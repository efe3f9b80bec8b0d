"""The interactive explorer (notebooks/07_explorer): pick a method, bits, outlier ratio, layer and
protocol; the plots update live.

    ui = kvlab.widgets.explorer(lm)           # an ipywidgets VBox; display(ui) in Jupyter
    ui.explorer.update(bits=2)                 # drive it from code (tests, papermill): returns the figure
    ui.explorer.compute(method="KIVI", bits=2, outliers=0.0, layer=3, protocol="fake")   # no widgets involved

Every change of a control calls `Explorer.refresh`: `compute` (one `kvlab.evaluate`, cached per
method spec and protocol, so moving the layer slider only redraws) and `draw` (one matplotlib
figure, shown as a PNG inside an `ipywidgets.Output`). Panels:

  (a) relative K and V error per layer under the method (the chosen layer marked);
  (b) the chosen layer: per-channel RMS error of the K and V the method actually stored, relative to the
      tensor's RMS, over every stored token of the first window under the chosen protocol (the fp16 sink
      and residual window count with zero error; keys after RoPE, as attention reads them);
  (c) every configuration computed so far: average bits vs KL to fp16, the current one highlighted
      (build a Pareto front by hand).
"""
from __future__ import annotations

import io
from dataclasses import replace
from typing import Mapping

import torch

from .errors import KVLabError
from .evaluation import EvalSpec, evaluate
from .models import LoadedModel
from .quant.methods.select import select_spec
from .quant.registry import parse

# label -> spec template ({bits}, and {outliers} where the method has a dense-and-sparse budget)
METHODS: dict[str, str] = {
    "int (per token)": "int:bits={bits}",
    "int (K per channel)": "int:bits={bits},k_axis=channel,group=64",
    "KIVI": "kivi:bits={bits},group=32,residual=128",
    "KVQuant": "kvquant:bits={bits},outliers={outliers},fisher=none,calib_rows=none,calib_len=none",
}
OUTLIER_RATIOS = (0.0, 0.005, 0.01, 0.02, 0.05)
PROTOCOLS = ("fake", "prefill-decode")


def method_spec(template: str, bits: int, outliers: float = 0.0, layer: int | None = None,
                only_layer: bool = False) -> str:
    """Fill a method template; with `only_layer`, wrap it in `select` for that layer (K and V)."""
    spec = template.format(bits=int(bits), outliers=repr(float(outliers)))
    if only_layer:
        spec = select_spec(spec, [int(layer)], "kv")
    return spec


class Explorer:
    """The explorer's state, its compute (no widgets needed) and its widget box (`.widget`)."""

    def __init__(self, lm: LoadedModel, spec: EvalSpec | None = None, methods: Mapping[str, str] | None = None,
                 method: str | None = None, bits: int = 4, outliers: float = 0.01, layer: int | None = None,
                 protocol: str = "fake", only_layer: bool = False, build: bool = True):
        self.lm = lm
        self.spec = spec or EvalSpec(n_tokens=512, window=512, calib_tokens=512)
        self.methods = dict(methods or METHODS)
        if not self.methods:
            raise KVLabError("explorer: give at least one method template")
        from .core.arch import find_attention

        self.n_layers = len(find_attention(lm.model))
        self.defaults = dict(method=method or next(iter(self.methods)), bits=int(bits), outliers=float(outliers),
                             layer=self.n_layers // 2 if layer is None else int(layer), protocol=protocol,
                             only_layer=bool(only_layer))
        self._check(self.defaults)
        self._results: dict[tuple, dict] = {}
        self._fp: dict[str, dict] = {}
        self._caps: dict[str, list[torch.Tensor]] | None = None
        self._stored: dict[tuple, dict | None] = {}
        self.figure = None
        self.last = None
        self.widget = self._build() if build else None
        if build:
            self.refresh()

    # ------------------------------------------------------------------ state
    def _check(self, state: Mapping) -> None:
        if state["method"] not in self.methods:
            raise KVLabError(f"explorer: unknown method {state['method']!r}; choose from {list(self.methods)}")
        if state["protocol"] not in PROTOCOLS:
            raise KVLabError(f"explorer: protocol must be one of {PROTOCOLS}, got {state['protocol']!r}")
        if not 0 <= int(state["layer"]) < self.n_layers:
            raise KVLabError(f"explorer: layer must be in 0..{self.n_layers - 1}, got {state['layer']}")
        if not 1 <= int(state["bits"]) <= 8:
            raise KVLabError(f"explorer: bits must be in 1..8, got {state['bits']}")

    def state(self) -> dict:
        if self.widget is None:
            return dict(self.defaults)
        c = self.controls
        return dict(method=c["method"].value, bits=int(c["bits"].value), outliers=float(c["outliers"].value),
                    layer=int(c["layer"].value), protocol=c["protocol"].value, only_layer=bool(c["only_layer"].value))

    # ------------------------------------------------------------------ compute
    def _spec_for(self, protocol: str) -> EvalSpec:
        return self.spec if self.spec.protocol == protocol else replace(self.spec, protocol=protocol)

    def compute(self, method: str, bits: int, outliers: float = 0.0, layer: int = 0, protocol: str = "fake",
                only_layer: bool = False) -> dict:
        """Everything the figure shows for one setting (cached per method spec and protocol).

        Returns {"spec", "label", "metrics" (ppl, kl, top1, avg_bits...), "fp" (fp16 metrics),
        "layers" (per-layer DataFrame: layer, k_rel_err, v_rel_err, k_bits, v_bits), "layer",
        "channel_err" ({"k", "v"}: per-channel relative RMS error of the chosen layer, or None)}.
        """
        state = dict(method=method, bits=int(bits), outliers=float(outliers), layer=int(layer), protocol=protocol,
                     only_layer=bool(only_layer))
        self._check(state)
        template = self.methods[method]
        spec_str = method_spec(template, bits, outliers, layer, only_layer)
        key = (spec_str, protocol)
        if key not in self._results:
            m = parse(spec_str)
            ev = self._spec_for(protocol)
            res = evaluate(self.lm, m, ev, progress=False)
            if protocol not in self._fp:
                self._fp[protocol] = evaluate(self.lm, "fp16", ev, progress=False).metrics
            self._results[key] = {"method": m, "metrics": res.metrics, "layers": res.layers,
                                  "fp": self._fp[protocol], "state": state}
        r = self._results[key]
        out = {"spec": spec_str, "label": f"{method}, {bits} bits" + (f", {100 * outliers:g}% outliers"
                                                                      if "{outliers}" in template else ""),
               "metrics": r["metrics"], "fp": r["fp"], "layers": r["layers"], "layer": int(layer),
               "protocol": protocol, "channel_err": self._channel_error(key, r["method"], int(layer), protocol)}
        self.last = out
        return out

    def _stored_errors(self, key: tuple, m, protocol: str) -> dict | None:
        """Per layer, the error of what the method actually stored: one window run under `protocol` with
        the session keeping the full-precision K/V of every stored token (`attn_error`), then, per channel,
        RMS(stored - fp) / RMS(fp) over every stored token: the fp16 sink and the fp16 (residual) window
        count with zero error, evicted tokens with their whole value. Keys as attention reads them (after
        RoPE). None when the method brings its own cache (nothing stored in kvlab's cache)."""
        if key in self._stored:
            return self._stored[key]
        from . import data as data_mod
        from .evaluation import _window_logits, calibrate_for
        from .hooks import quantize

        ev = self._spec_for(protocol)
        w = data_mod.windows(self.lm, ev.data, ev.n_tokens, ev.window)[0]
        out = None
        try:
            method = calibrate_for(self.lm, m, ev)
            with torch.no_grad(), quantize(self.lm.model, method, protocol=protocol, attn_error=True) as run:
                _window_logits(self.lm, w, ev)
                cache = run.cache
                if cache is not None and getattr(cache, "layers", None):
                    out = {"k": [], "v": [], "spans": []}
                    for i, lay in enumerate(cache.layers):
                        for kind, got, ref in (("k", lay.keys, lay.ref_keys), ("v", lay.values, lay.ref_values)):
                            if ref is None or got is None:
                                raise KVLabError("no full-precision reference kept")
                            n = min(got.shape[-2], ref.shape[-2])
                            got, ref = got[..., -n:, :].float(), ref[..., -n:, :].float()
                            if lay.keep is not None:                          # evicted tokens: nothing stored
                                keep = lay.keep[..., -n:].to(got.device)
                                got = got * keep[..., None].to(got.dtype)
                            err = (got - ref).pow(2).mean(dim=(0, 2)).sqrt()  # [kv_heads, head_dim]
                            out[kind].append((err / ref.pow(2).mean().sqrt().clamp_min(1e-12)).flatten().cpu())
                        try:
                            out["spans"].append(run.token_spans(i))
                        except Exception:  # noqa: BLE001 - spans are a caption only
                            out["spans"].append(None)
        except (KVLabError, AttributeError):
            out = None
        self._stored[key] = out
        return out

    def _channel_error(self, key: tuple, m, layer: int, protocol: str) -> dict | None:
        """The chosen layer's per-channel error of the stored K/V (`_stored_errors`), or {"k": None, "v": None}
        when `select` leaves the layer at full precision, or None when not available."""
        if hasattr(m, "selects") and not (m.selects(layer, "k") or m.selects(layer, "v")):
            return {"k": None, "v": None, "spans": None}
        st = self._stored_errors(key, m, protocol)
        if st is None:
            return None
        return {"k": st["k"][layer], "v": st["v"][layer], "spans": st["spans"][layer]}

    def history(self):
        """Every configuration computed so far: one DataFrame row each."""
        import pandas as pd

        rows = [{**r["state"], "spec": k[0], **{m: r["metrics"].get(m) for m in ("avg_bits", "ppl", "kl", "top1")}}
                for k, r in self._results.items()]
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ draw
    def draw(self, result: dict):
        import matplotlib.pyplot as plt
        import numpy as np

        from . import plots

        plots.style()
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.9), gridspec_kw={"width_ratios": [1.1, 1.2, 1.0]})
        layer = result["layer"]
        # (a) per-layer relative error
        ax = axes[0]
        t = result["layers"]
        if t is not None:
            x = t["layer"].to_numpy()
            ax.bar(x - 0.2, t["k_rel_err"], width=0.4, label="K")
            ax.bar(x + 0.2, t["v_rel_err"], width=0.4, label="V")
            ax.axvspan(layer - 0.5, layer + 0.5, color="grey", alpha=0.2, lw=0)
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            ax.legend(fontsize=8)
        ax.set_xlabel(plots.axis_label("layer"))
        ax.set_ylabel(plots.axis_label("rel_err"))
        ax.set_title("(a) K/V error per layer", fontsize=10)
        # (b) chosen layer, per channel: the error of what the method stored (sink and fp window included)
        ax = axes[1]
        ce = result["channel_err"]
        if ce and ce.get("k") is not None:
            cfg = self.lm.model.config
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            vals = np.concatenate([ce["k"].numpy(), ce["v"].numpy()])
            floor = plots.log_floor(vals) if plots._needs_floor(vals) else None
            for kind, mk in (("k", "K (after RoPE)"), ("v", "V")):
                ax.plot(np.arange(len(ce[kind])), plots._floored(ce[kind].numpy(), floor), lw=1, label=mk)
            for h in range(hd, len(ce["k"]), hd):
                ax.axvline(h - 0.5, color="grey", lw=0.6)
            ax.set_yscale("log")
            if floor is not None:
                plots._mark_floor(ax, floor, text="0 (not quantized)")
            ax.legend(fontsize=8, loc="lower right")
            sp = ce.get("spans")
            if sp is not None:
                ax.text(0.01, 0.99, f"{sp.length} stored tokens: {sp.n_quantized} quantized, "
                        f"{sp.sink_end} sink + {sp.length - sp.quantized_end} window in fp16 (zero error)",
                        transform=ax.transAxes, fontsize=7, va="top", ha="left", color="0.3")
        else:
            ax.text(0.5, 0.5, "layer kept at full precision" if ce else "not available for this method",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("channel (KV head x head_dim)")
        ax.set_ylabel("RMS error of stored K/V / RMS of tensor")
        ax.set_title(f"(b) layer {layer}: error of the stored cache per channel", fontsize=10)
        # (c) history: bits vs KL
        ax = axes[2]
        h = self.history()
        m = result["metrics"]
        kls = np.append(h["kl"].to_numpy(dtype=float) if not h.empty else np.zeros(0), float(m["kl"]))
        floor = plots.log_floor(kls) if plots._needs_floor(kls) else None
        if not h.empty:
            ax.scatter(h["avg_bits"], plots._floored(h["kl"], floor), s=18, color="lightgrey", label="explored")
        ax.scatter([m["avg_bits"]], plots._floored([m["kl"]], floor), s=60, color="C3", label="current", zorder=3)
        ax.set_yscale("log")
        if floor is not None:
            plots._mark_floor(ax, floor)
        ax.set_xlabel(plots.axis_label("avg_bits"))
        ax.set_ylabel(plots.axis_label("kl"))
        ax.set_title("(c) explored settings", fontsize=10)
        ax.legend(fontsize=8)
        fp = result["fp"]
        fig.suptitle(f"{result['label']}  [{result['protocol']}]   ppl {m['ppl']:.2f} (fp16 {fp['ppl']:.2f}), "
                     f"KL {m['kl']:.3g}, top-1 {m['top1']:.3f}, {m['avg_bits']:.2f} bits", fontsize=11)
        return fig

    # ------------------------------------------------------------------ widgets
    def _build(self):
        import ipywidgets as W

        d = self.defaults
        style = {"description_width": "70px"}
        self.controls = c = {
            "method": W.Dropdown(options=list(self.methods), value=d["method"], description="method", style=style),
            # no description of its own: ToggleButtons draws it above the buttons once the row is narrow;
            # a separate label in a centred row keeps "protocol" on the buttons' line (see _build's box)
            "protocol": W.ToggleButtons(options=list(PROTOCOLS), value=d["protocol"],
                                        style={"button_width": "110px"}, layout=W.Layout(width="auto")),
            "bits": W.IntSlider(value=d["bits"], min=2, max=8, step=1, description="bits", continuous_update=False,
                                style=style),
            "outliers": W.SelectionSlider(options=[(f"{100 * r:g}%", r) for r in OUTLIER_RATIOS],
                                          value=min(OUTLIER_RATIOS, key=lambda r: abs(r - d["outliers"])),
                                          description="outliers", continuous_update=False, style=style),
            "layer": W.IntSlider(value=d["layer"], min=0, max=self.n_layers - 1, description="layer",
                                 continuous_update=False, style=style),
            "only_layer": W.Checkbox(value=d["only_layer"], description="quantize only this layer", indent=False),
        }
        for w in c.values():
            w.observe(self._on_change, names="value")
        self.status = W.HTML()
        self.out = W.Output()
        proto_label = W.HTML("<span class='kvlab-protocol-label'>protocol</span>",
                             layout=W.Layout(width="70px", margin="0 8px 0 24px", display="flex",
                                             justify_content="flex-end", align_items="center"))
        row1 = W.HBox([c["method"], proto_label, c["protocol"]],
                      layout=W.Layout(align_items="center", flex_flow="row nowrap"))
        box = W.VBox([row1, W.HBox([c["bits"], c["outliers"]]),
                      W.HBox([c["layer"], c["only_layer"]]), self.status, self.out])
        box.add_class("kvlab-explorer")
        box.explorer = self
        self._sync_enabled()
        return box

    def _sync_enabled(self) -> None:
        c = self.controls
        c["outliers"].disabled = "{outliers}" not in self.methods[c["method"].value]

    def _on_change(self, change) -> None:
        if getattr(self, "_holding", False):
            return
        self._sync_enabled()
        self.refresh()

    def update(self, **changes):
        """Set controls (method, bits, outliers, layer, protocol, only_layer) and redraw once; returns the figure."""
        unknown = set(changes) - set(self.defaults)
        if unknown:
            raise KVLabError(f"explorer.update: unknown control(s) {sorted(unknown)}; use {list(self.defaults)}")
        if self.widget is None:
            self.defaults.update(changes)
            self._check(self.defaults)
            return self.draw(self.compute(**self.defaults))
        self._holding = True
        try:
            for k, v in changes.items():
                self.controls[k].value = v
        finally:
            self._holding = False
        self._sync_enabled()
        return self.refresh()

    def refresh(self):
        """Recompute for the controls' current values and show the new figure (errors go to the status line)."""
        import matplotlib.pyplot as plt
        from IPython.display import Image

        state = self.state()
        self.status.value = "<i>computing ...</i>"
        try:
            fig = self.draw(self.compute(**state))
        except KVLabError as e:
            self.status.value = f"<span style='color:#b00'>{e}</span>"
            return None
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        self.figure = fig
        # set the Output widget's state directly: no `with out:` capture (its parent-message routing has
        # been seen to lose the cell's execute_reply under ipykernel 7, hanging papermill/nbclient)
        self.out.outputs = ()
        self.out.append_display_data(Image(data=buf.getvalue(), format="png"))
        m = self.last["metrics"]
        self.status.value = (f"<code>{self.last['spec']}</code> &middot; ppl {m['ppl']:.3f} &middot; "
                             f"KL {m['kl']:.4g} &middot; {m['avg_bits']:.2f} bits")
        return fig


def explorer(lm: LoadedModel, spec: EvalSpec | None = None, methods: Mapping[str, str] | None = None, **initial):
    """Build the explorer for `lm` and return its widget box (`box.explorer` is the `Explorer`).

    `spec`: what to evaluate on (default 512 wiki tokens, one window, fake protocol); `methods`:
    label -> spec template with `{bits}` (and `{outliers}`); `initial`: method, bits, outliers,
    layer, protocol, only_layer.
    """
    return Explorer(lm, spec=spec, methods=methods, **initial).widget
