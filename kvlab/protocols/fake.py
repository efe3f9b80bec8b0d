"""`fake` (teacher forced): one forward per sequence; every position attends to quantized K/V.

Each chunk of K/V is quantized as it enters the cache, so every query, the chunk's own included,
reads the method's reconstruction of every key and value (KVQuant's and KIVI's perplexity protocol,
e.g. KVQuant `quant/llama_simquant.py`'s simulated quantization of k_proj/v_proj outputs). There is
no residual window: every token but the sink is quantized. Methods that need attention statistics
or see the whole cache at once get a full-precision pass over the same input first (statistics
cannot come from a pass that already needs them); it stops after the last layer's attention (its
output, MLP and logits would be discarded).
"""
from __future__ import annotations

import inspect

import torch

from ..core.attention import StatisticsComplete, attention_logits
from ..core.cache import KVLabCache, KVLabLayer, TokenSpans
from ..errors import KVLabError
from ..quant.base import Quantized
from .base import Protocol


class Fake(Protocol):
    name = "fake"

    def begin_sequence(self, args: tuple, kwargs: dict) -> None:
        self.precomputed: list | None = None     # whole-cache methods: per layer (k, v, keep) of the fp pass
        self.stored: dict[int, tuple] = {}       # per-query methods: layer -> (k, v, qk, qv, state) of the call
        if self.method.per_query:                # the mask comes from each call's own attention: no fp pass
            return
        if self.method.needs_attention or self.method.scope == "cache":
            self._statistics_pass(args, kwargs)

    def _statistics_pass(self, args: tuple, kwargs: dict) -> None:
        """A full-precision pass over the same input, for statistics and whole-cache methods."""
        session, model = self.session, self.session.model
        stats_cache = KVLabCache(model.config, session)
        extra = {"past_key_values": stats_cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            extra["logits_to_keep"] = 1          # its logits are not used: skip most of the LM head
        session.phase = "stats"
        try:
            with torch.no_grad():
                model(*args, **{**kwargs, **extra})
        except StatisticsComplete:               # the last layer's statistics are in: the rest is not computed
            pass
        finally:
            session.phase = "run"
        if self.method.scope == "cache":
            per_layer = self.quantize_whole_cache(stats_cache.layers, lambda layer, s, T: T)
            self.precomputed = []
            for layer, (s, e, T, k, new_k, new_v, keep) in zip(stats_cache.layers, per_layer):
                per_token = k[..., :1, :].numel() if k.numel() else 0
                for kind in "kv":
                    session.ledger.count(layer.layer_idx, kind, T * per_token, (T - (e - s)) * per_token)
                self.precomputed.append((new_k, new_v, keep))

    def wants_statistics(self, phase: str) -> bool:
        return self.method.needs_attention and phase == "stats"

    def keys_pre_rope(self, layer: int, k: torch.Tensor) -> torch.Tensor | None:
        if self.method.key_site != "pre_rope":
            return None
        session = self.session
        if session.attn_error:
            session.fp_pre[layer] = k
        start = session.cache.layers[layer].stored_length if session.cache is not None else 0
        return self._quantize_chunk(layer, "k", k, start)

    def store(self, layer: KVLabLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = layer.stored_length
        idx = layer.layer_idx
        if self.method.per_query:
            return self._store_per_query(layer, k, v)
        if self.precomputed is not None:
            kq, vq, keep = self.precomputed[idx]
            t = k.shape[-2]
            if keep is not None:
                layer.keep = keep[..., : start + t]
            return kq[..., start:start + t, :], vq[..., start:start + t, :]
        if self.method.key_site != "pre_rope":
            k = self._quantize_chunk(idx, "k", k, start, layer)
        v = self._quantize_chunk(idx, "v", v, start, layer)
        return k, v

    def _quantize_chunk(self, layer: int, kind: str, x: torch.Tensor, start: int,
                        cache_layer: KVLabLayer | None = None) -> torch.Tensor:
        """Quantize a new chunk (stored positions start..start+t) except the sink tokens it contains."""
        m, ledger = self.method, self.session.ledger
        t = x.shape[-2]
        n_sink = min(max(m.sink_tokens - start, 0), t)
        per_token = x[..., :1, :].numel()
        ledger.count(layer, kind, t * per_token, n_sink * per_token)
        if n_sink == t:
            return x
        q = self.apply(layer, kind, x[..., n_sink:, :], self.context(layer, kind, start + n_sink, start + t, start + t))
        if q.keep is not None and cache_layer is not None:
            keep = torch.ones(*x.shape[:2], start + t, dtype=torch.bool, device=x.device)
            if cache_layer.keep is not None:
                keep[..., :start] = cache_layer.keep[..., :start]
            keep[..., start + n_sink:] = q.keep
            cache_layer.keep = keep
        return torch.cat([x[..., :n_sink, :], q.x], dim=-2) if n_sink else q.x

    # -- per-query simulation (H2O's `local_heavy_hitter_mask`, Q-Hitter's rule row by row) --------------
    def _store_per_query(self, layer: KVLabLayer, k: torch.Tensor, v: torch.Tensor):
        """The whole window enters in one call: the method stores it (Q-Hitter: every token at `bits`);
        the bits are booked once the call's attention has decided what the cache keeps (`query_keep`)."""
        if layer.stored_length or self.method.sink_tokens or self.method.residual_tokens:
            raise KVLabError(f"method '{self.method.spec}': the per-query simulation (fake protocol) takes the "
                             "whole sequence in one forward, without sink or residual tokens")
        state: dict = {}
        qk, qv = self.method.store_tokens(k, v, state)
        self.stored[layer.layer_idx] = (k, v, qk, qv, state)
        return qk.x, qv.x

    def query_keep(self, layer: KVLabLayer, module, query, key, attention_mask, kwargs) -> torch.Tensor | None:
        """The attention wrapper's per-query hook: [b, kvh, q, kv] keep mask of this call, or None."""
        if not self.method.per_query:
            return None
        idx = layer.layer_idx
        k, v, qk, qv, state = self.stored.pop(idx)
        scaling = kwargs.get("scaling") or module.scaling
        n_groups = self.session.arch.n_groups
        logits = attention_logits(query, key, attention_mask, scaling, n_groups, kwargs.get("softcap"))
        mask, keep_end = self.method.query_keep(logits, n_groups, state)
        ledger = self.session.ledger
        for kind, x, q in (("k", k, qk), ("v", v, qv)):
            per_token = x[..., :1, :].numel()
            ledger.count(idx, kind, x.shape[-2] * per_token, 0)
            # the cache as it stands after the window: its kept tokens at their storage, evicted ones 0
            frac = keep_end.sum() / max(keep_end.numel(), 1)
            ledger.quantized(idx, kind, x, Quantized(q.x, q.bits * frac, keep_end, q.info))
            self.session.info[idx][kind] = {**q.info, "keep_ratio": frac}
        layer.keep = keep_end
        return mask

    def token_spans(self, layer: KVLabLayer) -> TokenSpans:
        T = layer.stored_length
        return TokenSpans(self.sink_end(layer), T, T)
