"""The cache-layer interception point: a transformers cache whose layers store what a method returns.

`KVLabCache(config, session)` is the model's own `DynamicCache(config=config)` (so sliding-window
layers stay sliding) with every layer swapped for a subclass of its class with `KVLabLayer` mixed in.
Each `update(k, v)` hands the new post-RoPE keys and values to the session, which quantizes,
records or defers them; the layer itself only keeps the bookkeeping the protocols need:

* `pending_k`, `pending_v`  trailing keys / values not yet quantized (prefill-then-decode keeps them
             fp16 until the method's `flush_count` quantizes them; KIVI's authors' rule flushes keys
             and values at different times). `pending` reads the larger of the two (the trailing
             tokens fp in K or V) and, assigned, sets both,
* `quantized_k`, `quantized_v`  tokens booked under the method in this sequence, per kind
             (`quantized_tokens`: the larger; assigned, sets both),
* `keep`     a bool mask [b, kv_heads, T] of tokens not evicted (None = all kept),
* `k_pre`, `rope`  pre-RoPE keys and their (cos, sin), for methods that quantize before RoPE,
* `fp_keys`, `fp_values`  full-precision shadows, only for methods that re-quantize what is stored,
* `ref_keys`, `ref_values`  full-precision K/V of every stored token, only while the session measures
             the attention-output error (`kvlab.quantize(..., attn_error=True)`).

When a protocol quantizes stored tokens it writes them into the layer's `keys` / `values` in place
where that is safe (`write_tokens`), so a tensor taken from a layer earlier (`cache.layers[i].keys`)
shows the tokens quantized since: clone it to keep a snapshot.

Packed layers (`kvlab.quantize(..., pack=True)`, prefill-decode and decode): the layer holds, per kind,
a `PackedStore` of its fp head (the sink), the quantized region as `kvlab.pack.Packed` chunks (one per
flush, as the protocol hands them over) and its fp tail (the pending tokens). `update` rebuilds the
dense K/V (unpack + concat, pre-RoPE chunks rotated with the layer's cos/sin), lets the session flush
and append as for any layer, returns the dense tensors to the attention and keeps only the store:
between calls `keys` / `values` are meta-device placeholders (shape and dtype, no memory; reading
their values raises) and the dense tensors die with the attention call. `dense()` rebuilds them on
demand; `cache_resident_bytes(cache)` sums what a cache holds, packed or not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ..errors import KVLabError


@dataclass(frozen=True)
class TokenSpans:
    """How one layer's stored tokens [0, length) split under a method and protocol.

    [0, sink_end) full-precision sink tokens; [sink_end, quantized_end) stored under the method's
    rule; [quantized_end, length) full precision, not yet quantized (the residual window and the
    tokens of the latest call in prefill-decode). Positions count stored tokens (a sliding-window
    layer stores fewer than it has seen)."""

    sink_end: int
    quantized_end: int
    length: int

    @property
    def n_quantized(self) -> int:
        return self.quantized_end - self.sink_end

    @property
    def n_fp(self) -> int:
        return self.length - self.n_quantized


class KVLabLayer:
    """Mixin placed in front of a transformers cache layer class (DynamicLayer family)."""

    def kvlab_init(self, session, layer_idx: int) -> None:
        self._kvlab = session
        self.layer_idx = layer_idx
        self.pending_k = 0       # trailing keys not yet quantized
        self.pending_v = 0       # trailing values not yet quantized
        self.keep: torch.Tensor | None = None
        self.k_pre: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fp_keys: torch.Tensor | None = None
        self.fp_values: torch.Tensor | None = None
        self.ref_keys: torch.Tensor | None = None
        self.ref_values: torch.Tensor | None = None
        self.n_seen = 0          # tokens ever added (sliding layers store fewer)
        self.last_new = 0        # tokens added by the latest update (not yet part of the stored cache)
        self.quantized_k = 0     # keys booked under the method in this sequence (a sliding layer may
        self.quantized_v = 0     # have dropped some of them since); values likewise
        # pack=True (`kvlab.quantize`): the packed store; None = the dense cache transformers keeps
        self.packed: PackedStore | None = PackedStore() if getattr(session, "pack", False) else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        session = self._kvlab
        if self.packed is not None:
            self._restore_dense()
        key_states, value_states = session.before_store(self, key_states, value_states)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.packed is not None:              # keep the store; the dense tensors live only in this call
            self._release_dense()
        new = key_states.shape[-2]
        self.n_seen += new
        self.last_new = new
        stored = self.stored_length
        self.pending_k = min(self.pending_k + new, stored)
        self.pending_v = min(self.pending_v + new, stored)
        if self.keep is not None:
            self.keep = _fit(self.keep, stored, True)
        if stored < self.n_seen:                 # a sliding-window layer dropped tokens: so do the shadows
            self._crop_shadows(stored)
        return keys, values

    @property
    def pending(self) -> int:
        """Trailing tokens not yet quantized in K or V (the larger count); assigning sets both kinds."""
        return max(self.pending_k, self.pending_v)

    @pending.setter
    def pending(self, n: int) -> None:
        self.pending_k = self.pending_v = n

    @property
    def quantized_tokens(self) -> int:
        """Tokens booked under the method in this sequence, in K or V (the larger); assigning sets both."""
        return max(self.quantized_k, self.quantized_v)

    @quantized_tokens.setter
    def quantized_tokens(self, n: int) -> None:
        self.quantized_k = self.quantized_v = n

    def pending_of(self, kind: str) -> int:
        """Trailing tokens of `kind` ("k" | "v") not yet quantized."""
        return self.pending_k if kind == "k" else self.pending_v

    def quantized_of(self, kind: str) -> int:
        """Tokens of `kind` ("k" | "v") booked under the method in this sequence."""
        return self.quantized_k if kind == "k" else self.quantized_v

    @property
    def stored_length(self) -> int:
        """Tokens this layer stores now. Not `get_seq_length()`: transformers' sliding-window layers
        return the tokens ever seen there (`cumulative_length`), while they store only the last
        `sliding_window - 1`."""
        return self.keys.shape[-2] if self.is_initialized else 0

    def _crop_shadows(self, stored: int) -> None:
        """Keep the per-token shadows aligned with the stored tokens (the most recent `stored`)."""
        for name in ("k_pre", "fp_keys", "fp_values"):       # ref_* are aligned by the session itself
            t = getattr(self, name)
            if t is not None and t.shape[-2] > stored:
                setattr(self, name, t[..., t.shape[-2] - stored:, :])
        if self.rope is not None and self.rope[0].shape[-2] > stored:
            cos, sin = self.rope
            self.rope = (cos[..., cos.shape[-2] - stored:, :], sin[..., sin.shape[-2] - stored:, :])

    @property
    def dropped(self) -> int:
        """Tokens a sliding-window layer has already dropped from its front."""
        return self.n_seen - self.stored_length

    # -- packed layers (pack=True) -------------------------------------------------------------------
    def add_chunk(self, kind: str, packed, s: int, e: int, rope: bool = False, replace: bool = False) -> None:
        """The protocol stored tokens s..e of `kind` as `packed` (`kvlab.pack.Packed`); `rope`: its values
        are pre-RoPE keys, rotated with `self.rope[s:e]` when rebuilt; `replace`: it replaces every chunk
        (a method that re-derives its whole region, PM-KVQ)."""
        self.packed.add(kind, packed, s, e, rope, replace)

    def _rebuild(self, kind: str) -> torch.Tensor:
        store = self.packed
        parts = [store.head[kind]] if store.head[kind] is not None else []
        t0 = time.perf_counter()
        from ..pack import unpack_chunks         # lazily: kvlab.pack imports the methods, the core does not need them
        chunks, start = store.chunks[kind], 0
        while start < len(chunks):               # runs of chunks alike in `rope`, each unpacked in as few calls as can be
            stop = start + 1
            while stop < len(chunks) and chunks[stop].rope == chunks[start].rope:
                stop += 1
            run = chunks[start:stop]
            for i, j, x in unpack_chunks([c.packed for c in run]):
                if run[i].rope:
                    from .arch import apply_rope
                    s, e = run[i].s, run[j - 1].e
                    cos, sin = self.rope
                    x = apply_rope(self._kvlab.arch.sites[self.layer_idx].module, x, cos[:, s:e], sin[:, s:e])
                parts.append(x)
            start = stop
        store.seconds["unpack"] += time.perf_counter() - t0
        if store.tail[kind] is not None:
            parts.append(store.tail[kind])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V a call reads, as dense tensors: the layer's own for a dense layer; rebuilt from the
        store for a packed one (a copy: the layer keeps holding only its store)."""
        if self.packed is None or not self.is_initialized or not self.keys.is_meta:
            return self.keys, self.values
        return self._rebuild("k"), self._rebuild("v")

    def _restore_dense(self) -> None:
        """Before a call: the dense K/V from the store, where the session's flush and transformers' append
        expect them."""
        if not self.is_initialized or not self.keys.is_meta:
            return
        T = self.keys.shape[-2]
        k, v = self._rebuild("k"), self._rebuild("v")
        if k.shape[-2] != T or v.shape[-2] != T:
            raise KVLabError(f"pack=True: layer {self.layer_idx} holds {k.shape[-2]} packed tokens but reports {T}: "
                             "the cache was cropped or reordered outside kvlab, which a packed cache does not "
                             "support; run without pack=True")
        self.keys, self.values = k, v

    def _release_dense(self) -> None:
        """After the append: keep the fp head and tail (copies: a slice would keep the dense tensor alive)
        and the chunks; `keys` / `values` become meta placeholders."""
        store = self.packed
        for kind, name in (("k", "keys"), ("v", "values")):
            x = getattr(self, name)
            cs, ce = store.covered(kind)
            if ce > x.shape[-2]:
                raise KVLabError(f"pack=True: layer {self.layer_idx} {name}: chunks cover tokens {cs}..{ce} of "
                                 f"{x.shape[-2]}")
            store.head[kind] = x[..., :cs, :].clone() if cs else None
            store.tail[kind] = x[..., ce:, :].clone() if ce < x.shape[-2] else None
            setattr(self, name, torch.empty(x.shape, dtype=x.dtype, device="meta"))

    def token_spans(self, kind: str | None = None) -> TokenSpans:
        """Sink / quantized / full-precision spans of this layer's stored tokens, under the session's
        method and protocol (a capture-only session quantizes nothing: everything is full precision).

        `kind` ("k" | "v") asks for the keys' or the values' spans; None (the default) for the tokens
        quantized in both, which is the same thing unless the method flushes K and V differently
        (KIVI's authors' rule: then `quantized_end` is the smaller of the two, and the tokens after it
        are fp16 in K or V). Protocols whose K and V spans never differ (`fake`) answer every kind alike."""
        if kind not in (None, "k", "v"):
            raise KVLabError(f"token_spans: kind must be 'k', 'v' or None, got {kind!r}")
        policy = getattr(self._kvlab, "policy", None)
        if policy is None:
            return TokenSpans(0, 0, self.stored_length)
        if kind is not None and getattr(policy, "spans_per_kind", False):
            return policy.token_spans(self, kind)
        return policy.token_spans(self)


