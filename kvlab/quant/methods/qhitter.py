"""Token eviction by attention: H2O and Q-Hitter (sparse + quantized KV cache).

H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models"): keep the tokens with the largest *accumulated* attention (attention each key
received, summed over queries — `AttentionStats.received_sum`) plus the most recent tokens, evict
the rest; kept tokens stay fp16.

Q-Hitter (Zhang et al. 2024, "Q-Hitter: A Better Token Oracle for Efficient LLM Inference via
Sparse-Quantized KV Cache", MLSys'24): a kept token must be both important and easy to quantize.
Per (batch, kv head), over the layer's tokens:

    score_t = alpha * minmax(acc_attention)_t + (1 - alpha) * friendliness_t
    friendliness_t = 1 - (minmax(err_K)_t + minmax(err_V)_t) / 2
    err_X,t = || Q_b(x_t) - x_t ||_2   (per-token asymmetric int-`bits` quantization error)

Keep set (fractions of the layer's length L, `int(ratio * L)` tokens each, as the authors' code):
`recent_ratio` most recent tokens + `h2o_ratio` top tokens by accumulated attention (the H2O part)
+ `qh_ratio` top tokens by `score` among the rest; defaults 5% + 7% + 8% = 20% of the cache. Kept
tokens are stored at `bits` per token (asymmetric, one fp16 scale + zero per token-group), evicted
tokens cost 0 bits and are masked out of attention (`Quantized.keep`).

Differences from the authors' code (utils/modify_llama.py): min-max normalisation is per (batch,
kv head) over tokens (the code normalises over all heads of the layer at once); the eviction is
decided once, on the full-precision statistics of the tokens handed over, instead of greedily at
every decoding step. Both methods need K and V together (Q-Hitter's score uses both errors, and K
and V must share one keep mask), so they run on the whole cache (scope "cache"): after the prefill
in the prefill-then-decode protocol, on the whole window in fake-quant; tokens generated later
stay fp16 and are never evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..allocation import minmax, topk_mask
from ..base import LayerContext, Method, Quantized, check_range
from ..primitives import quantize_uniform
from ..registry import preset, register
from ...errors import KVLabError


@dataclass(frozen=True)
class _TokenOracle(Method):
    """Shared machinery of H2O and Q-Hitter: keep masks from attention, vectorised with topk."""

    needs_attention: ClassVar[bool] = True
    scope: ClassVar[str] = "cache"

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
        ratios = {f: getattr(self, f) for f in self._ratio_fields}
        for f, r in ratios.items():
            check_range(self.name, f, r, 0, 1, hi_open=True)
        if sum(ratios.values()) > 1:
            raise KVLabError(f"{self.name}: {' + '.join(ratios)} must be <= 1 (the fraction of tokens kept), "
                             f"got {sum(ratios.values())!r}")

    _ratio_fields: ClassVar[tuple[str, ...]] = ()


def _quant_error(x: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int-`bits` quantization of x [b, h, t, d]: (dequantized, L2 error [b, h, t], total bits)."""
    xh, total = quantize_uniform(x, bits, dim=-1, group=group)
    err = (xh.float() - x.float()).norm(dim=-1)
    return xh, err, total


@register
@dataclass(frozen=True)
class H2O(_TokenOracle):
    """H2O: keep `heavy_ratio` heavy hitters (accumulated attention) + `recent_ratio` recent tokens, fp16."""

    name = "h2o"
    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    sink: int = 0
    residual: int = 0

    _ratio_fields: ClassVar[tuple[str, ...]] = ("heavy_ratio", "recent_ratio")

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
    """Q-Hitter: keep recent + H2O heavy hitters + top combined-score tokens, stored at `bits` per token."""

    name = "qhitter"
    h2o_ratio: float = 0.07
    qh_ratio: float = 0.08
    recent_ratio: float = 0.05
    alpha: float = 0.5
    bits: int = 4
    group: int | None = None          # group size along head_dim; None = one group per token vector
    sink: int = 0
    residual: int = 0

    _ratio_fields: ClassVar[tuple[str, ...]] = ("h2o_ratio", "qh_ratio", "recent_ratio")

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "alpha", self.alpha, 0, 1)
        check_range(self.name, "bits", self.bits, 1, 16, integer=True)
        if self.group is not None:
            check_range(self.name, "group", self.group, 1, 1 << 20, integer=True)

    def friendliness(self, k: torch.Tensor, v: torch.Tensor):
        """1 - (minmax(err_K) + minmax(err_V)) / 2 per token, [b, kvh, t]; also returns the quantized K/V."""
        kh, ek, tk = _quant_error(k, self.bits, self.group)
        vh, ev, tv = _quant_error(v, self.bits, self.group)
        fr = 1.0 - (minmax(ek, dim=-1) + minmax(ev, dim=-1)) / 2.0
        return fr, (kh, tk), (vh, tv)

    def score(self, acc: torch.Tensor, friendliness: torch.Tensor) -> torch.Tensor:
        """alpha * minmax(accumulated attention) + (1 - alpha) * friendliness, per (b, kv head)."""
        return self.alpha * minmax(acc.float(), dim=-1) + (1.0 - self.alpha) * friendliness

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
