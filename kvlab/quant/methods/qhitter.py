"""Token eviction by attention: H2O and Q-Hitter (sparse + quantized KV cache), as their authors run them.

H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", github.com/FMInference/H2O): keep the tokens with the largest *accumulated*
attention (attention each key received, summed over queries — `AttentionStats.received_sum`) plus
the most recent tokens, evict the rest; kept tokens stay fp16.

Q-Hitter (Zhang et al. 2024, "Q-Hitter: A Better Token Oracle for Efficient LLM Inference via
Sparse-Quantized KV Cache", MLSys'24, github.com/VITA-Group/Q-Hitter): a kept token must be both
important and easy to quantize; every token is stored at `bits` (asymmetric, per token):

    score_t = alpha * minmax(acc_attention)_t + (1 - alpha) * friendliness_t
    friendliness_t = 1 - (minmax(err_K)_t + minmax(err_V)_t) / 2
    err_X,t = || Q_b(x_t) - x_t ||_2   (per-token asymmetric int-`bits` quantization error)

The authors' rules (file:line at FMInference/H2O ac75c2a and VITA-Group/Q-Hitter HEAD):

* H2O real decode, `h2o_hf/utils_real_drop/modify_llama.py` `H2OKVCache_LayerWise`: after every
  forward the attention each cached key received is added to its score (`_update_hh_score`,
  L317-326: probabilities summed over batch and queries); when the cache holds more than
  heavy + recent tokens it keeps the last `recent` and the top `heavy` by score among the others
  (`__call__`, L258-287) — at every decoding step, evicted tokens are gone for good. The generation
  variant `h2o_hf/utils_hh/modify_llama.py` sets the two budgets as ratios of the prompt length
  (L129-131); the summarisation script uses absolute sizes (`run_summarization.py` L62-63, 95-96).
* H2O teacher-forced simulation (lm-eval), `h2o_hf/utils_lm_eval/modify_llama.py`: budgets
  `int(ratio * seq_len)` of the forward's length (L131-132). The per-query greedy
  `local_heavy_hitter_mask` (L24-53): the first `heavy` queries see every earlier key; each later
  query i keeps the top `heavy - 1` keys by accumulated attention plus itself, then adds its own
  (full, unmasked) probabilities to the scores and zeroes those of the keys it did not keep; a band
  of the `recent` keys before each query (and itself) is added and the mask made causal (called in
  commit 1603343, L136-145). At HEAD the call is commented out (L135-148) and replaced by "global
  statistics" (L152-166): one heavy set from the probabilities summed over *all* queries (later ones
  included) plus the band |i - j| <= recent; kvlab offers both (`simulation`).
* Q-Hitter, `utils/modify_llama.py` `QH2OKVCache`: budgets from the prompt length (L181-185):
  `default_ratio` 0.07 (top by accumulated attention, the H2O part), `hh_size - default_ratio` = 0.08
  (top by the combined score), `recent_size` 0.05 (`main.py` L43-48); scores accumulated as H2O's
  (L177-191); every token quantized in place at 4 bits when it arrives (`_update_q_score`,
  L194-207, `Quantization_simulated` L55-75 with the zero point ROUNDED: L64) and its friendliness
  min-max normalised GLOBALLY — over every head and token of the prompt (L84-85 on `[heads, T]`),
  then each new token over its heads; the accumulated attention min-max normalised over the whole
  layer (L209-211); selection when the cache exceeds its size (L128-175): recent, then the H2O part,
  then the combined score among the rest — at every decoding step.

kvlab's defaults follow them (`eviction="authors"`): in prefill-decode and decode the policy calls
`step_cache` at every flush (accumulated attention of every query so far, the new tokens join —
Q-Hitter quantizes them —, evict down to the budget, never un-evict; the budget is fixed from the
span at the first flush, the prompt). In fake, one forward sees the whole window, so the mask is
decided per query from that forward's own attention (`query_keep`): H2O's `simulation="local"`
(`local_heavy_hitter_mask` + band), `"global"` (the HEAD code) or `"decode"` (the real-decode rule
replayed query by query: each query sees the cache the rule keeps before it, plus itself); Q-Hitter
always the latter (its authors only decode). Budgets there are ratios of the window.

kvlab's former behaviour stays available: `eviction="once"` (one keep set decided after the prefill
from the statistics of the tokens handed over, tokens added later never evicted and at fp16, and
in fake one keep set for every query, from an fp statistics pass), Q-Hitter's `norm="head"`
(min-max per (batch, kv head) instead of over the layer) and `zero="exact"` (kvlab's
`quantize_uniform`: fp16 minimum as the zero, no rounding). `h2o:eviction=once` and
`qhitter:eviction=once,norm=head,zero=exact` give bit-identical results to before; every new field
is always in the spec string so results stored under the old strings never collide.

Remaining differences from the authors' code: statistics and keep masks are per (batch, KV head),
the query heads of a GQA group summed (the authors sum over the batch and keep one mask per
attention head, with MHA models); a call's own attention reads its own full-precision K/V (the
authors' in-place quantization also changes the V of the current call when kv heads = heads,
`utils/modify_llama.py` L402-404); tokens keep their RoPE positions (no position shift); with
several new tokens per call Q-Hitter normalises each over its heads (the authors' decode assumes
one token per step, L204-206).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..allocation import minmax, topk_mask
from ..base import LayerContext, Method, Quantized, check_choice, check_range
from ..primitives import SCALE_BITS, ZERO_BITS, _grouped, _ungrouped, quantize_uniform
from ..registry import preset, register
from ...errors import KVLabError

EVICTIONS = ("authors", "once")


def _tail(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last n entries of the token axis (last) of t (n may be 0)."""
    return t[..., t.shape[-1] - n:]