@dataclass
class Chunk:
    """One flush's tokens s..e of one kind, packed; `rope`: pre-RoPE keys (rotated when rebuilt)."""

    packed: object
    s: int
    e: int
    rope: bool = False


@dataclass
class PackedStore:
    """What a packed layer holds between calls, per kind ("k", "v"): fp head (sink tokens), the packed
    chunks of the quantized region (contiguous, in order), fp tail (tokens not yet quantized)."""

    head: dict = field(default_factory=lambda: {"k": None, "v": None})
    chunks: dict = field(default_factory=lambda: {"k": [], "v": []})
    tail: dict = field(default_factory=lambda: {"k": None, "v": None})
    seconds: dict = field(default_factory=lambda: {"unpack": 0.0, "pack": 0.0})   # time spent, for benchmarks

    def covered(self, kind: str) -> tuple[int, int]:
        """Tokens [start, end) the chunks of `kind` cover ((0, 0): none)."""
        c = self.chunks[kind]
        return (c[0].s, c[-1].e) if c else (0, 0)

    def add(self, kind: str, packed, s: int, e: int, rope: bool = False, replace: bool = False) -> None:
        if e <= s:
            return
        chunks = self.chunks[kind]
        if replace:
            chunks.clear()
        elif chunks and chunks[-1].e != s:
            raise KVLabError(f"pack=True: a chunk of tokens {s}..{e} does not follow the stored ones "
                             f"({chunks[0].s}..{chunks[-1].e})")
        for d in (packed.data, packed.side):     # compact: a view would keep a larger temporary alive
            for name, t in d.items():
                if t.untyped_storage().nbytes() > t.nbytes:
                    d[name] = t.clone()
        if chunks:                           # per-layer tables (codebooks, thresholds): one copy per layer
            prev = chunks[-1].packed.tables
            for name, t in packed.tables.items():
                if name in prev and prev[name].shape == t.shape and prev[name].dtype == t.dtype \
                        and torch.equal(prev[name], t):
                    packed.tables[name] = prev[name]
        chunks.append(Chunk(packed, s, e, rope))

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor held, by part: "packed" (chunk data, tables, side tensors), "fp" (head, tail)."""
        out = {"packed": [], "fp": []}
        for kind in "kv":
            for c in self.chunks[kind]:
                p = c.packed
                out["packed"] += list(p.data.values()) + list(p.tables.values()) + list(p.side.values())
            out["fp"] += [t for t in (self.head[kind], self.tail[kind]) if t is not None]
        return out


_SHADOWS = ("k_pre", "fp_keys", "fp_values", "keep", "ref_keys", "ref_values")


def cache_resident_bytes(cache) -> dict[str, int]:
    """Bytes a cache holds now (between calls), by part, each storage counted once (views of one tensor,
    tables shared by chunks, cos/sin shared by layers):

      packed   the `Packed` chunks of packed layers (codes, metadata, outliers, tables, side tensors);
      fp       full-precision K/V: a dense layer's `keys` / `values`, a packed layer's head and tail;
      aux      what kvlab's simulation keeps beside them: pre-RoPE keys of pending tokens and the cos/sin
               to rotate them (`key_site="pre_rope"`), fp shadows (`rewrites_stored`), keep masks,
               the attn_error reference (ref_keys / ref_values);
      total    the sum.
    A transformers layer that is not kvlab's (an HF QuantizedCache) is measured by
    `kvlab.core.external.ExternalCache.resident_bytes`."""
    seen: set[tuple] = set()
    sizes = {"packed": 0, "fp": 0, "aux": 0}

    def add(part: str, t) -> None:
        if t is None or not torch.is_tensor(t) or t.is_meta or t.numel() == 0:
            return
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key in seen:
            return
        seen.add(key)
        sizes[part] += st.nbytes()

    for layer in cache.layers:
        if not isinstance(layer, KVLabLayer) or not layer.is_initialized:
            continue
        if layer.packed is not None:
            for part, ts in layer.packed.tensors().items():
                for t in ts:
                    add(part, t)
        add("fp", layer.keys)                    # a dense layer (placeholders of a packed one count nothing)
        add("fp", layer.values)
        for name in _SHADOWS:
            add("aux", getattr(layer, name, None))
        if layer.rope is not None:
            for t in layer.rope:
                add("aux", t)
    sizes["total"] = sum(sizes.values())
    return sizes


def write_tokens(stored: torch.Tensor, s: int, e: int, new: torch.Tensor) -> torch.Tensor:
    """`stored` [..., tokens, d] with its tokens s..e replaced by `new`; returns the tensor to keep.

    Written in place (a flush then costs its span, not a copy of the whole cache) unless autograd is
    recording (a graph may have saved the old values), `stored` is an inference tensor outside
    inference mode, shape, dtype or device differ (torch.cat would grow or promote), or `new` lies
    in `stored`'s memory; then a new tensor, as torch.cat builds it. A `new` that IS the span (the
    identity method returns its input) leaves nothing to write. The values are the same either way."""
    span = stored[..., s:e, :]
    same_memory = new.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
    if same_memory and new.data_ptr() == span.data_ptr() and new.shape == span.shape \
            and new.stride() == span.stride() and new.dtype == span.dtype:
        return stored
    if same_memory or torch.is_grad_enabled() or new.shape != span.shape or new.dtype != stored.dtype \
            or new.device != stored.device or (stored.is_inference() and not torch.is_inference_mode_enabled()):
        return torch.cat([stored[..., :s, :], new, stored[..., e:, :]], dim=-2)
    span.copy_(new)
    return stored


def _fit(t: torch.Tensor, length: int, fill) -> torch.Tensor:
    """Pad (with `fill`) or crop the token axis (last) of t to `length`, keeping the most recent."""
    if t.shape[-1] >= length:
        return t[..., t.shape[-1] - length:]
    pad = torch.full((*t.shape[:-1], length - t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=-1)


_SUBCLASSES: dict[type, type] = {}


def _kvlab_class(base: type) -> type:
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"KVLab{base.__name__}", (KVLabLayer, base), {})
    return _SUBCLASSES[base]


class KVLabCache(DynamicCache):
    """A DynamicCache whose layers are KVLabLayer subclasses of the model's own layer types."""

    def __init__(self, config, session):
        super().__init__(config=config)
        self.session = session
        if not self.layers:
            raise RuntimeError("could not build cache layers from the model config")
        for i, layer in enumerate(self.layers):
            # a fresh, empty layer of the kvlab subclass carrying the same settings (e.g. sliding_window)
            ours = object.__new__(_kvlab_class(type(layer)))
            ours.__dict__.update(layer.__dict__)
            ours.kvlab_init(session, i)
            self.layers[i] = ours

