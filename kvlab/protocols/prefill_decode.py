"""`prefill-decode`: the prefill is stored full precision, then quantized before the next call reads it.

The first call of a sequence attends to its own full-precision K/V (as a deployed cache's prefill
does). Before each later call, the tokens that left the method's fp residual window are quantized,
`token_group` at a time (KIVI's flush, `quant/llama_kivi.py`), attention-aware methods using the
statistics of the calls so far; so a continuation is scored or generated against the cache the
method keeps. A continuation scored in ONE call attends to its own tokens at full precision (QAQ's
evaluator); scoring token by token (generate, or one token per forward) is the deployed regime.

Per-method traits it honours: `sink` (fp16 tokens at the start), `residual` (fp16 recent tokens),
`token_group`, `key_site="pre_rope"` (keys quantized before RoPE, then rotated with the layer's own
cos/sin), `rewrites_stored` (the whole quantized region re-derived from fp shadows at each flush,
PM-KVQ's progressive cache) and `scope="cache"` (one call over every layer, after the prefill).
"""
from __future__ import annotations

import torch

from ..core.arch import apply_rope
from ..core.cache import KVLabLayer, TokenSpans, write_tokens
from .base import Protocol


class PrefillDecode(Protocol):
    name = "prefill-decode"

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
            layer.rope = (cos, sin) if layer.rope is None else (
                torch.cat([layer.rope[0], cos], dim=-2), torch.cat([layer.rope[1], sin], dim=-2))
        if m.rewrites_stored:
            layer.fp_keys = k if layer.fp_keys is None else torch.cat([layer.fp_keys, k], dim=-2)
            layer.fp_values = v if layer.fp_values is None else torch.cat([layer.fp_values, v], dim=-2)
        return k, v

    def _flush(self, layer: KVLabLayer) -> None:
        """Quantize the pending tokens that left the residual window, in whole token groups."""
        m = self.method
        if layer.pending == 0:
            return
        if m.scope == "cache":
            if layer.layer_idx == 0 and not self.whole_cache_done:
                self._quantize_whole_cache()
                self.whole_cache_done = True     # later tokens stay full precision
            return
        T = layer.stored_length
        start = T - layer.pending
        sink_end = self.sink_end(layer)
        if start < sink_end:
            start = sink_end
            layer.pending = T - start
        n = ((T - m.residual_tokens - start) // m.token_group) * m.token_group
        if n <= 0:
            return
        e = start + n
        s = sink_end if m.rewrites_stored else start
        idx = layer.layer_idx
        if m.key_site == "pre_rope":
            k_src = layer.k_pre[..., s:e, :]
        else:
            k_src = layer.fp_keys[..., s:e, :] if m.rewrites_stored else layer.keys[..., s:e, :]
        v_src = layer.fp_values[..., s:e, :] if m.rewrites_stored else layer.values[..., s:e, :]
        qk = self.apply(idx, "k", k_src, self.context(idx, "k", s, e, T), replace=m.rewrites_stored)
        qv = self.apply(idx, "v", v_src, self.context(idx, "v", s, e, T), replace=m.rewrites_stored)
        k_new = qk.x
        if m.key_site == "pre_rope":
            cos, sin = layer.rope
            k_new = apply_rope(self.session.arch.sites[idx].module, k_new, cos[:, s:e], sin[:, s:e])
        layer.keys = write_tokens(layer.keys, s, e, k_new)        # in place where safe: no copy of the cache
        layer.values = write_tokens(layer.values, s, e, qv.x)
        keep = qk.keep if qk.keep is not None else qv.keep
        if keep is not None:
            full = layer.keep if layer.keep is not None else torch.ones(
                *layer.keys.shape[:2], T, dtype=torch.bool, device=keep.device)
            layer.keep = torch.cat([full[..., :s], keep, full[..., e:]], dim=-1)
        layer.pending = T - e
        layer.quantized_tokens = e - sink_end if m.rewrites_stored else layer.quantized_tokens + n

    def _quantize_whole_cache(self) -> None:
        layers = self.session.cache.layers
        residual = self.method.residual_tokens
        per_layer = self.quantize_whole_cache(layers, lambda layer, s, T: max(s, T - residual))
        for layer, (s, e, T, k, new_k, new_v, keep) in zip(layers, per_layer):
            layer.keys, layer.values = new_k, new_v
            layer.keep = keep if keep is not None else layer.keep
            layer.pending = T - e
            layer.quantized_tokens = e - s

    def stored_counts(self) -> dict[tuple[int, str], tuple[int, int]]:
        """Element counts of the stored cache per (layer, kind): (elements, fp16 elements).

        The tokens of the latest call are left out: they were attended to at full precision within
        that call and have not been stored under the method's rules yet (the next call flushes
        them). So the bits describe the cache the latest call was scored against.
        """
        counts = {}
        cache = self.session.cache
        if cache is None:
            return counts
        for layer in cache.layers:
            c = self.layer_counts(layer)
            if c is not None:
                for kind in "kv":
                    counts[(layer.layer_idx, kind)] = c
        return counts

    def layer_counts(self, layer: KVLabLayer) -> tuple[int, int] | None:
        """(elements, fp16 elements) of one layer's stored K (the same for V), as in `stored_counts`;
        None for a layer that stores nothing yet. The ledger books a token's bits when it is quantized,
        so a sliding-window layer that has since dropped quantized tokens counts them too: its bits
        per element average every token it quantized in the sequence plus the fp16 ones it holds."""
        if not layer.is_initialized or layer.keys.numel() == 0:
            return None
        b, h, T, d = layer.keys.shape
        stored = T - min(layer.last_new, T)
        quantized = T - layer.pending - self.sink_end(layer)
        if self.method.scope == "cache" and not self.whole_cache_done:
            quantized = 0
        quantized = max(min(quantized, stored), 0)
        if layer.dropped:   # a sliding layer: its booked bits include tokens it has dropped since; count them
            return (layer.quantized_tokens + stored - quantized) * b * h * d, (stored - quantized) * b * h * d
        return stored * b * h * d, (stored - quantized) * b * h * d

    def token_spans(self, layer: KVLabLayer) -> TokenSpans:
        T = layer.stored_length
        s = self.sink_end(layer)
        return TokenSpans(s, max(s, T - layer.pending), T)
