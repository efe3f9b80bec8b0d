"""Per-token maps from a quantize session, for plots: bits, keep masks, attention received; and bit
accounting helpers the notebooks share (uniform configs at matched bits, PM-KVQ's progressive widths
as the cache grows).

    with kvlab.quantize(lm, "qaq-high", protocol="fake") as run:
        lm.model(ids)                                   # one forward (or prefill + one continuation call)
    bits_k = bit_map(run, "k")                          # [layers, kv_heads, tokens], code bits per value
    keep = keep_map(run)                                # [layers, kv_heads, tokens], False = evicted
    with kvlab.capture(lm, what=("attn",)) as cap:
        lm.model(ids)
    att = attention_map(cap)                            # [layers, kv_heads, tokens], attention received

Where a map comes from:
* QAQ puts its per-group widths in `Quantized.info["bits_k" / "bits_v"]`, shaped [batch, kv_heads,
  tokens handed over] (level "layer" and "token" repeat the group's width over the heads);
* PM-KVQ reports one width per layer and call (`info["bits"]`); uniform-style methods have a fixed
  `bits` (and `v_bits`) field; Q-Hitter stores kept tokens at `bits` and evicted tokens at 0;
* tokens the method did not quantize (fp16 sink, the residual window and continuation of the
  prefill-decode protocol) are stored at 16 bits; evicted tokens (the cache layer's keep mask) at 0.
Maps hold *code* bits per value: scales, zero points, width fields and outliers are metadata that
the session's report adds on top (`bits_table` lines the two up per layer).

The session keeps the info of its last quantization call per layer, so a map describes one forward
in the fake protocol, or a prefill plus one continuation call in the prefill-decode protocol (the
continuation's own tokens are in the cache at full precision and show as 16; the session's report
leaves them out, since they are not stored under the method's rules until the next call).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .errors import KVLabError

__all__ = ["bit_map", "keep_map", "attention_map", "layer_view", "bits_table", "uniform_candidates",
           "nearest_uniform", "compare_matched", "progressive_schedule", "progressive_measured"]


# ----------------------------------------------------------------------------- session maps
def _layers(session):
    cache = session.cache
    if cache is None or not getattr(cache, "layers", None):
        raise KVLabError("the session has no cache yet: run the model inside the `kvlab.quantize` block first")
    return cache.layers


def _span(session, layer, kind: str | None = None) -> tuple[int, int, int]:
    """(start, end, T) of the tokens the method quantized in this cache layer (the protocol's spans), for
    keys or values (`kind`; KIVI's authors' rule keeps different fp windows), or the tokens quantized in both."""
    spans = session.token_spans(layer.layer_idx, kind)
    return spans.sink_end, spans.quantized_end, spans.length


def keep_map(session, batch: int = 0) -> torch.Tensor:
    """Bool [layers, kv_heads, tokens]: False where the method evicted the token (all True without eviction)."""
    out = []
    for layer in _layers(session):
        T = layer.stored_length
        keep = getattr(layer, "keep", None)
        if keep is None:
            keep = torch.ones(layer.keys.shape[0], layer.keys.shape[1], T, dtype=torch.bool)
        out.append(keep[batch, :, -T:].cpu() if keep.shape[-1] >= T else
                   torch.cat([keep[batch].cpu(), torch.ones(keep.shape[1], T - keep.shape[-1], dtype=torch.bool)], -1))
    return torch.stack(out)


def bit_map(session, kind: str = "k", batch: int = 0, fill: float = 16.0) -> torch.Tensor:
    """Code bits per value of every stored token, float [layers, kv_heads, tokens] on the CPU.

    Quantized tokens: the method's width (per token and head for QAQ); tokens kept at full precision:
    `fill` (16); evicted tokens: 0. Raises when the session's last call per layer did not cover the
    whole quantized span (several flushes: the method's info only describes the last one).
    """
    if kind not in ("k", "v"):
        raise KVLabError(f"kind must be 'k' or 'v', got {kind!r}")
    m = session.method
    if m is None:
        raise KVLabError("bit_map needs a `kvlab.quantize` session (a capture session stores no bits)")
    layers = _layers(session)
    keep = keep_map(session, batch)
    maps = []
    for idx, layer in enumerate(layers):
        s, e, T = _span(session, layer, kind)
        h = layer.keys.shape[1]
        row = torch.full((h, T), float(fill))
        info = session.info[idx].get(kind, {}) if idx < len(session.info) else {}
        width = info.get(f"bits_{kind}")
        if torch.is_tensor(width) and width.dim() == 3:
            w = width[batch].float().cpu()
            if w.shape[-1] != e - s:
                raise KVLabError(f"layer {idx}: the method's last call covered {w.shape[-1]} tokens, the quantized "
                                 f"span is {e - s} ({s}..{e}); build maps after one forward (fake) or after a "
                                 "prefill and one continuation call (prefill-decode)")
            row[:, s:e] = w
        else:
            b = info.get("bits")
            if b is None:
                b = getattr(m, "v_bits", None) if kind == "v" else None
                b = b if b is not None else getattr(m, "bits", None)
            if b is None or not isinstance(b, (int, float)) and not torch.is_tensor(b):
                raise KVLabError(f"method '{m.spec}' reports no per-token bits (info['bits_{kind}']) and has no "
                                 "'bits' field: bit maps are defined for QAQ, PM-KVQ, Q-Hitter and uniform-style methods")
            row[:, s:e] = float(b)
        row[~keep[idx]] = 0.0
        maps.append(row)
    return torch.stack(maps)


def attention_map(source, stat: str = "sum", batch: int = 0) -> torch.Tensor:
    """Attention received per key token, float [layers, kv_heads, tokens] on the CPU.

    `source`: a `kvlab.capture(..., what=("attn",))` session (the sum over queries and the query heads
    of each KV head; `stat` must be "sum"), or a `kvlab.quantize` session of an attention-aware method
    (`stat="sum"`: H2O's accumulated attention; `"max"`: QAQ's a_max, the largest attention from the
    last `n_recent` queries).
    """
    if stat not in ("sum", "max"):
        raise KVLabError(f"stat must be 'sum' or 'max', got {stat!r}")
    if "attn" in getattr(source, "capture_what", ()):
        if stat != "sum":
            raise KVLabError("a capture session records the attention *sum*; use a quantize session's stats for 'max'")
        return torch.stack([t[batch].float().cpu() for t in source["attn"]])
    stats = getattr(source, "stats", None)
    if not stats or any(s is None for s in stats):
        raise KVLabError("no attention statistics in this session: capture with what=('attn',), or use a method "
                         "that needs attention (QAQ attention-aware, H2O, Q-Hitter)")
    return torch.stack([(s.received_sum if stat == "sum" else s.received_max)[batch].float().cpu() for s in stats])


def layer_view(maps: torch.Tensor, reduce: str = "mean"):
    """[layers, kv_heads, tokens] -> numpy [layers, tokens], reduced over heads ("mean" | "max" | "min")."""
    fn = {"mean": lambda t: t.float().mean(1), "max": lambda t: t.float().amax(1), "min": lambda t: t.float().amin(1)}
    if reduce not in fn:
        raise KVLabError(f"reduce must be one of {sorted(fn)}, got {reduce!r}")
    return fn[reduce](maps).numpy()


def bits_table(session, batch: int | None = None):
    """Per layer and tensor: the mean of the bit map (code bits, fp16 tokens at 16, evicted at 0) next to the
    session's reported bits per element (metadata included); `meta` = reported - map mean. In the
    prefill-decode protocol both cover the stored cache (the latest call's tokens are left out, as in the report).

    The map covers the session's current cache (its last sequence). With batch=None every row of the batch
    is averaged, which is what the report counts.
    """
    import pandas as pd

    report = session.layer_report()
    layers = _layers(session)
    b = layers[0].keys.shape[0]
    rows = []
    for kind in "kv":
        maps = torch.stack([bit_map(session, kind, i) for i in (range(b) if batch is None else [batch])])
        if session.protocol == "prefill-decode":     # the report covers the stored cache: not the latest call
            means = [maps[:, l, :, :max(layer.stored_length - getattr(layer, "last_new", 0), 0)].mean().item()
                     for l, layer in enumerate(layers)]
        else:
            means = maps.mean(dim=(0, 2, 3)).tolist()
        for layer, mean in enumerate(means):
            rep = float(report.loc[report["layer"] == layer, f"{kind}_bits"].iloc[0])
            rows.append(dict(layer=layer, kind=kind, map_bits=mean, reported_bits=rep, meta=rep - mean))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- accounting for plots
def uniform_candidates(head_dim: int, bits: Sequence[int] = (1, 2, 3, 4, 5, 6, 8), groups: Sequence[int | None] = (None, 32, 16),
                       split: bool = True):
    """Uniform int configs (per-token, asymmetric) with their exact bits per element on `head_dim`-wide
    heads, computed by the method itself on a dummy tensor. `split=True` adds K/V splits with more bits for K.
    Returns a DataFrame: spec, bits_k, bits_v, group, avg_bits."""
    import pandas as pd
    from .quant.base import LayerContext
    from .quant.registry import parse

    x = torch.randn(1, 1, 4, head_dim)
    rows = []
    for g in groups:
        if g is not None and (g >= head_dim or head_dim % g):
            continue
        pairs = [(b, None) for b in bits]
        if split:
            pairs += [(bk, bv) for bk in bits for bv in bits if bv < bk and bk - bv <= 3]
        for bk, bv in pairs:
            spec = f"int:bits={bk}" + (f",v_bits={bv}" if bv is not None else "") + (f",group={g}" if g else "")
            m = parse(spec)
            per = []
            for kind in "kv":
                q = m.quantize(x, LayerContext(layer=0, num_layers=1, kind=kind))
                per.append(float(q.bits) / x.numel())
            rows.append(dict(spec=spec, bits_k=bk, bits_v=bv if bv is not None else bk, group=g,
                             avg_bits=(per[0] + per[1]) / 2, avg_bits_k=per[0], avg_bits_v=per[1]))
    return pd.DataFrame(rows)


def nearest_uniform(target_bits: float, candidates, prefer_split: bool = True) -> str:
    """The candidate spec whose average bits is nearest `target_bits` (ties: fewer bits, then a split)."""
    c = candidates.assign(dist=(candidates["avg_bits"] - target_bits).abs(),
                          split=(candidates["bits_k"] != candidates["bits_v"]).astype(int) * (-1 if prefer_split else 1))
    return str(c.sort_values(["dist", "avg_bits", "split"]).iloc[0]["spec"])


# ----------------------------------------------------------------------------- PM-KVQ progressive cache
def progressive_schedule(method, num_layers: int, lengths: Iterable[int], head_dim: int = 64):
    """PM-KVQ's stored width per layer as the cache grows (its deterministic halving rule, no model run).

    One row per (layer, tokens): bits (the layer's code width), quantized (tokens outside the fp16 sink
    and residual window), budget_bits (allocated final width), over_budget, and avg_bits: bits per
    element of the layer's whole cache = codes + scales/zeros (from the method's own quantizer on a
    `head_dim`-wide dummy) + the fp16 sink and window tokens.
    `method` must be allocated (calibrated, or allocation=uniform) and use `shrink="direct"`: the
    authors' per-forward halving depends on how the tokens arrived (a prefill halves once), so those
    widths come from a real run (`run.step_bits()`, notebook 09). With `flush_block` the fp window is
    what the last 128-token block flush left, `(T - sink) % residual`.
    """
    import pandas as pd
    from .quant.primitives import quantize_uniform

    m = method
    if getattr(m, "shrink", "direct") != "direct":
        raise KVLabError(f"progressive_schedule: '{m.spec}' halves its width at most once per forward "
                         "(shrink=per_forward, the authors' rule), so its widths depend on how the tokens "
                         "arrived, not on the length alone: read them from a decode run (run.step_bits(), "
                         "notebook 09) or pass the method with shrink=direct")
    alloc = m.allocated_bits(num_layers)
    g = min(m.group, head_dim)
    meta = {}
    rows = []
    for T in lengths:
        T = int(T)
        window = (max(T - m.sink_tokens, 0) % m.residual_tokens if getattr(m, "flush_block", False)
                  and m.residual_tokens else m.residual_tokens)
        q = max(T - m.sink_tokens - window, 0)
        for layer in range(num_layers):
            bits, over = m.layer_bits(layer, num_layers, T, q) if q else (m.init_bits, False)
            if bits not in meta:     # as PMKVQ.quantize: full width is stored as plain fp16, no scales
                _, tot = quantize_uniform(torch.zeros(1, 1, 1, head_dim), bits, dim=-1, group=g)
                meta[bits] = 0.0 if bits >= 16 else float(tot) / head_dim - bits
            avg = ((bits + meta[bits]) * q + 16.0 * (T - q)) / T if T else float("nan")
            rows.append(dict(layer=layer, tokens=T, quantized=q, bits=bits if q else float("nan"),
                             budget_bits=alloc[layer], over_budget=bool(over), avg_bits=avg))
    return pd.DataFrame(rows)


@torch.no_grad()
def progressive_measured(lm, method, input_ids: torch.Tensor, lengths: Iterable[int]):
    """PM-KVQ run for real at several lengths: prefill the first T tokens, one continuation token (the
    flush that quantizes), then read the session. One row per (layer, T): bits (the width the method
    used, `info["bits"]`), k_bits / v_bits (the report: bits per element of the T stored tokens, scales
    and the fp16 sink and window included; the continuation token is not stored yet), tokens (= T)."""
    import pandas as pd
    from .hooks import quantize

    ids = input_ids.to(lm.device)
    if ids.dim() == 1:
        ids = ids[None]
    rows = []
    for T in lengths:
        T = int(T)
        if T + 1 > ids.shape[-1]:
            raise KVLabError(f"length {T} needs {T + 1} tokens, input_ids has {ids.shape[-1]}")
        with quantize(lm.model, method, protocol="prefill-decode") as run:
            out = lm.model(ids[:, :T], use_cache=True)
            lm.model(ids[:, T:T + 1], past_key_values=out.past_key_values, use_cache=True)
            rep = run.layer_report()
            info = [dict(run.info[i].get("k", {})) for i in range(len(run.info))]
        for i, r in rep.iterrows():
            b = info[i].get("bits")
            rows.append(dict(layer=int(r["layer"]), tokens=T, prefill=T,
                             bits=float(b) if b is not None else float("nan"),
                             k_bits=float(r["k_bits"]), v_bits=float(r["v_bits"])))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- quality at matched bits
def compare_matched(lm, methods, spec, candidates=None, store=None, progress: bool = False):
    """Evaluate each method on `spec`, then the uniform int config (per token, asymmetric; see
    `uniform_candidates`) whose average bits is nearest the method's (`kvlab.evaluate`'s avg_bits: in
    prefill-decode, the stored context the continuation was scored against), on the same windows.
    One row per method: label, method, protocol, bits, ppl, kl, top1, avg_bits_k, avg_bits_v, then uniform, u_bits, u_ppl, u_kl, u_top1 and d_kl = kl - u_kl. Uniform configs shared by
    several methods are evaluated once. With `store`, results it holds are read back (`run_task`) and
    every new evaluation is written to it.
    """
    import pandas as pd

    from .quant.registry import parse
    from .tasks import Perplexity, run_task

    cand = candidates if candidates is not None else uniform_candidates(lm.head_dim)
    task = Perplexity(spec)
    done: dict[str, dict] = {}

    def run(m):
        key = parse(m).spec
        if key not in done:       # run_task: read from the store when it holds the result, else evaluate
            row = run_task(lm, task, [m], store=store, progress=progress).iloc[0].to_dict()
            row.update(window=spec.window, prefill=spec.prefill, bits=float(row["avg_bits"]))
            done[key] = row
        return done[key]

    rows = []
    for m in methods:
        r = run(m)
        u_spec = nearest_uniform(r["bits"], cand)
        u = run(u_spec)
        rows.append(dict(label=m if isinstance(m, str) else parse(m).spec, method=r["method"], protocol=spec.protocol,
                         bits=r["bits"], ppl=r["ppl"], kl=r["kl"], top1=r["top1"], avg_bits_k=r["avg_bits_k"],
                         avg_bits_v=r["avg_bits_v"], uniform=u["method"], u_bits=u["bits"], u_ppl=u["ppl"],
                         u_kl=u["kl"], u_top1=u["top1"], d_kl=r["kl"] - u["kl"]))
    return pd.DataFrame(rows)
