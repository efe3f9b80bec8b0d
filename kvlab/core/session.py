"""The session: everything kvlab installs on one model, and the dispatch from interception points.

Three interception points (docs/design.md section 2) call into the session:

* the model's forward pre-hook supplies a fresh `KVLabCache` at the start of every sequence and
  starts the protocol's sequence (fake: the fp statistics pass); its post-hook checks finiteness;
* projection hooks (`k_proj`, `k_norm` or the key slice of `qkv_proj`) hand over pre-RoPE keys;
* the cache layer (`kvlab.core.cache`) hands over post-RoPE K/V before it stores them;
* the attention wrapper (`kvlab.core.attention`) applies eviction masks, collects statistics and
  measures the attention-output error.

What to *do* with K/V is the protocol's job (`kvlab.protocols`); what to record is the capture
client's (`kvlab.core.capture`); bits and errors go to the ledger (`kvlab.core.ledger`). Use the
context managers `kvlab.quantize` / `kvlab.capture` (in `kvlab.hooks`) rather than this class.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import KVLabError
from ..protocols import check_protocol, protocol_class
from ..quant.base import AttentionStats, Method
from .arch import AttnSite, Architecture, apply_rope, from_heads, to_heads
from .attention import (StatisticsComplete, accumulate_stats, apply_keep, attention_received, attention_with_stats,
                        wrapped_attention)
from .cache import KVLabCache, KVLabLayer, TokenSpans
from .capture import Recorder
from .external import ExternalCache
from .ledger import Ledger, summarize


class Session:
    """Hooks, cache factory, attention wrapper and their state for one model (one `with` block)."""

    def __init__(self, model: torch.nn.Module, method: Method | None = None, protocol: str = "fake",
                 capture: Iterable[str] = (), max_tokens: int | None = None, to: str | None = None,
                 retain_grad: bool = False, n_recent: int = 1, attn_error: bool = False,
                 measure_bytes: bool = False, pack: bool = False):
        policy_cls = protocol_class(protocol)
        if method is not None:
            check_protocol(method, protocol)
        if getattr(model, "_kvlab_session", None) is not None:
            raise KVLabError("kvlab is already installed on this model (a `quantize` or `capture` block is still "
                             "open); leave it before opening another — nesting is not supported")
        self.arch = Architecture.of(model)
        self.recorder = Recorder(capture, self.arch.n_layers, max_tokens, to, retain_grad)
        if method is not None and method.key_site == "pre_rope" and method.scope == "cache":
            raise KVLabError(f"method '{method.spec}': pre-RoPE keys with whole-cache scope is not supported")
        self.model, self.method, self.protocol_name = model, method, protocol
        # a method that brings its own cache (HF QuantizedCache) needs no hooks but the cache supply
        self.external = ExternalCache(method, model.config, per_step=protocol == "decode") \
            if getattr(method, "replaces_cache", False) else None
        self.policy = policy_cls(self, method) if method is not None and self.external is None else None
        self.attn_error = bool(attn_error and self.policy is not None)
        self.measure_bytes = bool(measure_bytes)
        if self.measure_bytes:
            if self.policy is None or method.scope != "layer":
                raise KVLabError(f"measure_bytes: '{method.spec if method else None}' is not stored span by span "
                                 "under kvlab's own cache (whole-cache methods and HF caches are not packed); "
                                 "drop measure_bytes=True for it")
            from ..pack import check_supported
            check_supported(method)
        self.n_layers = self.arch.n_layers
        self.n_recent = method.n_recent if method is not None else n_recent
        self.ledger = Ledger(self.n_layers)
        self.ledger.measuring = self.measure_bytes
        self.stats: list[AttentionStats | None] = [None] * self.n_layers
        self.info: list[dict] = [dict() for _ in range(self.n_layers)]
        self.phase = "run"                        # "stats" during the fake protocol's fp statistics pass
        self.cache = None                         # the live cache of the current sequence (a KVLabCache or external)
        self.rope: dict[int, tuple] = {}          # layer -> (cos, sin) of the current call
        self.pending_pre: dict[int, torch.Tensor] = {}   # layer -> pre-RoPE keys of the current call
        self.fp_pre: dict[int, torch.Tensor] = {}        # fake, pre-RoPE methods: fp keys for attn_error
        # per forward: fp32 sums (0-d device tensors) and, for each, (layer, name of the summed tensor);
        # checked once, in _post_forward
        self._finite: list[torch.Tensor] = []
        self._finite_names: list[tuple[int, str]] = []
        self._one_device = len({p.device for p in model.parameters()}) <= 1    # else: device_map
        self._handles: list = []
        self._orig_attn: str | None = None
        self.pack = False                         # the cache holds the packed form (`kvlab.pack.enable_packed_cache`)
        if pack:
            from ..pack import enable_packed_cache
            enable_packed_cache(self)

    @property
    def protocol(self) -> str:
        return self.protocol_name

    # -- what needs which interception point ------------------------------------------------------
    @property
    def wants_attention_fn(self) -> bool:
        return self.recorder.wants("q") or self.recorder.wants("attn") or \
            bool(self.method and self.method.needs_attention) or self.attn_error

    @property
    def wants_projection(self) -> bool:
        return self.recorder.wants("k_pre") or bool(self.method and self.method.key_site == "pre_rope")

    # -- install / remove ---------------------------------------------------------------------------
    def install(self) -> "Session":
        try:
            self.model._kvlab_session = self
            self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True))
            for site in self.arch.sites:
                site.module._kvlab_session = self
                if self.wants_projection:
                    site.key_module._kvlab_site = site
                    self._handles.append(site.key_module.register_forward_hook(self._on_keys_pre_rope))
                    self._handles.append(site.module.register_forward_pre_hook(self._on_attention_call,
                                                                               with_kwargs=True))
            if self.wants_attention_fn:
                self._switch_attention()
            if self.external is not None:
                self.external.attach(self.model)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        if self.external is not None:
            self.external.detach()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for site in self.arch.sites:
            for mod, attr in ((site.module, "_kvlab_session"), (site.key_module, "_kvlab_site")):
                if hasattr(mod, attr):
                    delattr(mod, attr)
        if self._orig_attn is not None:
            self.model.set_attn_implementation(self._orig_attn)
            self._orig_attn = None
        if getattr(self.model, "_kvlab_session", None) is self:
            del self.model._kvlab_session

    def _switch_attention(self) -> None:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        orig = self.model.config._attn_implementation or "eager"
        if orig.startswith("kvlab_"):
            raise KVLabError("the model's attention is still wrapped by an earlier kvlab session")
        name = f"kvlab_{orig}"
        if orig not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise KVLabError(f"cannot wrap attention implementation '{orig}': transformers has no mask function for "
                             "it; load the model with attn_implementation='sdpa' or 'eager'")
        AttentionInterface.register(name, wrapped_attention(orig))
        # same mask builder as the wrapped implementation, or the mask silently becomes non-causal
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[orig])
        self.model.set_attn_implementation(name)
        self._orig_attn = orig

    # -- top-level forward: supply the cache, start a sequence, check finiteness ---------------------
    def _pre_forward(self, module, args, kwargs):
        if self.phase == "stats":
            return None
        self._finite.clear()                     # a forward that raised half-way leaves no stale entries
        self._finite_names.clear()
        past = kwargs.get("past_key_values")
        ours = past is not None and (past is self.cache or (isinstance(past, KVLabCache) and past.session is self))
        fresh = past is None or (not ours and past.get_seq_length() == 0)
        if not fresh and not ours:
            raise KVLabError("past_key_values holds tokens but was not created inside this kvlab block; "
                             "run the prefill inside the same `with kvlab.quantize(...)` block")
        if fresh:
            self._new_sequence()
            self.cache = self.external.new_cache() if self.external else KVLabCache(self.model.config, self)
            kwargs["past_key_values"] = self.cache
            kwargs["use_cache"] = True
            if self.policy is not None:
                self.policy.begin_sequence(args, kwargs)
        elif self.external is not None:
            self.external.before_call(past)
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        if self.phase == "stats":
            return None
        if self.policy is not None:
            self.policy.after_call()
        if not self._finite:
            return None
        sums, names = self._finite, self._finite_names
        self._finite, self._finite_names = [], []
        if not self._one_device:                   # layers may sit on several devices (device_map)
            sums = [f.to(sums[0].device, non_blocking=True) for f in sums]
        flags = torch.isfinite(torch.stack(sums))
        if not bool(flags.all()):                  # the one host sync per forward
            layer, name = names[int((~flags).nonzero()[0, 0])]
            raise KVLabError(f"non-finite values (NaN or inf) in the {name} of layer {layer}. Check the "
                             "model dtype (fp16 overflow?), the input, or the method's configuration.")
        return None

    def check_finite(self, a: torch.Tensor, b: torch.Tensor | None, layer: int, names: tuple[str, str]) -> None:
        """Queue fp32 sums of `a` (and `b`) for the end-of-forward check; NaN/inf propagate into a sum."""
        self._finite.append(torch.sum(a, dtype=torch.float32))
        self._finite_names.append((layer, names[0]))
        if b is not None:
            self._finite.append(torch.sum(b, dtype=torch.float32))
            self._finite_names.append((layer, names[1]))

    def _new_sequence(self) -> None:
        if self.policy is not None:
            for key, (n, fp) in self.policy.stored_counts().items():     # the finished sequence's cache, for good
                self.ledger.count(*key, n, fp)
            self.ledger.close_regions()
        self.stats = [None] * self.n_layers
        self.recorder.new_sequence()

    # -- projection hook: pre-RoPE keys -------------------------------------------------------------
    def _on_attention_call(self, module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            self.rope[int(module.layer_idx)] = pe
        return None

    def _on_keys_pre_rope(self, module, inputs, output):
        site: AttnSite = module._kvlab_site
        layer = int(site.module.layer_idx)
        k = to_heads(output, site, self.arch.kv_heads, self.arch.head_dim)
        if self.phase == "stats":
            return None
        if self.recorder.wants("k_pre"):
            self.recorder.record("k_pre", layer, k)
            if self.recorder.retain_grad:       # hand the recorded tensor back so gradients flow through it
                return from_heads(k, output, site)
        if self.policy is None:
            return None
        kq = self.policy.keys_pre_rope(layer, k)
        return None if kq is None else from_heads(kq, output, site)

    # -- cache layer callback -----------------------------------------------------------------------
    def before_store(self, layer: KVLabLayer, k: torch.Tensor, v: torch.Tensor):
        if self.phase == "stats":
            return k, v
        idx = layer.layer_idx
        if self.recorder.wants("k"):
            self.recorder.record("k", idx, k)
        if self.recorder.wants("v"):
            self.recorder.record("v", idx, v)
        self.check_finite(k, v, idx, ("keys", "values"))
        if self.policy is None:
            return k, v
        if self.attn_error:
            self._keep_reference(layer, k, v)
        return self.policy.store(layer, k, v)

    def _keep_reference(self, layer: KVLabLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        """attn_error: keep the full-precision K/V of every stored token beside the cache (post-RoPE;
        for a pre-RoPE method in the fake protocol, RoPE applied to the fp pre-RoPE keys)."""
        idx = layer.layer_idx
        if idx in self.fp_pre:
            cos, sin = self.rope[idx]
            k = apply_rope(self.arch.sites[idx].module, self.fp_pre.pop(idx), cos, sin)
        stored = layer.stored_length                 # sliding layers: what is still stored
        old_k = layer.ref_keys[..., layer.ref_keys.shape[-2] - stored:, :] if layer.ref_keys is not None else None
        old_v = layer.ref_values[..., layer.ref_values.shape[-2] - stored:, :] if layer.ref_values is not None else None
        layer.ref_keys = k if old_k is None or stored == 0 else torch.cat([old_k, k], dim=-2)
        layer.ref_values = v if old_v is None or stored == 0 else torch.cat([old_v, v], dim=-2)

    # -- attention function -------------------------------------------------------------------------
    def attend(self, module, original, query, key, value, attention_mask, *args, **kwargs):
        idx = int(module.layer_idx)
        layer = self.cache.layers[idx] if self.cache is not None and self.phase == "run" else None
        fp_mask = attention_mask
        # a per-query keep mask [b, kvh, q, kv] (the fake protocol's simulation of H2O / Q-Hitter's
        # eviction, decided from this call's own attention) replaces the layer's one keep set
        query_keep = getattr(self.policy, "query_keep", None) if layer is not None else None
        per_query = query_keep(layer, module, query, key, attention_mask, kwargs) if query_keep else None
        if per_query is not None:
            attention_mask = apply_keep(attention_mask, per_query, query.shape[-2], self.arch.n_groups, query.dtype)
        elif layer is not None and layer.keep is not None:
            # aligned at the newest key: a sliding layer's call also reads the token it just dropped
            keep = layer.keep[..., -key.shape[-2]:] if layer.keep.shape[-1] >= key.shape[-2] else \
                torch.cat([torch.ones(*layer.keep.shape[:2], key.shape[-2] - layer.keep.shape[-1],
                                      dtype=torch.bool, device=key.device), layer.keep], dim=-1)
            attention_mask = apply_keep(attention_mask, keep, query.shape[-2], self.arch.n_groups, query.dtype)
        record_attn = self.recorder.wants("attn") and self.phase == "run"
        out = None
        if record_attn or (self.policy is not None and self.policy.wants_statistics(self.phase)):
            scaling = kwargs.get("scaling") or module.scaling
            if _plain_attention(module, kwargs):
                # one fp32 softmax gives the statistics and the output, instead of a second softmax beside
                # the model's kernel (the fake statistics pass, and every call of a statistics-reading
                # method in prefill-decode / decode): equal to the kernel's output to fp32 rounding, so
                # logits are bit-identical to the bare model only when no statistics are asked for
                output, st = attention_with_stats(query, key, value, attention_mask, scaling, self.arch.n_groups,
                                                  self.n_recent, softcap=kwargs.get("softcap"))
                out = (output, None)             # (attn_output, attn_weights), as transformers' kernels return
            else:
                st = attention_received(query, key, attention_mask, scaling, self.arch.n_groups, self.n_recent,
                                        softcap=kwargs.get("softcap"))
            if record_attn:                      # this call's own statistics (accumulating may add in place)
                self.recorder.record("attn", idx, st.received_sum.clone())
            self.stats[idx] = accumulate_stats(self.stats[idx], st, query.shape[-2])
        if self.phase == "stats" and idx == self.n_layers - 1:
            # the fake protocol's statistics pass wants every layer's K/V and statistics, now all taken:
            # the last layer's output, MLP and the LM head would be thrown away
            raise StatisticsComplete
        if self.recorder.wants("q") and self.phase == "run":
            self.recorder.record("q", idx, query)
        if out is None:
            out = original(module, query, key, value, attention_mask, *args, **kwargs)
        # attention-output error at the same queries with fp K/V and no eviction mask, on calls that
        # read a stored cache
        if self.attn_error and layer is not None and layer.ref_keys is not None \
                and layer.ref_keys.shape[-2] >= key.shape[-2] and self.policy.reads_stored_cache(layer):
            n = key.shape[-2]
            ref = original(module, query, layer.ref_keys[..., -n:, :], layer.ref_values[..., -n:, :], fp_mask,
                           *args, **kwargs)
            self.ledger.attention(idx, out[0], ref[0])
        return out

    # -- capture ------------------------------------------------------------------------------------
    def captured_tensors(self, what: str) -> list[torch.Tensor]:
        return self.recorder.tensors(what)

    def __getitem__(self, what: str) -> list[torch.Tensor]:
        return self.recorder.tensors(what)

    # -- report -------------------------------------------------------------------------------------
    def token_spans(self, layer: int, kind: str | None = None) -> TokenSpans:
        """Sink / quantized / full-precision spans of `layer`'s stored tokens in the live cache: of its
        keys (`kind="k"`), its values ("v"), or (None) of the tokens quantized in both (they differ only
        for a method that flushes K and V apart, KIVI's authors' rule)."""
        if self.cache is None or self.policy is None:
            raise KVLabError("token_spans needs a quantize block that has run the model")
        return self.cache.layers[layer].token_spans(kind)

    def step_bits(self) -> dict | None:
        """Decode protocol: the per-step record of the cache each call read (`sequence`, `step`, `tokens`,
        `avg_bits` per step and `layer_bits` [steps, layers]); None in the other protocols."""
        source = self.external if self.external is not None else self.policy
        if self.protocol != "decode" or source is None:
            return None
        return source.step_record()

    def layer_report(self):
        """Per-layer bits per element (metadata included) and relative error for K and V."""
        if self.external is not None:
            return self.external.layer_report()
        live = self.policy.stored_counts() if self.policy is not None else {}
        return self.ledger.table(live)

    def summary(self) -> dict:
        """Average bits per element for K, V and overall, packed bytes, mean relative K/V error."""
        numbers = self.external.summary() if self.external is not None else summarize(self.layer_report())
        if self.policy is not None:
            numbers.update(self.policy.extra_summary())
        return {"method": self.method.spec if self.method is not None else None, "protocol": self.protocol,
                **numbers}


def _plain_attention(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether kvlab's own softmax(q k^T * scale + mask) v reproduces this call (no dropout, no attention
    sinks or other extras of the kernel)."""
    return not module.training and not kwargs.get("dropout") and kwargs.get("sinks") is None \
        and kwargs.get("s_aux") is None
