"""The protocol interface: when a sequence's tokens are stored under the method's rule.

A protocol is a cache policy, one small class per file in this package. The session
(`kvlab.core.session`) owns the interception points and calls the protocol at each of them:

    begin_sequence(args, kw)    a fresh forward starts a new sequence (new cache), before the model
                                runs it (fake: the full-precision statistics pass over its input)
    keys_pre_rope(layer, k)     pre-RoPE keys of one call (methods with key_site="pre_rope")
    store(layer, k, v)          new post-RoPE K/V about to enter the cache layer -> what it stores
    after_call()                a forward of the sequence finished (decode: per-step bits)
    wants_statistics(phase)     whether attention statistics are collected in this phase
    reads_stored_cache(layer)   whether this attention call reads tokens stored by earlier calls
    stored_counts()             elements of the live cache not yet in the ledger (for reports)
    token_spans(layer)          sink / quantized / full-precision spans of a layer's stored tokens

The shared mechanics every protocol uses (build a method's `LayerContext`, apply the method to a
span and book its bits and error, hand the whole cache to a `scope="cache"` method) live here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..core.attention import slice_stats
from ..core.cache import KVLabLayer, TokenSpans
from ..errors import KVLabError
from ..quant.base import LayerContext, Method, Quantized

if TYPE_CHECKING:
    from ..core.session import Session


class Protocol:
    """Base class of the cache policies (`fake`, `prefill-decode`, `decode`)."""

    name: ClassVar[str] = "base"

    def __init__(self, session: "Session", method: Method):
        self.session, self.method = session, method
        self._output_names: dict[str, tuple[str, str]] = {}    # kind -> names for the finiteness check

    # -- lifecycle -----------------------------------------------------------------------------------
    def begin_sequence(self, args: tuple, kwargs: dict) -> None:
        """A fresh forward (no past) starts a new sequence; `args`/`kwargs` are that forward's inputs."""

    def after_call(self) -> None:
        """A forward of the sequence finished (the decode protocol books its per-step bits here)."""

    def extra_summary(self) -> dict:
        """Numbers this protocol adds to `run.summary()`."""
        return {}

    # -- interception points ---------------------------------------------------------------------------
    def keys_pre_rope(self, layer: int, k: torch.Tensor) -> torch.Tensor | None:
        """Pre-RoPE keys [b, kvh, t, d] of one call; return replacement keys, or None to leave them."""
        return None

    def store(self, layer: KVLabLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New post-RoPE K/V about to be appended to `layer`: return what the layer stores."""
        raise NotImplementedError

    # -- what the attention wrapper does -----------------------------------------------------------------
    def wants_statistics(self, phase: str) -> bool:
        """Collect attention statistics in this phase ("stats" = fp statistics pass, "run")?"""
        return False

    def reads_stored_cache(self, layer: KVLabLayer) -> bool:
        """Does the current attention call read tokens stored under the method (attention-output error)?"""
        return True

    # -- accounting --------------------------------------------------------------------------------------
    def stored_counts(self) -> dict[tuple[int, str], tuple[int, int]]:
        """{(layer, kind): (elements, fp16 elements)} of the live cache not yet booked in the ledger."""
        return {}

    def token_spans(self, layer: KVLabLayer) -> TokenSpans:
        raise NotImplementedError

    # -- shared mechanics ----------------------------------------------------------------------------------
    def sink_end(self, layer: KVLabLayer) -> int:
        """Stored index where the fp16 sink ends (a sliding layer may have dropped some sink tokens)."""
        sink = self.method.sink_tokens
        if sink == 0:                            # most methods: no sink, nothing to look up per layer
            return 0
        return min(max(sink - layer.dropped, 0), layer.stored_length)

    def context(self, layer: int, kind: str, s: int, e: int, total: int) -> LayerContext:
        """The `LayerContext` a method sees for stored tokens s..e of `layer` (statistics sliced to them)."""
        st = self.session.stats[layer]
        if st is not None:
            st = slice_stats(st, s, e, total)
        elif self.method.needs_attention:
            raise KVLabError(f"method '{self.method.spec}' needs attention statistics but none were collected "
                             f"for layer {layer}")
        # `previous`: the method's info of its previous call on this layer and kind in this sequence ({} at
        # the first: the layer has quantized no token of that kind yet); None in fake, which quantizes
        # every chunk once as it enters (no flush, no history)
        previous = None
        cache = self.session.cache
        if self.name != "fake" and cache is not None and layer < len(cache.layers):
            done = getattr(cache.layers[layer], "quantized_of", None)
            previous = (self.session.info[layer].get(kind) or {}) if done is not None and done(kind) > 0 else {}
        return LayerContext(layer=layer, num_layers=self.session.n_layers, kind=kind, start=s, attention=st,
                            total_tokens=total, previous=previous)

    def apply(self, layer: int, kind: str, x: torch.Tensor, ctx: LayerContext, replace: bool = False) -> Quantized:
        """Run the method on one span, check its shape, queue its finiteness check, book bits and error."""
        q = self.method.quantize(x, ctx)
        if q.x.shape != x.shape:
            raise KVLabError(f"method '{self.method.spec}' returned shape {tuple(q.x.shape)} for {tuple(x.shape)}")
        if self.session.measure_bytes:           # opt-in: the span as real packed tensors (kvlab.pack)
            from ..pack import measured_bytes
            self.session.ledger.packed(layer, kind, measured_bytes(self.method, x, ctx), replace=replace)
        names = self._output_names.get(kind)
        if names is None:                        # built once: `method.spec` formats every field
            name = "keys" if kind == "k" else "values"
            names = self._output_names[kind] = (f"quantized {name} (output of {self.method.spec})", "")
        self.session.check_finite(q.x, None, layer, names)
        self.session.ledger.quantized(layer, kind, x, q, replace=replace)
        self.session.info[layer][kind] = q.info
        return q

    def quantize_whole_cache(self, layers: list[KVLabLayer], end_of) -> list[tuple]:
        """`scope="cache"` methods (QAQ token level): every layer's quantizable tokens in one call.

        `end_of(layer, sink_end, length)` is the end of the span handed over. Returns per layer
        (s, e, T, k, new_k, new_v, keep) with keep padded to the whole layer (None = nothing evicted);
        bits and errors are booked in the ledger."""
        m, session = self.method, self.session
        spans, ks, vs, ctxs_k = [], [], [], []
        for layer in layers:
            T = layer.stored_length
            s = self.sink_end(layer)
            e = end_of(layer, s, T)
            spans.append((s, e, T))
            ks.append(layer.keys[..., s:e, :])
            vs.append(layer.values[..., s:e, :])
            ctxs_k.append(self.context(layer.layer_idx, "k", s, e, T))
        qks, qvs = m.quantize_cache(ks, vs, ctxs_k)
        out = []
        for layer, (s, e, T), k, v, qk, qv in zip(layers, spans, ks, vs, qks, qvs):
            idx = layer.layer_idx
            for kind, x, q in (("k", k, qk), ("v", v, qv)):
                session.ledger.quantized(idx, kind, x, q)
                session.info[idx][kind] = q.info
            keep = qk.keep if qk.keep is not None else qv.keep
            if keep is not None:
                keep = torch.cat([torch.ones(*keep.shape[:2], s, dtype=torch.bool, device=keep.device), keep,
                                  torch.ones(*keep.shape[:2], T - e, dtype=torch.bool, device=keep.device)], dim=-1)
            new_k = torch.cat([layer.keys[..., :s, :], qk.x, layer.keys[..., e:, :]], dim=-2)
            new_v = torch.cat([layer.values[..., :s, :], qv.x, layer.values[..., e:, :]], dim=-2)
            out.append((s, e, T, k, new_k, new_v, keep))
        return out
