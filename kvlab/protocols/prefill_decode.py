"""`prefill-decode`: the prefill is stored full precision, then quantized before the next call reads it.

The first call of a sequence attends to its own full-precision K/V (as a deployed cache's prefill
does). Before each later call, each layer's pending fp tokens are flushed per kind as the method's
`flush_count(kind, pending, stored)` says (default: the whole `token_group`s that left the fp
residual window, the same for K and V; KIVI's authors' rule keeps separate key and value buffers,
`models/llama_kivi.py` of jy-yuan/KIVI), attention-aware methods using the statistics of the calls
so far; so a continuation is scored or generated against the cache the method keeps. Flushing in
`store`, before the next call's attention, is the authors' flush after the previous call's attention.
A continuation scored in ONE call attends to its own tokens at full precision (QAQ's evaluator);
scoring token by token (generate, or one token per forward) is the deployed regime.

Per-method traits it honours: `sink` (fp16 tokens at the start), `residual` (fp16 recent tokens),
`token_group`, `key_site="pre_rope"` (keys quantized before RoPE, then rotated with the layer's own
cos/sin), `rewrites_stored` (the whole quantized region re-derived from fp shadows at each flush,
PM-KVQ's progressive cache) and `scope="cache"` (one call over every layer, after the prefill).

`pack=True` (`kvlab.quantize`; `self.pack`): each flush also packs its span (`kvlab.pack.pack`, the
same input and context as the method's call) and hands the `Packed` chunk to the layer
(`KVLabLayer.add_chunk`; a `rewrites_stored` method's region replaces the layer's chunks), which
then holds chunks + fp head/tail between calls and rebuilds the dense K/V per call
(`kvlab.core.cache`); the chunks' bytes go to the ledger (`packed_bytes_measured`). Pre-RoPE keys
are kept for the pending tokens only, and the layers share one cos/sin table where the model hands
every layer the same one. `extra_summary` adds `cache_resident_bytes` (and its parts).
"""
from __future__ import annotations

import torch

from ..core.arch import apply_rope
from ..core.cache import KVLabLayer, TokenSpans, write_tokens
from ..quant.base import Quantized
from .base import Protocol