def fold_groups(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[b, heads, ...] -> [b, kv_heads, ...]: the query heads of each GQA group summed."""
    b, h = x.shape[:2]
    return x.view(b, h // n_groups, n_groups, *x.shape[2:]).sum(2)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over keys of fp32 logits with -inf at forbidden keys (a fully forbidden row gives 0)."""
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def local_heavy_hitter_mask(probs: torch.Tensor, heavy: int) -> torch.Tensor:
    """H2O's per-query greedy (`h2o_hf/utils_lm_eval/modify_llama.py` L24-53) on probabilities
    [b, g, q, kv] (q == kv, causal): bool [b, g, q, kv], True where query i keeps key j as a heavy hitter."""
    b, g, q, kv = probs.shape
    mask = torch.zeros(b, g, q, kv, dtype=torch.bool, device=probs.device)
    if heavy <= 0:
        return mask
    acc = probs[:, :, :heavy, :].sum(2)                        # L34: the first `heavy` queries' attention
    acc[..., heavy:] = 0                                       # L35
    mask[:, :, :heavy, :heavy] = True                          # L38-39
    for i in range(heavy, q):                                  # L41
        row = torch.zeros(b, g, kv, dtype=torch.bool, device=probs.device)
        if heavy > 1:
            row.scatter_(-1, acc.topk(heavy - 1, dim=-1).indices, True)     # L44-46
        row[..., i] = True                                     # L47
        mask[:, :, i] = row                                    # L49
        acc = (acc + probs[:, :, i]) * row                     # L50-51
    return mask


def band_mask(q: int, kv: int, recent: int, device, causal_only: bool = True) -> torch.Tensor:
    """[q, kv]: keys j with i - recent <= j <= i for query i (queries are the last q of kv keys).
    `causal_only=False`: |i - j| <= recent (the HEAD code's tril/triu band, L161-163)."""
    i = torch.arange(kv - q, kv, device=device)[:, None]
    j = torch.arange(kv, device=device)[None, :]
    return (j >= i - recent) & ((j <= i) if causal_only else (j <= i + recent))


def quantize_rounded_zero(x: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Hitter's `Quantization_simulated` (`utils/modify_llama.py` L55-75) per token (groups along
    head_dim): scale = max(mx - mn, 1e-5) / (2^b - 1), zero = clamp(-round(mn / scale), 0, 2^b - 1),
    x_hat = (clamp(round(x / scale) + zero, 0, 2^b - 1) - zero) * scale. Returns (x_hat, total bits:
    b per element + an fp16 scale and zero per group, as `quantize_uniform` counts)."""
    q, scale, zero, n = rounded_zero_encode(x, bits, group)
    xh = (q - zero) * scale
    total = float(bits) * x.numel() + q.shape[:-1].numel() * (SCALE_BITS + ZERO_BITS)
    return _ungrouped(xh.to(x.dtype), -1, n), torch.tensor(total, dtype=torch.float32, device=x.device)


def rounded_zero_encode(x: torch.Tensor, bits: int, group: int | None):
    """`quantize_rounded_zero`'s codes (also read by `kvlab.pack`): (q [..., n_groups, g] float integers in
    [0, 2^b - 1], scale [..., n_groups, 1] float32 (not fp16-rounded: the authors' float scale), zero
    [..., n_groups, 1] float integers in [0, 2^b - 1], head_dim); x_hat = (q - zero) * scale."""
    xg, n = _grouped(x, -1, group)
    xf = xg.float()
    mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    max_int = float(2 ** bits - 1)
    scale = (mx - mn).clamp(min=1e-5) / max_int
    zero = (-torch.round(mn / scale)).clamp_(0.0, max_int)
    q = torch.clamp(torch.round(xf / scale) + zero, 0.0, max_int)
    return q, scale, zero, n


@dataclass(frozen=True)
class _TokenOracle(Method):
    """Shared machinery of H2O and Q-Hitter: keep masks from attention, vectorised with topk."""

    needs_attention: ClassVar[bool] = True
    scope: ClassVar[str] = "cache"

    # -- the authors' eviction (per step, per query) ------------------------------------------------------
    @property
    def per_step(self) -> bool:
        return getattr(self, "eviction") == "authors"

    @property
    def per_query(self) -> bool:
        return getattr(self, "eviction") == "authors"

    def sizes(self, length: int) -> dict[str, int]:
        """Token budgets from a length (the prompt, or the fake protocol's window): `int(ratio * length)`."""
        raise NotImplementedError

    def select(self, keep: torch.Tensor, acc: torch.Tensor, sizes: dict[str, int], extra: dict) -> torch.Tensor:
        """The per-step rule: keep [b, kvh, n] (the cache, new tokens included) -> the cache after eviction.
        Nothing is evicted while a head keeps <= the budget; never un-evicts."""
        n = keep.shape[-1]
        budget = sum(sizes.values())
        is_recent = (torch.arange(n, device=keep.device) >= n - sizes["recent"]).expand_as(keep)
        closed = ~keep | is_recent                          # candidates: kept tokens outside the recent window
        sel = self._heavy(keep, acc, sizes, extra, closed) | (is_recent & keep)
        over = keep.sum(-1, keepdim=True) > budget           # no host sync: every head keeps the same count
        return torch.where(over, sel, keep)

    def _heavy(self, keep, acc, sizes, extra, closed) -> torch.Tensor:
        raise NotImplementedError

    def step_cache(self, k, v, ctx, keep, new, state):
        if ctx.attention is None:
            raise KVLabError(f"{self.name}: needs attention statistics (ctx.attention); run it through kvlab.quantize")
        n = k.shape[-2]
        acc = ctx.attention.received_sum.float()
        sizes = state.get("sizes")
        if sizes is None:                       # the first flush: the prompt fixes the budget (fixed from then on)
            sizes = state["sizes"] = self.sizes(n)
        keep = torch.ones(acc.shape, dtype=torch.bool, device=acc.device) if keep is None else keep.clone()
        keep[..., n - new:] = True              # the new tokens join the cache
        kn, vn = k[..., n - new:, :], v[..., n - new:, :]
        (kx, kbits), (vx, vbits), extra = self._store_new(kn, vn, state, n, keep)
        keep = self.select(keep, acc, sizes, extra)
        per_tok = max(kn.shape[0] * kn.shape[1] * new, 1)
        n_kept = keep.sum()
        info = {"keep_ratio": n_kept.float() / max(keep.numel(), 1), "score": acc, **self._info(extra)}
        return (Quantized(kx, kbits * n_kept / per_tok, keep, info),
                Quantized(vx, vbits * n_kept / per_tok, keep, dict(info)))

    def _store_new(self, kn, vn, state, n, keep):
        """The new tokens' stored form and bits ((k, bits), (v, bits)) and the score extras of the span."""
        raise NotImplementedError

    def _info(self, extra: dict) -> dict:
        return {}

    # fake protocol: the per-query simulation
    def store_tokens(self, k, v, state):
        (kx, kbits), (vx, vbits), extra = self._store_new(k, v, state, k.shape[-2], None)
        state["extra"] = extra
        return Quantized(kx, kbits, None, self._info(extra)), Quantized(vx, vbits, None, self._info(extra))

    def query_keep(self, logits, n_groups, state):
        return self.decode_rows(logits, n_groups, state.get("extra", {}))

    def decode_rows(self, logits: torch.Tensor, n_groups: int, extra: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-step rule replayed query by query over one forward (budgets from its length): query i
        sees the cache the rule kept after query i - 1, plus itself; its attention over that cache
        (renormalised, its GQA group summed) is added to the scores; then the cache is evicted down
        to the budget. Returns the per-query mask [b, kvh, q, kv] and the cache after the last query."""
        b, h, q, kv = logits.shape
        if q != kv:
            raise KVLabError(f"{self.name}: the per-query simulation needs the whole sequence in one forward")
        sizes = self.sizes(kv)
        g = h // n_groups
        cache = torch.zeros(b, g, kv, dtype=torch.bool, device=logits.device)
        acc = torch.zeros(b, g, kv, device=logits.device)
        mask = torch.zeros(b, g, q, kv, dtype=torch.bool, device=logits.device)
        for i in range(q):
            cache[..., i] = True
            mask[:, :, i] = cache
            row = logits[:, :, i].masked_fill(~cache.repeat_interleave(n_groups, dim=1), float("-inf"))
            acc += fold_groups(probabilities(row), n_groups)
            ex = {name: t[..., : i + 1] for name, t in extra.items()}
            cache[..., : i + 1] = self.select(cache[..., : i + 1], acc[..., : i + 1], sizes, ex)
        return mask, cache

    # -- kvlab's former rule: one keep set after the prefill --------------------------------------------------
    def quantize_cache(self, keys, values, ctxs):
        ks, vs = [], []
        for k, v, ctx in zip(keys, values, ctxs):
            qk, qv = self._layer(k, v, ctx)
            ks.append(qk)
            vs.append(qv)
        return ks, vs

    # subclasses: counts (h2o, combined, recent), combined score, storage
    def _layer(self, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext):
        raise NotImplementedError

    def _keep(self, ctx: LayerContext, t: int, device, heavy: float, recent: float,
              combined: float = 0.0, score: torch.Tensor | None = None) -> torch.Tensor:
        """keep [b, kvh, t]: recent window + top `heavy` by accumulated attention + top `combined`
        by `score` among the rest. Counts are fractions of the layer's length L (>= t)."""
        att = ctx.attention
        if att is None:
            raise KVLabError(f"{self.name}: needs attention statistics (ctx.attention); run it through kvlab.quantize")
        acc = att.received_sum.float()
        L = ctx.total_tokens if ctx.total_tokens is not None else ctx.start + t
        n_recent, n_heavy, n_comb = int(recent * L), int(heavy * L), int(combined * L)
        pos = ctx.start + torch.arange(t, device=device)
        is_recent = (pos >= L - n_recent).expand_as(acc)
        keep = is_recent.clone()
        keep |= topk_mask(acc, n_heavy, exclude=keep)
        if score is not None and n_comb > 0:
            keep |= topk_mask(score, n_comb, exclude=keep)
        return keep

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "eviction", getattr(self, "eviction"), EVICTIONS)
        ratios = {f: getattr(self, f) for f in self._ratio_fields}
        for f, r in ratios.items():
            check_range(self.name, f, r, 0, 1, hi_open=True)
        if sum(ratios.values()) > 1:
            raise KVLabError(f"{self.name}: {' + '.join(ratios)} must be <= 1 (the fraction of tokens kept), "
                             f"got {sum(ratios.values())!r}")

    _ratio_fields: ClassVar[tuple[str, ...]] = ()


def _quant_error(x: torch.Tensor, bits: int, group: int | None,
                 zero: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int-`bits` quantization of x [b, h, t, d]: (dequantized, L2 error [b, h, t], total bits)."""
    if zero == "rounded":
        xh, total = quantize_rounded_zero(x, bits, group)
    else:
        xh, total = quantize_uniform(x, bits, dim=-1, group=group)
    err = (xh.float() - x.float()).norm(dim=-1)
    return xh, err, total


@register
@dataclass(frozen=True)
class H2O(_TokenOracle):
    """H2O: keep `heavy_ratio` heavy hitters (accumulated attention) + `recent_ratio` recent tokens, fp16.

    eviction:   "authors" (default): per-step eviction within a fixed budget in prefill-decode / decode
                (`utils_real_drop/modify_llama.py` L258-326; budgets from the prompt length,
                `utils_hh/modify_llama.py` L129-131) and a per-query mask in fake; "once": kvlab's
                former single keep set after the prefill.
    simulation: the fake protocol's per-query mask with eviction="authors": "local"
                (`local_heavy_hitter_mask` + recent band, `utils_lm_eval/modify_llama.py` L24-53 and
                commit 1603343 L136-145), "global" (HEAD L152-166: one heavy set from all queries,
                later ones included, + the band |i - j| <= recent) or "decode" (the real-decode rule
                replayed query by query).
    """

    name = "h2o"
    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    sink: int = 0
    residual: int = 0
    eviction: str = "authors"
    simulation: str = "local"

    # `eviction` names the rule in every spec: results stored under the former spec strings ("h2o") were
    # computed with the former rules (decided once, one keep set for every query)
    spec_always: ClassVar[tuple[str, ...]] = ("eviction",)
    _ratio_fields: ClassVar[tuple[str, ...]] = ("heavy_ratio", "recent_ratio")

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "simulation", self.simulation, ("local", "global", "decode"))

    def sizes(self, length: int) -> dict[str, int]:
        return {"heavy": int(self.heavy_ratio * length), "recent": int(self.recent_ratio * length)}

    def _heavy(self, keep, acc, sizes, extra, closed):
        return topk_mask(acc, sizes["heavy"], exclude=closed)           # L271-272: top `heavy` among the others

    def _store_new(self, kn, vn, state, n, keep):
        return (kn, torch.tensor(16.0 * kn.numel(), device=kn.device)), \
               (vn, torch.tensor(16.0 * vn.numel(), device=vn.device)), {}

    def query_keep(self, logits, n_groups, state):
        if self.simulation == "decode":
            return self.decode_rows(logits, n_groups, {})
        b, h, q, kv = logits.shape
        if q != kv:
            raise KVLabError("h2o: the per-query simulation needs the whole sequence in one forward")
        sizes = self.sizes(kv)                                     # L131-132: ratios of the forward's length
        probs = fold_groups(probabilities(logits), n_groups)      # [b, kvh, q, kv]
        causal = band_mask(q, kv, kv, logits.device)              # j <= i
        if self.simulation == "local":
            heavy = local_heavy_hitter_mask(probs, sizes["heavy"])
            mask = (heavy | band_mask(q, kv, sizes["recent"], logits.device)) & causal
        else:                                                       # "global"
            heavy = topk_mask(probs.sum(2), sizes["heavy"])[:, :, None, :]
            mask = (heavy | band_mask(q, kv, sizes["recent"], logits.device, causal_only=False)) & causal
        return mask, mask[:, :, -1]

    def _layer(self, k, v, ctx):
        b, h, t, d = k.shape
        keep = self._keep(ctx, t, k.device, heavy=self.heavy_ratio, recent=self.recent_ratio)
        n_kept = keep.sum()
        info = {"keep_ratio": n_kept.float() / max(keep.numel(), 1), "score": ctx.attention.received_sum}
        return (Quantized(k, n_kept * (16.0 * d), keep, info),
                Quantized(v, n_kept * (16.0 * v.shape[-1]), keep, dict(info)))


@register
@dataclass(frozen=True)
class QHitter(_TokenOracle):
    """Q-Hitter: keep recent + H2O heavy hitters + top combined-score tokens, stored at `bits` per token.

    eviction: "authors" (default): per-step eviction within a fixed budget, every new token quantized
              as it arrives (`utils/modify_llama.py` L122-207; in fake the rule replayed per query);
              "once": kvlab's former single keep set after the prefill.
    norm:     min-max normalisation of the accumulated attention and of the quantization errors:
              "global" (default, over every head of the layer, L84-85 and L209-211; a decoded token's
              errors over its heads, L204-206) or "head" (kvlab's former: per (batch, kv head) over tokens).
    zero:     the quantizer's zero point: "rounded" (default, L64) or "exact" (kvlab's `quantize_uniform`).
    """

    name = "qhitter"
    h2o_ratio: float = 0.07
    qh_ratio: float = 0.08
    recent_ratio: float = 0.05
    alpha: float = 0.5
    bits: int = 4
    group: int | None = None          # group size along head_dim; None = one group per token vector
    sink: int = 0
    residual: int = 0
    eviction: str = "authors"
    norm: str = "global"
    zero: str = "rounded"

    # `eviction` names the rule in every spec: results stored under the former spec strings
    # ("qhitter:bits=4") were computed with the former rules (once, per-head min-max, exact zero point)
    spec_always: ClassVar[tuple[str, ...]] = ("bits", "eviction")
    _ratio_fields: ClassVar[tuple[str, ...]] = ("h2o_ratio", "qh_ratio", "recent_ratio")

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "alpha", self.alpha, 0, 1)
        check_range(self.name, "bits", self.bits, 1, 16, integer=True)
        if self.group is not None:
            check_range(self.name, "group", self.group, 1, 1 << 20, integer=True)
        check_choice(self.name, "norm", self.norm, ("global", "head"))
        check_choice(self.name, "zero", self.zero, ("rounded", "exact"))

    @property
    def _dims(self):
        return (-2, -1) if self.norm == "global" else -1

    def friendliness(self, k: torch.Tensor, v: torch.Tensor):
        """1 - (minmax(err_K) + minmax(err_V)) / 2 per token, [b, kvh, t]; also returns the quantized K/V."""
        kh, ek, tk = _quant_error(k, self.bits, self.group, self.zero)
        vh, ev, tv = _quant_error(v, self.bits, self.group, self.zero)
        fr = 1.0 - (minmax(ek, dim=self._dims) + minmax(ev, dim=self._dims)) / 2.0
        return fr, (kh, tk), (vh, tv)

    def score(self, acc: torch.Tensor, friendliness: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """alpha * minmax(accumulated attention) + (1 - alpha) * friendliness (L209-211); `valid`: the
        tokens still cached (min and max over them)."""
        return self.alpha * minmax(acc.float(), dim=self._dims, valid=valid) + (1.0 - self.alpha) * friendliness

    def sizes(self, length: int) -> dict[str, int]:
        # L182-185: hh_size - default_ratio = qh_ratio, default_ratio = h2o_ratio, recent_size
        return {"h2o": int(self.h2o_ratio * length), "qh": int(self.qh_ratio * length),
                "recent": int(self.recent_ratio * length)}

    def _store_new(self, kn, vn, state, n, keep):
        kx, ek, tk = _quant_error(kn, self.bits, self.group, self.zero)
        vx, ev, tv = _quant_error(vn, self.bits, self.group, self.zero)
        new = kn.shape[-2]
        if self.norm == "global":
            # the prompt over all its heads and tokens (L200-202); a later token over its heads (L204-206)
            dims = (-2, -1) if "fr" not in state else -2
            fr_new = 1.0 - (minmax(ek, dim=dims) + minmax(ev, dim=dims)) / 2.0
            old = _tail(state["fr"], n - new) if "fr" in state else fr_new[..., :0]
            state["fr"] = torch.cat([old, fr_new], dim=-1)
            extra = {"fr": state["fr"]}
        else:                               # per head over the tokens still cached, re-normalised each step
            for name, e in (("err_k", ek), ("err_v", ev)):
                old = _tail(state[name], n - new) if name in state else e[..., :0]
                state[name] = torch.cat([old, e], dim=-1)
            extra = {"err_k": state["err_k"], "err_v": state["err_v"]}
        return (kx, tk), (vx, tv), extra

    def _friendliness_of(self, extra: dict, keep: torch.Tensor) -> torch.Tensor:
        if "fr" in extra:
            return extra["fr"]
        return 1.0 - (minmax(extra["err_k"], dim=-1, valid=keep) + minmax(extra["err_v"], dim=-1, valid=keep)) / 2.0

    def _heavy(self, keep, acc, sizes, extra, closed):
        d = topk_mask(acc, sizes["h2o"], exclude=closed)                  # L136-139: the H2O part
        sc = self.score(acc, self._friendliness_of(extra, keep), valid=keep)
        return d | topk_mask(sc, sizes["qh"], exclude=closed | d)         # L143-150: combined, defaults excluded

    def _info(self, extra: dict) -> dict:
        return {"bits": self.bits}

    def _layer(self, k, v, ctx):
        b, h, t, d = k.shape
        if ctx.attention is None:
            raise KVLabError("qhitter: needs attention statistics (ctx.attention); run it through kvlab.quantize")
        fr, (kh, tk), (vh, tv) = self.friendliness(k, v)
        sc = self.score(ctx.attention.received_sum, fr)
        keep = self._keep(ctx, t, k.device, heavy=self.h2o_ratio, recent=self.recent_ratio,
                          combined=self.qh_ratio, score=sc)
        n_kept = keep.sum()
        per_tok = max(b * h * t, 1)
        info = {"keep_ratio": n_kept.float() / max(keep.numel(), 1), "score": sc, "friendliness": fr}
        # every token costs the same (codes + its groups' scale/zero): pay for the kept ones only
        return (Quantized(kh, tk * n_kept / per_tok, keep, info),
                Quantized(vh, tv * n_kept / per_tok, keep, dict(info)))


preset("h2o-20", "h2o:heavy_ratio=0.1,recent_ratio=0.1")
preset("qhitter-20", "qhitter")
preset("qhitter-h2o", "qhitter:alpha=1.0")     # Q-Hitter keep rule with alpha = 1 (pure attention), still 4-bit
