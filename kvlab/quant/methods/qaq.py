"""QAQ: Quality Adaptive Quantization (Dong et al. 2024, "QAQ: Quality Adaptive Quantization for LLM
KV Cache", arXiv 2403.04643) — separate closed-form bit rules for keys and values, per token.

Per group (one token of one head / of one layer / of the whole model, `level`), from an error
target eps (Sec. 4.1; formulas in `kvlab.quant.allocation`):

* keys:   e_max = sqrt(12 / q_norm * ln(L^3 / (L - 1) * eps_k^2 + 1))   (q_norm = ||q||^2)
* values: e_max = sqrt(12 / L) * eps_v / a_max     (a_max: largest attention the token received
          from the last `n_recent` queries — the paper's "attention window", Sec. 4.2)
* bits:   paper  B = clamp(ceil(log2(R / e_max)), n_min, n_max)           (Sec. 4.1, B_t = ceil(log2(R / (2 sqrt(3) sigma))))
          code   B = clamp(ceil(log2(R / (2 e_max) + 1)), n_min, n_max)   (authors' src/quantizer.py; ~1 bit fewer)
  R = max - min of the group without its outliers; the last (n_recent - 1) tokens get n_max
  (their attention window is incomplete).
* outliers (Sec. 4.2): a fraction `outliers` of values, half at each end, kept at 16 bits
  and excluded from the group's statistics.

`variant="paper"` follows the paper's text; `variant="code"` the authors' implementation. What
differs (state which one a figure uses):

| | paper | code |
|---|---|---|
| bits | ceil(log2(R / e_max)) | ceil(log2(R / (2 e_max) + 1)) |
| q_norm (keys) | measured: max ||q||^2 over the prompt's queries of the group (the paper uses the 90% quantile of a precomputed distribution) | constant 300, used as the squared norm |
| grid | 2^B equal segments of [min, max], values rounded to the segment midpoint | centred on the group mean: mu + k s, s = R / 2^B, k in [-2^(B-1), 2^(B-1) - 1] |
| outliers | beyond the outliers/2 quantiles of the layer's whole tensor (per batch row) | outliers/2 per end *per group* by kthvalue (at least one value per end) |
| when | per layer as K/V are stored (scope "layer"; "cache" at token level), and in decode again at every step (`requant="step"`, below) | once, on the prompt's whole cache after prefill (scope "cache"); later tokens stay fp16 |

Both variants take a_max (values) and q_norm as the max over the group's heads (and layers at token
level), as the code does. `quant="normal"` stores N(0, 1) quantile centres of 2^B equal-probability
bins after normalising by the group's mean and std (the code's "normal" method, which it never
combines with attention-aware bits; here it uses the same closed-form bits). `attention_aware=False`
replaces a_max by 1 (the worst case |S_t| <= 1), so value bits depend only on the token's range.

Per-step re-quantization (paper, Sec. 4.2; `requant`). A token's importance changes as decoding goes on,
and a quantized token cannot be restored from its codes, so the paper keeps every token's full-precision
K/V off the accelerator and re-decides its width as the attention window moves. `requant="step"` (the
paper variant's default at head / layer level) does this in the prefill-decode and decode protocols:
before every call, each stored token (sink aside) is quantized again from its fp copy (`rewrites_stored`:
the cache keeps fp shadows) with the current a_max, the max of its attention over the last `n_recent`
queries of the sequence (`AttentionStats.received_max`, sliding across calls), the current L (its key
rule) and the current q_norm; the last n_recent - 1 tokens (incomplete window) get n_max. The bits booked
are the whole region's at its current widths, per step. The fp copies are what the paper moves to CPU
memory; kvlab counts only what the quantized cache holds (as the paper's compression ratios do).
`requant="once"` quantizes each token once, when it is flushed, with the statistics of that moment
(kvlab's rule before this field; in decode every token is then flushed inside its own incomplete window
and stays at n_max). Scored in one forward (fake, or prefill-decode with the continuation in one call)
the two rules store the same cache. The code variant and `level="token"` (scope "cache") quantize the
prompt's cache once after the prefill (`requant` must stay unset there; None = the variant's rule).

Levels: "head" = one group per (token, kv head) of a layer; "layer" = one per (token, layer) over all
kv heads; "token" = one per token over every layer and head (needs the whole cache: scope "cache").
`scope` and `needs_attention` therefore depend on the config (instance properties).

Against the authors' code, line by line (github.com/ClubieDong/QAQ-KVCacheQuantization at f8d47e0;
`quantizer.py` = src/quantizer.py). `variant="code"` follows these rules:

* key e_max with the constant q_norm: quantizer.py:160 (300 in every run, experiments/grid_search.py:74).
* value a_max: the prompt's attention rows [-last_n:], max over those queries and the group's dims
  (quantizer.py:163-169; the prompt's attentions only, evaluator.py:71); e_max: quantizer.py:171.
* bits: ceil(log2(R / (2 e_max) + 1)) clamped to [n_min, n_max] (quantizer.py:187, 191), R = max - min
  of the non-outliers (quantizer.py:173, 181-183); the last last_n - 1 tokens get n_max and are still
  quantized at that width (quantizer.py:193-195). The authors' runs evaluate this rule on fp16 tensors
  (src/main.py:24; R and the attention probabilities fp16, every result rounded): `bit_math="fp16"` (the
  default) does the same, `bit_math="fp32"` is kvlab's former fp32 rule (`qaq_bits`). It matters: 1 + y
  rounds to 1 in fp16 for y = R / (2 e_max) <= 2^-11, so low-attention tokens get 0 bits (n_min = 0),
  which in fp32 almost never happens, and widths near a boundary can fall one bit lower.
  n_max may be 0 (quantizer.py:89). Both fields apply to the code variant only.
* outliers: per group, x <= kthvalue(ceil(r/2 n)) or x > kthvalue(floor((1 - r/2) n)) (quantizer.py:198-212),
  kept exactly (quantizer.py:253) and left out of mean, min and max (quantizer.py:217, 226-230).
* grid: mu + clamp(round((x - mu) / s), -2^(n-1), 2^(n-1) - 1) s with s = (max - min) / 2^n
  (quantizer.py:226-230, 239, 244, 249). At n = 0 both clamp bounds are -1/2 (2 ** -1 in Python; torch
  promotes the int32 codes to float), so every value becomes mu - R/2: `zero_bits="authors"` (the
  default) does this; `zero_bits="mean"` stores mu (kvlab before this field existed). Only the code grid
  depends on it: at 0 bits the paper grid gives (min + max) / 2 and the normal grid mu.
* when: the prompt's cache is quantized once and the continuation is scored in one forward against it
  with its own K/V at full precision (evaluator.py:71-81); no per-step re-quantization (the paper's
  Sec. 4.2 describes one; the code has none).
* bits booked (`booking="authors"`): mean over groups of n times (1 - r) plus 16 r per value
  (quantizer.py:275-276), plus two fp16 numbers (mean, scale) per group (quantizer.py:286-298): the
  nominal outlier fraction r, no outlier index, no width field. `booking="kvlab"` (the default, as
  every kvlab method books its outliers, cf. kvquant) counts what a mixed-precision cache must store:
  B per non-outlier value + fp16 scale + fp16 zero/mean (32) + an 8-bit width field when n_min < n_max
  + 48 per outlier actually found (fp16 value + int32 index).

Deliberate departures (not switchable): (1) the grid is computed in float32 with the mean and scale
rounded to fp16, as stored; the authors compute it in the model dtype, fp16 in their runs (src/main.py:24,
quantizer.py:109-111), so a value on a rounding boundary can land one level apart. (2) a_max is computed by kvlab from the
queries and keys in fp32, the authors read the model's (fp16) attention probabilities. (3) GQA: a_max is
the max over the query heads of a KV group and the booking counts KV-head elements; the authors' code
assumes one query head per KV head (head level fails on GQA) and books hidden_size (query heads)
elements per layer (quantizer.py:287). (4) The authors' `use_attentions=False` is a fixed-width
quantizer (quantizer.py:151-158); kvlab's `attention_aware=False` keeps the closed-form bits with
a_max = 1 (a fixed width: n_min = n_max). (5) Their `symmetric=True` option (quantizer.py:177-179, 218-224)
is not implemented; none of their experiments uses it. (6) L = 1 (a pole of the key rule) is treated as
L = 2; the authors' code divides by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import KVLabError
from ..allocation import qaq_bits, qaq_key_emax, qaq_value_emax
from ..base import LayerContext, Method, Quantized, check_choice, check_range
from ..primitives import _fp16
from ..registry import preset, register

LEVELS = ("token", "layer", "head")
QUANTS = ("uniform", "normal")
VARIANTS = ("paper", "code")
ZERO_BITS = ("authors", "mean")    # n = 0 on the code grid: mu - R/2 (quantizer.py:249) | mu (kvlab before)
BIT_MATHS = ("fp16", "fp32")        # code bit rule evaluated in fp16 (the authors' runs) | fp32 (kvlab before)
BOOKINGS = ("kvlab", "authors")    # bits booked: what a mixed cache stores | quantizer.py:275-276, 286-298
REQUANTS = ("step", "once")        # paper Sec. 4.2: re-quantize every stored token each step | once, when flushed
META_BITS = 32          # fp16 scale + fp16 zero point (or mean) per group
WIDTH_BITS = 8          # per-group bit width, stored only when widths vary (n_min < n_max)
OUTLIER_BITS = 16 + 32  # fp16 value + int32 index
CODE_Q_NORM = 300.0     # the authors' code: constant q_norm, used as ||q||^2


@register
@dataclass(frozen=True)
class QAQ(Method):
    """QAQ mixed-precision per-token quantization with separate key/value error targets.

    eps_k / eps_v: error targets (sigma_S for keys, sigma_X for values; smaller = more bits).
    n_min / n_max: clamp of the per-group bits. outliers: fraction kept at 16 bits (0 = none).
    level: "head" | "layer" | "token". quant: "uniform" | "normal". variant: "paper" | "code".
    attention_aware: value bits use a_max (else a_max = 1). n_recent: attention window (queries).
    q_norm: squared query norm for the key rule; None = measured (paper) or 300 (code).
    bit_math: code bit rule in "fp16" (as the authors' fp16 runs; their only 0-bit groups) | "fp32" (former).
    zero_bits: code grid at 0 bits: "authors" (mu - R/2, quantizer.py:249) | "mean" (mu; kvlab's former rule).
    booking: bits booked: "kvlab" (width field, 48 bits per outlier found) | "authors" (quantizer.py:275-298).
    requant: "step" (paper Sec. 4.2: every stored token re-quantized from its fp copy before each call) |
             "once" (quantized once when flushed; kvlab's former rule); None (default) = the variant's
             rule: "step" for the paper variant at head / layer level, else (scope "cache") once.
    """

    name = "qaq"
    # the code variant's new defaults are spelled out (results stored under its older spec strings meant
    # zero_bits=mean, bit_math=fp32 and never answer for the authors' rule); so is the paper variant's
    # per-step rule (its older spec strings meant requant=once)
    @property
    def spec_always(self) -> tuple[str, ...]:
        return ("bit_math", "zero_bits") if self.variant == "code" else (("requant",) if self.requant else ())

    eps_k: float = 2.0
    eps_v: float = 0.05
    n_min: int = 1
    n_max: int = 8
    outliers: float = 0.01
    level: str = "head"
    quant: str = "uniform"
    attention_aware: bool = True
    variant: str = "paper"
    n_recent: int = 5
    q_norm: float | None = None
    sink: int = 0
    residual: int = 0
    bit_math: str = "fp16"
    zero_bits: str = "authors"
    booking: str = "kvlab"
    requant: str | None = None

    def __post_init__(self) -> None:
        # None resolves to the variant's own rule, so an instance (and its spec) always names it
        if self.requant is None and self.variant == "paper" and self.level != "token":
            object.__setattr__(self, "requant", "step")
        super().__post_init__()

    @property
    def rewrites_stored(self) -> bool:  # type: ignore[override]
        """Per-step re-quantization: the policy keeps fp shadows and hands over the whole stored region."""
        return self.requant == "step"

    # --- config-dependent interface flags ----------------------------------------------------------
    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return bool(self.attention_aware or self._measured_q_norm)

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "cache" if (self.level == "token" or self.variant == "code") else "layer"

    @property
    def _measured_q_norm(self) -> bool:
        return self.q_norm is None and self.variant == "paper"

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "eps_k", self.eps_k, 0, math.inf, lo_open=True, hi_open=True)
        check_range(self.name, "eps_v", self.eps_v, 0, math.inf, lo_open=True, hi_open=True)
        check_range(self.name, "n_min", self.n_min, 0, 16, integer=True)
        # n_min <= n_max, both in [0, 16] (quantizer.py:85, 89): n_max = 0 stores every group at 0 bits
        check_range(self.name, "n_max", self.n_max, self.n_min if isinstance(self.n_min, int) else 0, 16,
                    integer=True)
        check_range(self.name, "outliers", self.outliers, 0, 1, hi_open=True)
        check_choice(self.name, "level", self.level, LEVELS)
        check_choice(self.name, "quant", self.quant, QUANTS)
        check_choice(self.name, "variant", self.variant, VARIANTS)
        check_choice(self.name, "bit_math", self.bit_math, BIT_MATHS)
        check_choice(self.name, "zero_bits", self.zero_bits, ZERO_BITS)
        check_choice(self.name, "booking", self.booking, BOOKINGS)
        check_range(self.name, "n_recent", self.n_recent, 1, 1 << 20, integer=True)
        if self.requant is not None:
            check_choice(self.name, "requant", self.requant, REQUANTS)
            if self.requant == "step" and self.scope == "cache":
                raise KVLabError(f"qaq: requant='step' re-quantizes layer by layer from fp copies (paper, Sec. 4.2); "
                                 f"variant={self.variant!r}, level={self.level!r} quantizes the prompt's whole cache "
                                 "once (scope 'cache'). Use variant=paper with level=head or layer, or drop requant")
        if self.q_norm is not None:
            check_range(self.name, "q_norm", self.q_norm, 0, math.inf, lo_open=True, hi_open=True)

    # --- the two entry points ---------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        if self.level == "token":
            raise KVLabError("qaq: level='token' groups every layer of a token together; it runs on the "
                             "whole cache (scope 'cache'), not layer by layer")
        return self._layer(x, ctx.kind, ctx)

    def quantize_cache(self, keys, values, ctxs):
        if self.level != "token":
            ks = [self._layer(k, "k", c) for k, c in zip(keys, ctxs)]
            vs = [self._layer(v, "v", c) for v, c in zip(values, ctxs)]
            return ks, vs
        return self._token_level(keys, "k", ctxs), self._token_level(values, "v", ctxs)

    # --- one layer (head / layer level) -------------------------------------------------------------
    def _layer(self, x: torch.Tensor, kind: str, ctx: LayerContext) -> Quantized:
        b, h, t, d = x.shape
        if t == 0:
            return Quantized(x, torch.zeros((), device=x.device), info={f"bits_{kind}": x.new_zeros((b, h, 0))})
        xg, args = self._layer_inputs(x, kind, ctx)
        xh, bits, mask = self._groups(xg, kind, *args)
        if self.booking == "authors":
            total = self._authors_bits(bits.sum(), xg.shape[-1], xg.numel(), bits.numel())
        else:
            valid = (~mask).sum(-1)
            total = (bits * valid).sum() + bits.numel() * self._meta_bits + mask.sum() * OUTLIER_BITS
        if self.level == "head":
            x_out = xh
            bmap = bits
        else:
            x_out = xh.reshape(b, t, h, d).transpose(1, 2)
            bmap = bits[:, None, :].expand(b, h, t)
        return Quantized(x_out.to(x.dtype), total.float(), info={f"bits_{kind}": bmap,
                                                                 f"outliers_{kind}": mask.sum()})

    def _layer_inputs(self, x: torch.Tensor, kind: str, ctx: LayerContext):
        """The groups of one layer (head / layer level), [*G, n] float32, and the rest of `_groups`' arguments."""
        b, h, t, d = x.shape
        L = ctx.total_tokens if ctx.total_tokens is not None else ctx.start + t
        att = ctx.attention
        if self.level == "head":
            xg = x.float()                                               # groups [b, h, t], n = d
            tok_dim = 2
            q_sq = (att.query_norm.float() ** 2)[..., None] if self._measured_q_norm and att is not None else None
            a_max = att.received_max.float() if (self.attention_aware and att is not None) else None
        else:                                                            # "layer": groups [b, t], n = h*d
            xg = x.float().transpose(1, 2).reshape(b, t, h * d)
            tok_dim = 1
            q_sq = (att.query_norm.float().amax(1, keepdim=True) ** 2) if self._measured_q_norm and att is not None else None
            a_max = att.received_max.float().amax(1) if (self.attention_aware and att is not None) else None
        self._need(kind, att)
        return xg, (L, ctx.start, tok_dim, q_sq, a_max)

    def layer_plan(self, x: torch.Tensor, ctx: LayerContext) -> dict:
        """What `quantize` stores one layer's x with (head / layer level; also read by `kvlab.pack`):
        {"groups": [*G, n] float32 (head: x itself; layer: [b, t, h*d]), "bits": [*G] int64 widths,
        "mask": outliers [*G, n], "stats": (min, max, mean, std) [*G] of the non-outliers, "grid"}."""
        if self.scope != "layer":
            raise KVLabError(f"qaq: {self.spec} quantizes the whole cache (scope 'cache'); layer_plan is per layer")
        xg, args = self._layer_inputs(x, ctx.kind, ctx)
        bits, mask, stats = self._plan(xg, ctx.kind, *args)
        return {"groups": xg, "bits": bits, "mask": mask, "stats": stats, "grid": self._grid}

    # --- token level: one group per token over every layer and head --------------------------------
    def _token_level(self, xs: list[torch.Tensor], kind: str, ctxs: list[LayerContext]) -> list[Quantized]:
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise KVLabError(f"qaq: level='token' needs every layer to hand over the same [b, kv_heads, tokens, "
                             f"head_dim] shape, got {sorted(shapes)}; use level='layer' or 'head'")
        n_layers = len(xs)
        b, h, t, d = xs[0].shape
        if t == 0:
            return [Quantized(x, torch.zeros((), device=x.device), info={f"bits_{kind}": x.new_zeros((b, h, 0))})
                    for x in xs]
        ctx = ctxs[0]
        L = ctx.total_tokens if ctx.total_tokens is not None else ctx.start + t
        atts = [c.attention for c in ctxs]
        self._need(kind, atts[0])
        q_sq = a_max = None
        if self._measured_q_norm and atts[0] is not None:
            q_sq = torch.stack([a.query_norm.float() for a in atts]).amax(dim=(0, 2))[:, None] ** 2     # [b, 1]
        if self.attention_aware and atts[0] is not None:
            a_max = torch.stack([a.received_max.float() for a in atts]).amax(dim=(0, 2))                # [b, t]
        X = torch.stack([x.float() for x in xs])                          # [Ly, b, h, t, d]
        xg = X.permute(1, 3, 0, 2, 4).reshape(b, t, n_layers * h * d)     # groups [b, t]
        xh, bits, mask = self._groups(xg, kind, L, ctx.start, 1, q_sq, a_max)
        out_l = mask.reshape(b, t, n_layers, h * d).sum(-1)
        if self.booking == "authors":                                     # every layer holds h*d values per group
            totals = self._authors_bits(bits.sum(), h * d, b * t * h * d, bits.numel() / n_layers).expand(n_layers)
        else:
            valid_l = (~mask).reshape(b, t, n_layers, h * d).sum(-1)      # [b, t, Ly]
            code_l = (bits[..., None] * valid_l).sum(dim=(0, 1))          # [Ly]
            meta_l = bits.numel() * self._meta_bits / n_layers            # group metadata shared evenly
            totals = code_l.float() + meta_l + out_l.sum(dim=(0, 1)).float() * OUTLIER_BITS
        xh = xh.reshape(b, t, n_layers, h, d).permute(2, 0, 3, 1, 4)
        bmap = bits[:, None, :].expand(b, h, t)
        return [Quantized(xh[l].to(xs[l].dtype), totals[l], info={f"bits_{kind}": bmap,
                                                                   f"outliers_{kind}": out_l[..., l].sum()})
                for l in range(n_layers)]

    # --- shared machinery --------------------------------------------------------------------------
    @property
    def _meta_bits(self) -> int:
        return META_BITS + (WIDTH_BITS if self.n_min < self.n_max else 0)

    def _authors_bits(self, bits_sum: torch.Tensor, per_group: int, n_values: int, n_groups: float) -> torch.Tensor:
        """The authors' booking: sum_g B_g * per_group * (1 - r) + 16 r per value + 2 fp16 per group
        (quantizer.py:275-276: mean_g(B_g) (1 - r) + 16 r bits per value; quantizer.py:286-298: + 2 x 16 per group)."""
        r = float(self.outliers)
        return (bits_sum.double() * per_group * (1.0 - r) + n_values * 16.0 * r + n_groups * META_BITS).float()

    def _need(self, kind: str, att) -> None:
        if att is None and ((kind == "v" and self.attention_aware) or (kind == "k" and self._measured_q_norm)):
            raise KVLabError("qaq: this config needs attention statistics (ctx.attention): run it through "
                             "kvlab.quantize, or set attention_aware=false and a constant q_norm")

    def _groups(self, xg: torch.Tensor, kind: str, L: int, start: int, tok_dim: int,
                q_sq: torch.Tensor | None, a_max: torch.Tensor | None):
        """Quantize groups xg [*G, n]: returns (dequantized [*G, n], bits [*G] int64, outlier mask)."""
        bits, mask, (mn, mx, mu, sd) = self._plan(xg, kind, L, start, tok_dim, q_sq, a_max)
        xh = dequant_groups(xg, bits, mn, mx, mu, sd, grid=self._grid, zero=self.zero_bits)
        xh = torch.where(mask, xg, xh)
        return xh, bits, mask

    def _plan(self, xg: torch.Tensor, kind: str, L: int, start: int, tok_dim: int,
              q_sq: torch.Tensor | None, a_max: torch.Tensor | None):
        """Widths [*G] int64, outlier mask and (min, max, mean, std) of the groups xg [*G, n]."""
        mask = self._outlier_mask(xg)
        mn, mx, mu, sd = group_stats(xg, mask)
        R = mx - mn
        if kind == "k":
            qn = q_sq if q_sq is not None else torch.tensor(self.q_norm or CODE_Q_NORM, device=xg.device)
            e_max = qaq_key_emax(L, self.eps_k, qn)
        else:
            a = a_max if a_max is not None else torch.ones((), device=xg.device)
            if self.variant == "code" and self.bit_math == "fp16":
                a = a.half().float()                # the model's fp16 attention probabilities (evaluator.py:69-71)
            e_max = qaq_value_emax(L, self.eps_v, a)
        if self.variant == "code" and self.bit_math == "fp16":
            bits = code_bits_fp16(R, e_max, self.n_min, self.n_max, e_is_fp16=(kind == "v")).expand(R.shape)
        else:
            bits = qaq_bits(R, e_max, self.n_min, self.n_max, self.variant).expand(R.shape)
        if self.n_recent > 1:
            t = xg.shape[tok_dim]
            pos = start + torch.arange(t, device=xg.device)
            recent = pos >= L - (self.n_recent - 1)
            shape = [1] * bits.dim()
            shape[tok_dim] = t
            bits = torch.where(recent.view(shape), torch.full_like(bits, self.n_max), bits)
        return bits, mask, (mn, mx, mu, sd)

    @property
    def _grid(self) -> str:
        if self.quant == "normal":
            return "normal"
        return "midpoint" if self.variant == "paper" else "mean"

    def _outlier_mask(self, xg: torch.Tensor) -> torch.Tensor:
        if self.outliers == 0:
            return torch.zeros_like(xg, dtype=torch.bool)
        if self.variant == "code":
            return outlier_mask(xg, self.outliers)
        flat = xg.reshape(xg.shape[0], -1)
        return outlier_mask(flat, self.outliers).reshape(xg.shape)


# ------------------------------------------------------------------------------------------------
# group helpers (private to QAQ; vectorised over every group, bits as a tensor)
# ------------------------------------------------------------------------------------------------


def outlier_mask(xg: torch.Tensor, ratio: float) -> torch.Tensor:
    """Values beyond the ratio/2 lower and upper order statistics of the last axis (kthvalue, as
    QAQ's code): x <= kth(ceil(r/2 n)) or x > kth(floor((1 - r/2) n))."""
    n = xg.shape[-1]
    if ratio <= 0 or n == 0:
        return torch.zeros_like(xg, dtype=torch.bool)
    k_lo = min(max(int(math.ceil(ratio / 2 * n)), 1), n)
    k_hi = min(max(int(math.floor((1.0 - ratio / 2) * n)), 1), n)
    lo = torch.kthvalue(xg, k_lo, dim=-1, keepdim=True).values
    hi = torch.kthvalue(xg, k_hi, dim=-1, keepdim=True).values
    return (xg <= lo) | (xg > hi)


def code_bits_fp16(R: torch.Tensor, e_max: torch.Tensor, n_min: int, n_max: int, e_is_fp16: bool) -> torch.Tensor:
    """clamp(ceil(log2(R / (2 e_max) + 1)), n_min, n_max) with every step rounded to fp16, as the
    authors' code computes it on an fp16 model (src/quantizer.py:187, 191; dtype src/main.py:24).

    R is the fp16 difference of fp16 numbers (exact in fp32, then rounded). Values: e_max divides by the
    fp16 attention probabilities (quantizer.py:171), so it is an fp16 tensor (`e_is_fp16`); keys: e_max
    is a Python float (quantizer.py:160). Each op computes in fp32 and rounds its result to fp16, as
    torch's fp16 kernels do. 1 + y rounds to 1 for y <= 2^-11, so groups with R < ~1e-3 x 2 e_max get
    0 bits here (in fp32 only for y < ~7e-6: `qaq_bits`).
    """
    h = lambda t: t.half().float()      # the authors' fp16 arithmetic: overflow is inf there too  # noqa: E731
    r = h(R.float())
    e = e_max.float() if torch.is_tensor(e_max) else torch.tensor(float(e_max), device=r.device)
    two_e = h(2.0 * h(e)) if e_is_fp16 else 2.0 * e
    y = h(r / two_e)
    bits = torch.ceil(h(torch.log2(h(y + 1.0))))
    bits = torch.nan_to_num(bits, nan=float(n_max), posinf=float(n_max), neginf=float(n_min))
    return bits.clamp(n_min, n_max).to(torch.int64)


def group_stats(xg: torch.Tensor, mask: torch.Tensor):
    """min, max, mean, std (unbiased) of each group's non-outlier values; groups [*G, n] -> [*G]."""
    valid = ~mask
    cnt = valid.sum(-1)
    big = torch.finfo(xg.dtype).max
    mn = torch.where(valid, xg, big).amin(-1)
    mx = torch.where(valid, xg, -big).amax(-1)
    empty = cnt == 0
    mn = torch.where(empty, torch.zeros_like(mn), mn)
    mx = torch.where(empty, torch.zeros_like(mx), mx)
    c = cnt.clamp_min(1).to(xg.dtype)
    mu = torch.where(valid, xg, 0).sum(-1) / c
    var = (torch.where(valid, xg - mu[..., None], 0) ** 2).sum(-1) / (cnt - 1).clamp_min(1).to(xg.dtype)
    return mn, mx, mu, var.sqrt()


def dequant_groups(xg: torch.Tensor, bits: torch.Tensor, mn, mx, mu, sd, grid: str,
                   zero: str = "mean") -> torch.Tensor:
    """Quantize-dequantize each group at its own bit width (bits [*G]); parameters stored as fp16.

    midpoint: 2^B segments of [min, max], rounded to the segment midpoint (QAQ paper, Sec. 4.1).
    mean:     mu + k s, s = R / 2^B, k in [-2^(B-1), 2^(B-1) - 1] (QAQ code). B = 0: k = -1/2, i.e.
              mu - R/2, with zero="authors" (both clamp bounds of src/quantizer.py:249 are -1/2);
              k = 0, i.e. mu, with zero="mean".
    normal:   (x - mu) / std mapped to the centre quantile of its bin among 2^B N(0,1) bins.
    """
    if grid in ("midpoint", "normal"):
        idx, p0, p1 = encode_groups(xg, bits, mn, mx, mu, sd, grid)
        return decode_groups(idx, bits, p0, p1, grid)
    b = bits.float()[..., None]
    levels = 2.0 ** b
    if grid == "mean":
        m = _fp16(mu)[..., None]
        s = _fp16((mx - mn)[..., None] / levels).clamp_min(1e-8)
        half = 2.0 ** (b - 1)
        q = torch.round((xg - m) / s).clamp(min=-half, max=half - 1)      # B = 0: clamp to [-1/2, -1/2]
        if zero == "mean":
            q = torch.where(b == 0, torch.zeros_like(q), q)
        elif zero != "authors":
            raise KVLabError(f"qaq: unknown zero-bits rule {zero!r}")
        return m + q * s
    raise KVLabError(f"qaq: unknown grid {grid!r}")


def encode_groups(xg: torch.Tensor, bits: torch.Tensor, mn, mx, mu, sd, grid: str):
    """The codes of `dequant_groups`' "midpoint" and "normal" grids: (idx [*G, n] float, integers in
    [0, 2^B - 1]; p0, p1 [*G, 1] fp16-valued float32): midpoint (min, segment width), normal (mean, std)."""
    levels = 2.0 ** bits.float()[..., None]
    if grid == "midpoint":
        lo = _fp16(mn)[..., None]
        s = _fp16((mx - mn)[..., None] / levels).clamp_min(1e-8)
        idx = torch.floor((xg - lo) / s).clamp(min=torch.zeros_like(levels), max=levels - 1)
        return idx, lo, s
    if grid == "normal":
        m = _fp16(mu)[..., None]
        s = _fp16(sd)[..., None].clamp_min(1e-8)
        p = torch.special.ndtr((xg - m) / s)
        idx = torch.minimum(torch.floor(p * levels), levels - 1)
        return idx, m, s
    raise KVLabError(f"qaq: grid {grid!r} has no integer codes here (midpoint, normal)")


def decode_groups(idx: torch.Tensor, bits: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, grid: str) -> torch.Tensor:
    """Dequantize `encode_groups`' codes (p1 is clamped at 1e-8 again: a no-op on the encoder's values, and
    what an fp16-stored scale needs)."""
    levels = 2.0 ** bits.float()[..., None]
    s = p1.clamp_min(1e-8)
    if grid == "midpoint":
        return p0 + (idx + 0.5) * s
    if grid == "normal":
        return p0 + torch.special.ndtri((idx + 0.5) / levels) * s
    raise KVLabError(f"qaq: grid {grid!r} has no integer codes here (midpoint, normal)")


# Presets, measured on SmolLM2-135M (wiki, 512-token windows, prefill-then-decode, bits of the
# quantized prompt incl. metadata; fp16 ppl 14.14, int4 14.11 @ 4.5 bits, int3 15.04 @ 3.5,
# int2 61.0 @ 2.5). The error targets move the value bits; on this model the key rule is nearly
# insensitive to eps_k (it enters through a log), so the low preset also caps n_max and groups
# per (token, layer) to cut metadata.
preset("qaq-high", "qaq:eps_k=2.0,eps_v=0.05")                                # ~4.1 bits (K 5.7, V 2.4), ppl 14.4
preset("qaq-low", "qaq:eps_k=2.0,eps_v=1.0,level=layer,outliers=0.0,n_max=4")  # ~2.8 bits (K 4.2, V 1.3), ppl 16.2
preset("qaq-code", "qaq:variant=code,level=token,n_min=1,n_max=4,eps_k=1.0,eps_v=1.0")  # ~3.1 bits, ppl 22.7