class PrefillDecode(Protocol):
    name = "prefill-decode"
    pack = False                                 # set by `kvlab.quantize(..., pack=True)`

    def begin_sequence(self, args: tuple, kwargs: dict) -> None:
        self.whole_cache_done = False            # scope="cache": quantized once, after the prefill

    def wants_statistics(self, phase: str) -> bool:
        return self.method.needs_attention

    def reads_stored_cache(self, layer: KVLabLayer) -> bool:
        return layer.n_seen > layer.last_new     # the prefill attends to its own fp K/V: zero error by design

    def keys_pre_rope(self, layer: int, k: torch.Tensor) -> torch.Tensor | None:
        if self.method.key_site == "pre_rope":
            self.session.pending_pre[layer] = k  # stored with the post-RoPE keys in `store`
        return None

    def store(self, layer: KVLabLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, session = self.method, self.session
        self._flush(layer)
        idx = layer.layer_idx
        if m.key_site == "pre_rope":
            pre = session.pending_pre.pop(idx)
            layer.k_pre = pre if layer.k_pre is None else torch.cat([layer.k_pre, pre], dim=-2)
            cos, sin = session.rope[idx]
            shared = self._shared_rope(layer, cos) if self.pack else None
            layer.rope = shared if shared is not None else (cos, sin) if layer.rope is None else (
                torch.cat([layer.rope[0], cos], dim=-2), torch.cat([layer.rope[1], sin], dim=-2))
        if m.rewrites_stored:
            layer.fp_keys = k if layer.fp_keys is None else torch.cat([layer.fp_keys, k], dim=-2)
            layer.fp_values = v if layer.fp_values is None else torch.cat([layer.fp_values, v], dim=-2)
        return k, v

    def _shared_rope(self, layer: KVLabLayer, cos: torch.Tensor):
        """pack=True: layer 0's cos/sin when this call handed every layer the same ones and layer 0's
        table covers exactly this layer's tokens (one table for the cache, not one per layer); else None."""
        session = self.session
        if layer.layer_idx == 0 or session.rope.get(0, (None,))[0] is not cos:
            return None
        first = session.cache.layers[0]
        mine = layer.rope[0].shape[-2] if layer.rope is not None else 0
        if first.rope is None or first.rope[0].shape[-2] != mine + cos.shape[-2]:
            return None
        if layer.rope is not None and layer.rope[0].untyped_storage().data_ptr() != \
                first.rope[0].untyped_storage().data_ptr() and not torch.equal(layer.rope[0], first.rope[0][:, :mine]):
            return None
        return first.rope

    def _k_pre(self, layer: KVLabLayer, s: int, e: int, T: int) -> torch.Tensor:
        """Pre-RoPE keys of stored tokens s..e (a packed layer keeps only its pending ones: offset)."""
        off = T - layer.k_pre.shape[-2]
        return layer.k_pre[..., s - off:e - off, :]

    def _flush(self, layer: KVLabLayer) -> None:
        """Quantize, per kind, the oldest `method.flush_count(kind, pending, T)` pending tokens (K, then V)."""
        m = self.method
        if layer.pending == 0:
            return
        if m.scope == "cache":
            if m.per_step:                       # H2O / Q-Hitter as their authors run them: every flush
                self._step_cache(layer)
            elif layer.layer_idx == 0 and not self.whole_cache_done:
                self._quantize_whole_cache()
                self.whole_cache_done = True     # later tokens stay full precision
            return
        T = layer.stored_length
        sink_end = self.sink_end(layer)
        spans = []                               # (kind, s, e, n) per kind that flushes now
        for kind in "kv":
            pending = min(layer.pending_of(kind), T - sink_end)     # a sliding layer may have dropped sink tokens
            if kind == "k":
                layer.pending_k = pending
            else:
                layer.pending_v = pending
            n = m.flush_count(kind, pending, T) if pending > 0 else 0
            if n > 0:
                start = T - pending
                spans.append((kind, sink_end if m.rewrites_stored else start, start + n, n))
        if not spans:
            return
        idx = layer.layer_idx
        keep_span = None
        for kind, s, e, n in spans:              # K first, then V (the ledger's and the checks' order)
            if kind == "k":
                if m.key_site == "pre_rope":
                    src = self._k_pre(layer, s, e, T)
                else:
                    src = layer.fp_keys[..., s:e, :] if m.rewrites_stored else layer.keys[..., s:e, :]
            else:
                src = layer.fp_values[..., s:e, :] if m.rewrites_stored else layer.values[..., s:e, :]
            ctx = self.context(idx, kind, s, e, T)
            q = self.apply(idx, kind, src, ctx, replace=m.rewrites_stored)
            if self.pack:
                self._pack_span(layer, kind, src, ctx, s, e)
            if kind == "k":
                k_new = q.x
                if m.key_site == "pre_rope":
                    cos, sin = layer.rope
                    k_new = apply_rope(self.session.arch.sites[idx].module, k_new, cos[:, s:e], sin[:, s:e])
                layer.keys = write_tokens(layer.keys, s, e, k_new)      # in place where safe: no copy of the cache
                layer.pending_k = T - e
                layer.quantized_k = e - sink_end if m.rewrites_stored else layer.quantized_k + n
            else:
                layer.values = write_tokens(layer.values, s, e, q.x)
                layer.pending_v = T - e
                layer.quantized_v = e - sink_end if m.rewrites_stored else layer.quantized_v + n
            if q.keep is not None and keep_span is None:                # the keys' mask first, as before
                keep_span = (q.keep, s, e)
        if keep_span is not None:
            keep, s, e = keep_span
            full = layer.keep if layer.keep is not None else torch.ones(
                *layer.keys.shape[:2], T, dtype=torch.bool, device=keep.device)
            layer.keep = torch.cat([full[..., :s], keep, full[..., e:]], dim=-1)
        if self.pack and m.key_site == "pre_rope" and layer.k_pre is not None:
            keep_from = T - layer.pending_k      # the flushed keys' pre-RoPE copies are no longer needed
            off = T - layer.k_pre.shape[-2]
            if keep_from > off:
                layer.k_pre = layer.k_pre[..., keep_from - off:, :]   # `store` concatenates next: a new tensor

    def _pack_span(self, layer: KVLabLayer, kind: str, src: torch.Tensor, ctx, s: int, e: int) -> None:
        """pack=True: the span as the method stores it (`kvlab.pack`), handed to the layer as a chunk."""
        import time

        from ..pack import pack

        m, session = self.method, self.session
        t0 = time.perf_counter()
        p = pack(m, src, ctx)
        layer.packed.seconds["pack"] += time.perf_counter() - t0
        layer.add_chunk(kind, p, s, e, rope=kind == "k" and m.key_site == "pre_rope", replace=m.rewrites_stored)
        if not session.measure_bytes:            # measure_bytes books its own packing of the span (Protocol.apply)
            session.ledger.packed(layer.layer_idx, kind, p.nbytes, replace=m.rewrites_stored)

    def resident_bytes(self) -> dict[str, int]:
        """What the live cache holds now (between calls), by part: `kvlab.core.cache.cache_resident_bytes`."""
        from ..core.cache import cache_resident_bytes

        cache = self.session.cache
        if cache is None:
            return {"packed": 0, "fp": 0, "aux": 0, "total": 0}
        return cache_resident_bytes(cache)

    def extra_summary(self) -> dict:
        if not self.pack:
            return {}
        r = self.resident_bytes()
        return {"cache_resident_bytes": r["total"], "cache_resident_packed_bytes": r["packed"],
                "cache_resident_fp_bytes": r["fp"], "cache_resident_aux_bytes": r["aux"]}

    def _quantize_whole_cache(self) -> None:
        layers = self.session.cache.layers
        residual = self.method.residual_tokens
        per_layer = self.quantize_whole_cache(layers, lambda layer, s, T: max(s, T - residual))
        for layer, (s, e, T, k, new_k, new_v, keep) in zip(layers, per_layer):
            layer.keys, layer.values = new_k, new_v
            layer.keep = keep if keep is not None else layer.keep
            layer.pending = T - e
            layer.quantized_tokens = e - s

    def _step_cache(self, layer: KVLabLayer) -> None:
        """A `per_step` whole-cache method (`Method.step_cache`): the tokens that entered the layer's span
        (sink .. T - residual) since the last flush join it and the method re-decides the whole span
        (H2O / Q-Hitter: accumulate, store the new tokens, evict down to the budget; never un-evict).

        Bits: the span's bits as it now stands replace the layer's previous record (a ledger region,
        as PM-KVQ's rewrites), so evicted tokens cost 0 and kept ones their storage at every step; the
        error of each token is booked once, when it is stored."""
        m, session = self.method, self.session
        idx = layer.layer_idx
        T = layer.stored_length
        s = self.sink_end(layer)
        e = max(s, T - m.residual_tokens)
        state = getattr(layer, "method_state", None)
        if state is None:
            state = layer.method_state = {}
        prev_end = state.get("_span_end", layer.dropped + s)    # absolute position (tokens ever seen)
        new = min(e + layer.dropped - prev_end, e - s)
        if new <= 0:
            return
        state["_span_end"] = e + layer.dropped
        keep = layer.keep[..., s:e] if layer.keep is not None else None
        ctx = self.context(idx, "k", s, e, T)
        k_new, v_new = layer.keys[..., e - new:e, :], layer.values[..., e - new:e, :]
        qk, qv = m.step_cache(layer.keys[..., s:e, :], layer.values[..., s:e, :], ctx, keep, new, state)
        for kind, x, q in (("k", k_new, qk), ("v", v_new, qv)):
            zero = torch.zeros((), dtype=q.bits.dtype, device=q.bits.device)
            session.ledger.quantized(idx, kind, x, Quantized(q.x, zero))                 # the new tokens' error
            empty = x[..., :0, :]
            session.ledger.quantized(idx, kind, empty, Quantized(empty, q.bits), replace=True)   # the span's bits
            session.info[idx][kind] = q.info
        layer.keys = write_tokens(layer.keys, e - new, e, qk.x)
        layer.values = write_tokens(layer.values, e - new, e, qv.x)
        span_keep = qk.keep if qk.keep is not None else qv.keep
        if span_keep is not None:
            full = layer.keep if layer.keep is not None else torch.ones(
                *layer.keys.shape[:2], T, dtype=torch.bool, device=span_keep.device)
            layer.keep = torch.cat([full[..., :s], span_keep, full[..., e:]], dim=-1)
        layer.pending = T - e
        layer.quantized_tokens = e - s
        self.whole_cache_done = True             # the span is stored under the method (`layer_counts`)

    def stored_counts(self) -> dict[tuple[int, str], tuple[int, int]]:
        """Element counts of the stored cache per (layer, kind): (elements, fp16 elements).

        The tokens of the latest call are left out: they were attended to at full precision within
        that call and have not been stored under the method's rules yet (the next call flushes
        them). So the bits describe the cache the latest call was scored against. K and V are
        counted apart (their fp16 windows differ under KIVI's authors' flush).
        """
        counts = {}
        cache = self.session.cache
        if cache is None:
            return counts
        for layer in cache.layers:
            for kind in "kv":
                c = self.layer_counts(layer, kind)
                if c is not None:
                    counts[(layer.layer_idx, kind)] = c
        return counts

    def layer_counts(self, layer: KVLabLayer, kind: str = "k") -> tuple[int, int] | None:
        """(elements, fp16 elements) of one layer's stored keys (`kind="k"`) or values ("v"), as in
        `stored_counts`; None for a layer that stores nothing yet. The fp16 ones are the sink and the
        kind's own pending tokens (`pending_k` / `pending_v`). The ledger books a token's bits when it
        is quantized, so a sliding-window layer that has since dropped quantized tokens counts them too:
        its bits per element average every token it quantized in the sequence plus the fp16 ones it holds."""
        if not layer.is_initialized or layer.keys.numel() == 0:
            return None
        x = layer.keys if kind == "k" else layer.values
        b, h, T, d = x.shape
        stored = T - min(layer.last_new, T)
        quantized = T - layer.pending_of(kind) - self.sink_end(layer)
        if self.method.scope == "cache" and not self.whole_cache_done:
            quantized = 0
        quantized = max(min(quantized, stored), 0)
        if layer.dropped:   # a sliding layer: its booked bits include tokens it has dropped since; count them
            return (layer.quantized_of(kind) + stored - quantized) * b * h * d, (stored - quantized) * b * h * d
        return stored * b * h * d, (stored - quantized) * b * h * d

    spans_per_kind = True      # `token_spans(layer, kind)` answers for keys and values apart

    def token_spans(self, layer: KVLabLayer, kind: str | None = None) -> TokenSpans:
        """The layer's sink / quantized / fp16 spans for keys (`kind="k"`), values ("v"), or (None) the
        tokens quantized in both: `quantized_end` is then the smaller of the two ends (the trailing
        `layer.pending` tokens are fp16 in K or V), the same as either kind for every method that
        flushes K and V together."""
        T = layer.stored_length
        s = self.sink_end(layer)
        pending = layer.pending if kind is None else layer.pending_of(kind)
        return TokenSpans(s, max(s, T - pending), T)
