"""The attention-function interception point: statistics and eviction masks around the model's own kernel.

`wrapped_attention(original)` returns a function with the signature transformers' AttentionInterface
expects. It (1) hides evicted key tokens (a `keep` mask from the cache layer), (2) when a session
asks, computes attention *received* per key token from full softmax probabilities in chunks of
queries (memory O(chunk * T)), and (3) calls the original implementation (sdpa, eager, ...) for
the output, so with nothing asked the logits are bit-identical to the bare model.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from ..quant.base import AttentionStats

QUERY_CHUNK = 256


class StatisticsComplete(Exception):
    """Raised by the session at the last layer's attention during a statistics pass (`phase == "stats"`):
    every layer's K/V and statistics are taken, so the caller stops the forward there (the fake protocol)."""


def original_attention(module: torch.nn.Module, name: str) -> Callable:
    """The attention function a module would call for implementation `name` (eager lives in its modeling file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS._global_mapping and name != "eager":
        return ALL_ATTENTION_FUNCTIONS._global_mapping[name]
    return sys.modules[type(module).__module__].eager_attention_forward


def causal_keep_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """A boolean 'may attend' mask [b|1, 1|h, q, kv] from whatever transformers passed (None = causal)."""
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        return (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., -kv_len:]
    return attention_mask[..., -kv_len:] > torch.finfo(attention_mask.dtype).min / 2


def apply_keep(attention_mask, keep: torch.Tensor, q_len: int, n_groups: int, dtype) -> torch.Tensor:
    """Combine the model's mask with a per-KV-head keep mask (False = evicted): [b, kvh, kv], one set
    for every query, or [b, kvh, q, kv], one set per query (H2O's teacher-forced simulation)."""
    kv_len = keep.shape[-1]
    keep_q = keep.repeat_interleave(n_groups, dim=1)
    if keep.dim() == 3:
        keep_q = keep_q[:, :, None, :]                                         # [b, h, 1, kv]
    allowed = causal_keep_mask(attention_mask, q_len, kv_len, keep.device) & keep_q
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return torch.zeros(allowed.shape, dtype=attention_mask.dtype, device=keep.device).masked_fill(
            ~allowed, torch.finfo(attention_mask.dtype).min)
    return allowed


def attention_received(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float,
                       n_groups: int, n_recent: int, softcap: float | None = None,
                       chunk: int = QUERY_CHUNK) -> AttentionStats:
    """Attention each key token receives, per KV head (its GQA query heads aggregated): `_attend`'s
    statistics, the model's own kernel computing the output."""
    return _attend(query, key, None, attention_mask, scaling, n_groups, n_recent, softcap, chunk)[0]


def attention_with_stats(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                         scaling: float, n_groups: int, n_recent: int, softcap: float | None = None,
                         chunk: int = QUERY_CHUNK) -> tuple[torch.Tensor, AttentionStats]:
    """The attention output [b, q, heads, d] (the layout transformers' attention functions return) computed
    from the same fp32 probabilities as the statistics, so one pass of softmax serves both: the fake
    protocol's statistics pass uses it instead of the model's kernel (its logits are discarded; fp32
    probabilities against sdpa's own: equal to ~1e-6)."""
    stats, out = _attend(query, key, value, attention_mask, scaling, n_groups, n_recent, softcap, chunk)
    return out.transpose(1, 2).contiguous().to(query.dtype), stats


def _attend(query, key, value, attention_mask, scaling, n_groups, n_recent, softcap, chunk):
    """Statistics of one attention call and, when `value` is given, its output [b, heads, q, d] (else None).

    received_sum[b, g, j] = sum over queries i and heads h in group g of softmax_j(q_i k_j * scale)
    received_max[b, g, j] = max over the last `n_recent` queries and heads of group g (QAQ a_max)
    recent[b, g, r, j]    = the same per query: row r is the r-th of the call's last min(q, n_recent)
                            queries (oldest first), its heads of group g folded by max; what
                            `accumulate_stats` slides across calls (QAQ's attention window)
    Probabilities are computed in fp32, `chunk` queries at a time, each chunk only against the keys at
    or before its last query (causal LMs), which halves the work of a full prefill.
    """
    b, h, q_len, d = query.shape
    kv_len, kvh, g = key.shape[-2], key.shape[1], n_groups
    kt = key.float().transpose(-1, -2)           # [b, kvh, d, T]: a group's query heads share it (no repeat)
    if q_len == 1 and attention_mask is None:    # a decode step: one query sees every key, nothing to mask
        logits = torch.matmul((query.float() * scaling).view(b, kvh, g, d), kt)   # [b, kvh, g, T]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        probs = torch.softmax(logits, dim=-1)
        recent = probs.amax(2, keepdim=True)                                        # [b, kvh, 1, T]
        stats = AttentionStats(received_sum=probs.sum(2), received_max=recent[:, :, 0], n_recent=n_recent,
                               query_norm=query.float().norm(dim=-1).view(b, kvh, g).amax(2), recent=recent)
        out = torch.matmul(probs, value.float()).view(b, h, 1, -1) if value is not None else None
        return stats, out
    total = torch.zeros(b, kvh, kv_len, device=query.device)
    first_recent = max(0, q_len - n_recent)
    recent = torch.zeros(b, kvh, q_len - first_recent, kv_len, device=query.device)
    offset = kv_len - q_len                      # absolute position of query 0
    if value is not None:
        v = value.float()                                                      # [b, kvh, T, dv]
        out = torch.empty(b, kvh, g, q_len, value.shape[-1], device=query.device)
    for s in range(0, q_len, chunk):
        e = min(q_len, s + chunk)
        c, kv_end = e - s, offset + e            # causal: these queries see no key after their last position
        qc = (query[:, :, s:e].float() * scaling).reshape(b, kvh, g * c, d)    # heads of a group stacked
        logits = torch.matmul(qc, kt[..., :kv_end]).view(b, kvh, g, c, kv_end)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if attention_mask is None:               # causal only: just the chunk's own keys can be in its future
            logits[..., kv_end - c:].masked_fill_(_future(c, query.device), float("-inf"))
        else:
            mask = attention_mask[..., s:e, -kv_len:][..., :kv_end]
            # [B, 1 | heads, c, kv] -> [B, 1 | kvh, 1 | g, c, kv] (a per-head mask: heads kv-major)
            grouped = lambda t: t[:, :, None] if t.shape[1] == 1 else t.view(t.shape[0], kvh, g, c, kv_end)  # noqa: E731
            if mask.dtype != torch.bool:
                logits += grouped(mask.float())
            logits.masked_fill_(~grouped(causal_keep_mask(mask, c, kv_end, query.device)), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if attention_mask is not None:           # a fully masked row (padding) is NaN: it attends to nothing
            probs.nan_to_num_(0.0)
        total[..., :kv_end] += probs.sum(dim=(2, 3))
        if value is not None:                    # a group's heads stacked again: one matmul, no broadcast
            pv = torch.matmul(probs.view(b, kvh, g * c, kv_end), v[..., :kv_end, :])
            out[:, :, :, s:e] = pv.view(b, kvh, g, c, -1)
        if e > first_recent:
            lo = max(0, first_recent - s)                       # the chunk's first query in the window
            recent[:, :, s + lo - first_recent:e - first_recent, :kv_end] = probs[:, :, :, lo:].amax(2)
    qn = query.float().norm(dim=-1).amax(dim=-1)                                  # [b, h]
    stats = AttentionStats(received_sum=total, received_max=recent.amax(2),
                           query_norm=qn.view(b, kvh, g).amax(2), n_recent=n_recent, recent=recent)
    return stats, (out.view(b, h, q_len, -1) if value is not None else None)


_FUTURE: dict = {}


def _future(c: int, device) -> torch.Tensor:
    """[c, c] bool, True where key j of a chunk lies after query i of the same chunk (cached per size)."""
    key = (c, str(device))
    if key not in _FUTURE:
        _FUTURE[key] = torch.ones(c, c, dtype=torch.bool, device=device).triu(1)
    return _FUTURE[key]


def attention_logits(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float, n_groups: int,
                     softcap: float | None = None) -> torch.Tensor:
    """fp32 attention logits [b, heads, q, kv] of one call, -inf wherever the model's mask (causal,
    padding, and any keep mask already applied) forbids a key: what a per-query eviction rule reads
    (`Method.query_keep`). Memory O(q * kv) per head."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    k = key.float().repeat_interleave(n_groups, dim=1)
    logits = torch.matmul(query.float(), k.transpose(-1, -2)).mul_(scaling)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        logits = logits + attention_mask[..., -q_len:, -kv_len:].float()
    mask = attention_mask[..., -q_len:, :] if attention_mask is not None else None
    allowed = causal_keep_mask(mask, q_len, kv_len, query.device)
    return logits.masked_fill_(~allowed, float("-inf"))


def wrapped_attention(original_name: str) -> Callable:
    """An AttentionInterface function that defers to the session stored on the attention module."""

    def kvlab_attention(module, query, key, value, attention_mask, *args, **kwargs):
        session = getattr(module, "_kvlab_session", None)
        original = original_attention(module, original_name)
        if session is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return session.attend(module, original, query, key, value, attention_mask, *args, **kwargs)

    kvlab_attention.__name__ = f"kvlab_{original_name}"
    return kvlab_attention


def _pad_stat(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(*t.shape[:-1], n - t.shape[-1])], dim=-1)


def accumulate_stats(old: AttentionStats | None, new: AttentionStats, appended: int) -> AttentionStats:
    """Add a call's statistics to the layer's running ones, aligned at the newest key.

    The call appended `appended` keys; the old statistics are zero-padded for them and, where the
    call's keys start later than the old ones did (a sliding-window layer dropped its oldest tokens),
    cropped at the front. So entry j of the result always belongs to key j of the latest call.
    `new` may be updated in place and returned (a decode step); do not keep using it separately.
    `received_sum` adds up over every query so far; `received_max` is the max over the last `n_recent`
    queries of the sequence, across calls (the per-query rows `recent` slide: QAQ's attention window,
    Sec. 4.2: in decode, one query per call, the window spans the last n_recent calls)."""
    if old is None:
        return new
    n = new.received_sum.shape[-1]
    if old.received_sum.shape[-1] + appended == n and new.recent is not None and new.n_recent == 1:
        # the common decode step (no sliding window, one query row kept): add in place, no padding copies
        new.received_sum[..., :n - appended] += old.received_sum
        new.query_norm = torch.maximum(old.query_norm, new.query_norm)
        return new

    def aligned(t: torch.Tensor) -> torch.Tensor:
        t = _pad_stat(t, t.shape[-1] + appended)
        return t[..., t.shape[-1] - n:] if t.shape[-1] >= n else _pad_front(t, n)

    if old.recent is not None and new.recent is not None:
        keep_old = max(new.n_recent - new.recent.shape[-2], 0)     # rows of earlier calls still in the window
        recent = new.recent if keep_old == 0 else torch.cat(
            [aligned(old.recent[..., old.recent.shape[-2] - min(keep_old, old.recent.shape[-2]):, :]),
             new.recent], dim=-2)
        received_max = recent.amax(-2)
    else:                                        # statistics built elsewhere without rows: max over every call
        recent, received_max = None, torch.maximum(aligned(old.received_max), new.received_max)
    return AttentionStats(aligned(old.received_sum) + new.received_sum, received_max,
                          torch.maximum(old.query_norm, new.query_norm), new.n_recent, recent)


def _pad_front(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(*t.shape[:-1], n - t.shape[-1]), t], dim=-1)


def slice_stats(st: AttentionStats, s: int, e: int, length: int | None = None) -> AttentionStats:
    """The statistics of key tokens s..e of a cache of `length` tokens (default: as many as measured).

    Statistics are aligned at the newest key (`accumulate_stats`): a sliding-window layer that
    measured more keys than it still stores is read from its last `length` entries. Tokens beyond
    what was measured count as never attended."""
    n = st.received_sum.shape[-1]
    off = max(n - length, 0) if length is not None else 0
    s, e = s + off, e + off
    part = lambda t: t[..., s:e] if e <= n else _pad_stat(t, e)[..., s:e]      # noqa: E731
    return AttentionStats(part(st.received_sum), part(st.received_max), st.query_norm, st.n_recent,
                          part(st.recent) if st.recent is not None else None)
