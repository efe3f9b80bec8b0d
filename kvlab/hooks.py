"""The two ways in: `kvlab.quantize` and `kvlab.capture`, context managers around a core session.

    with kvlab.quantize(model, "kivi-2", protocol="prefill-decode") as run:
        out = model(context_ids)                                   # prefill at full precision
        cont = model(continuation_ids, past_key_values=out.past_key_values)   # scored on the quantized cache
    run.summary()    # average bits (K, V, overall), packed bytes, relative K/V error

    with kvlab.capture(model, what=("k_pre", "k", "v", "q", "attn")) as cap:
        model(ids)
    cap["k_pre"][layer]   # [batch, kv_heads, tokens, head_dim]

Each installs a `kvlab.core.session.Session` (projection hooks, cache layers, attention wrapper:
docs/design.md section 2) and always removes it, also when the block raises. The protocols
(docs/design.md section 3) are policy classes in `kvlab.protocols`, one file each.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .core.session import Session
from .protocols import PROTOCOLS
from .quant.base import Method
from .quant.registry import parse

__all__ = ["quantize", "capture", "PROTOCOLS", "Session"]


def _module(model) -> torch.nn.Module:
    """The torch module of an nn.Module or a `LoadedModel`."""
    return model if isinstance(model, torch.nn.Module) else getattr(model, "model", model)


@contextlib.contextmanager
def quantize(model, method: Method | str, protocol: str = "fake", attn_error: bool = False,
             measure_bytes: bool = False, pack: bool = False) -> Iterator[Session]:
    """Quantize the KV cache of `model` (an nn.Module or LoadedModel) with `method` inside the block.

    The model is restored exactly on exit, also when the block raises. With `attn_error=True` every
    attention call is also run on full-precision K/V at the same queries (and without eviction), and
    `run.layer_report()["attn_rel_err"]` / `run.summary()["attn_rel_err"]` give the per-layer relative
    attention-output error ||A(q, K^, V^) - A(q, K, V)|| / ||A(q, K, V)|| (accumulated over calls);
    it costs a second attention computation and an fp copy of the cache.

    With `measure_bytes=True` every span the method stores is also packed into real tensors
    (`kvlab.pack`) and `run.summary()["packed_bytes_measured"]` sums their bytes (fp16 sink and window
    tokens at 2 bytes each) beside the accounted `packed_bytes`; it costs a second quantization of each
    span and host syncs. Methods without packed storage are refused when the block opens.

    With `pack=True` (protocols prefill-decode and decode, layer-scope methods `kvlab.pack` supports) the
    cache holds what a packed cache stores: each flush's span as a `kvlab.pack.Packed` chunk, the fp16
    sink and pending tokens as dense tensors; the dense K/V each attention call reads is rebuilt (unpack
    + concat) per call and released after it. The logits are bit-identical to the same run without it;
    `run.summary()` adds `cache_resident_bytes` (what the cache holds between calls; parts `_packed`,
    `_fp`, `_aux`) and `packed_bytes_measured`. It costs a second quantization per flush (packing) and
    the unpacking of the whole cache per call.
    """
    session = Session(_module(model), parse(method), protocol, attn_error=attn_error,
                      measure_bytes=measure_bytes, pack=pack).install()
    try:
        yield session
    finally:
        session.remove()


@contextlib.contextmanager
def capture(model, what: Iterable[str] = ("k_pre", "k", "v"), max_tokens: int | None = None,
            to: str | None = None, retain_grad: bool = False, n_recent: int = 1) -> Iterator[Session]:
    """Record per-layer tensors: `cap[what][layer]` is [batch, kv_heads, tokens, head_dim]
    ("q": [batch, heads, tokens, head_dim]; "attn": attention received [batch, kv_heads, tokens]).

    `max_tokens` keeps the first N tokens; `to="cpu"` moves results once, on access;
    `retain_grad=True` keeps them in the autograd graph (for gradient-based calibration).
    """
    session = Session(_module(model), None, "fake", capture=what, max_tokens=max_tokens, to=to,
                      retain_grad=retain_grad, n_recent=n_recent).install()
    try:
        yield session
    finally:
        session.remove()
