"""PM-KVQ: Progressive Mixed-precision KV cache Quantization (Liu et al. 2025, "PM-KVQ: Progressive
Mixed-precision KV Cache Quantization for Long-CoT LLMs", arXiv 2505.18610; code: github.com/thu-nics/PM-KVQ,
commit c8a2bff, cited below as <file>:<line> under pm_kvq/quantization/methods/pm_kvq/ unless a path is given).
The defaults follow the authors' code; kvlab's former behaviours stay available as field values.

1. Block-wise sensitivity (calibration, `kvlab.calibrate` -> `fit`): for every layer l and width b,
       s_K[l, b] = mean | (Q_b(K_l) - K_l) * dL/dK_l |       (same for V; post-RoPE K, as the
   authors' rope-output hooks, allocation/sensitivity.py:31-44), from one forward + backward pass of
   the LM loss on calibration text. Q_b is the cache's own quantizer (asymmetric, group `group` along
   head_dim per token). Computed on the model without the key reparameterisation (README.md:32-56
   allocates before the reparameterisation is calibrated).
2. Block-wise memory allocation (`kvlab.quant.allocation.allocate_bits`): the widths b_l in
   {min_bits, ..., max_bits} (powers of two) minimising sum_l s_K[l, b_l] + s_V[l, b_l] subject to
   sum_l b_l * size_l <= budget * sum_l size_l — the authors' integer program (allocation/allocation.py:
   6-61), solved exactly. Layer l's memory budget is then budget_l = b_l * max_tokens bits per
   element-slot (allocation.py:17: kv_mem = bits * hidden * 2 * max_len / 8 bytes).
3. Key reparameterisation (`reparam`, SmoothAttention-style, smoothattention/): the authors divide the
   rows of k_proj by a per-(kv head, channel) scale s and multiply the matching rows of q_proj by it
   (apply_smoothattention.py:45-54), so attention logits are unchanged and the cache stores K / s.
   The scale of channel j is shared with its rotary partner j + head_dim/2 (`repeat(1, 1, 1, 2)`,
   apply_smoothattention.py:47), so scaling before RoPE equals scaling after it; kvlab simulates it
   inside the method on post-RoPE keys: K_hat = s * Q(K / s) (values are not reparameterised).
       s = clamp(maxK ** alpha, 1e-4, 1e4)                  (apply_smoothattention.py:40,46;
                                                             smoothattention/searching_scales.py:93)
   maxK[l, h, j] = max over calibration tokens of max(|K_j|, |K_{j + d/2}|) of the post-RoPE keys at
   interpolated positions (apply_smoothattention.py:9-30: the key cache, reshaped to pairs of halves).
   No query statistic enters s. alpha, per layer (reparam="authors"): the grid alpha = 1 - n / grid,
   n = 0 .. grid-1 (grid 20: 1.0, 0.95, ..., 0.05; searching_scales.py:32,91-93) minimising the mean
   squared error of the layer's attention output between full precision and K_hat, V_hat quantized at
   `reparam_bits` (README.md:75-85: --k_bits 4 --v_bits 4, per group of 128, asymmetric,
   scripts/search_rep_scales.py:30-31) on the calibration text at interpolated positions
   (searching_scales.py:43-46,103-114; the first alpha of the grid wins ties: strict `<`, :111). The
   authors take the error after o_proj (the self_attn output, pre_attn_rtn/rtn_modeling_llama.py:61);
   kvlab's methods never see the weights, so kvlab takes it before o_proj (the per-head attention
   output, causal, scaling head_dim**-0.5), from captured post-RoPE q, k, v. Layer inputs come from the
   full-precision model in both (searching_scales.py:121-122). reparam="fixed": alpha = `alpha` for
   every layer (apply_smoothattention.py:33,40, default 0.5), no search; reparam="none": kvlab's former
   method (no reparameterisation). Q here is the cache's quantizer (fp16 scale and zero point).
4. Progressive cache (progressive/progressive_modeling_llama.py, the "fake" backend the README runs,
   README.md:100-108; progressive_quantized_cache.py is the packed backend with the same rules):
   every layer starts storing at `init_bits` (16) and its width halves (16 -> 8 -> 4 -> 2) when its
   memory exceeds its budget:
       16 * (sink + window tokens) + bits * (quantized tokens) > budget_l    (count_window=true,
                                                                    progressive_modeling_llama.py:128-134)
       bits * (quantized tokens) > budget_l                                  (count_window=false)
   Codes only (the accounting reported by the run also counts scales and zeros).
   shrink="per_forward" (the authors): the check runs once per forward after its attention, on the
   width the layer had, and halves at most once (progressive_modeling_llama.py:134-147; packed
   backend progressive_quantized_cache.py:220-228); a layer still over budget halves again at the
   next forward. The width is read from the method's previous call (`LayerContext.previous`, the last
   `Quantized.info`); the first call of a sequence starts from `init_bits` (the authors reset per
   sequence, progressive_modeling_llama.py:74-78). kvlab's flush at the start of call t+1 is the
   authors' update after the attention of forward t (the same stored tokens), so the width forward
   t+1 reads is the same. In the fake protocol (no history, `previous` None) the width is "direct".
   shrink="direct" (kvlab's former rule): the width that fits the current length, halving as often as
   needed at once. With count_window=false a layer reaches exactly its allocated width when the
   sequence reaches `max_tokens`; with count_window=true (the authors) it reaches half of it.
   If even `min_bits` does not fit (or nothing is quantized yet), the layer stays where it is and
   `info["over_budget"]` says so (the authors raise MemoryError, progressive_modeling_llama.py:135-140).
   The whole quantized region is re-quantized at the current width from the fp tokens at every call
   (`rewrites_stored`); the authors re-quantize the stored (already quantized) values, or shrink the
   integer codes (progressive_quantized_cache.py:256-267): min/max are kept either way, only double
   rounding differs.
5. Sink 1 and window `residual` 128 tokens stay at 16 bits (scripts/evaluation.py:28-32).
   flush_block=true (the authors): the window fills up to `residual` tokens and is then flushed whole
   (progressive_modeling_llama.py:94-108: tmp // n_window * n_window tokens leave at the current
   width), so after a call it holds (stored - sink) % residual tokens. To run the per-forward check at
   every call, in prefill-decode/decode PM-KVQ takes every pending token at every call
   (`flush_count` = pending) and keeps the window itself: it returns the last (stored - sink) %
   residual tokens unchanged and books them at 16 bits (so `run.token_spans` counts them as
   quantized, and k/v_rel_err include them with zero error). flush_block=false (kvlab's former rule):
   the core's residual window, each token quantized once `residual` newer ones follow.
   `max_tokens` should be the context length you evaluate (kvlab's default window: 512; the paper:
   32k-token reasoning traces).

Positional-interpolation calibration (`interpolate=true`, the authors' `effective_len`): a
calibration sequence of T < max_tokens tokens is run with RoPE positions 0, s, 2s, ... where
s = max_tokens // T (searching_scales.py:43-46, apply_smoothattention.py:11-14,
allocation/sensitivity.py:54-57), so short calibration text exercises the rotary frequencies of long
contexts; one capture serves the sensitivities, the key maxima and the alpha search.

In the fake-quant protocol every token is quantized at the width of the final length (no history,
no window). `allocation="uniform"` skips the sensitivity pass: every layer gets the largest width <=
budget (reparam="authors"/"fixed" still calibrates the scales).

Former kvlab behaviour, bit-identical: reparam=none,shrink=direct,count_window=false,flush_block=false.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import KVLabError
from ..allocation import allocate_bits
from ..base import CalibrationNeeds, Captured, LayerContext, Method, Quantized, check_choice, check_range
from ..primitives import fp16_bits, quantize_uniform
from ..registry import preset, register

ALLOCATIONS = ("sensitivity", "uniform")
REPARAMS = ("authors", "fixed", "none")
SHRINKS = ("per_forward", "direct")


@register
@dataclass(frozen=True)
class PMKVQ(Method):
    """PM-KVQ progressive mixed precision. budget: average bits per element at `max_tokens`.

    Former kvlab behaviour: reparam=none, shrink=direct, count_window=false, flush_block=false."""

    name = "pmkvq"
    rewrites_stored: ClassVar[bool] = True
    # `reparam` (a field the former rules did not have) is in every spec, so results stored under the
    # former spec strings ("pmkvq:budget=3.0") are never read as the authors' rules'
    spec_always: ClassVar[tuple[str, ...]] = ("reparam",)
    budget: float = 4.0
    max_tokens: int = 512
    min_bits: int = 2
    max_bits: int = 8
    init_bits: int = 16
    group: int = 128
    allocation: str = "sensitivity"
    interpolate: bool = True
    count_window: bool = True          # the authors charge the fp16 sink + window (former default: false)
    sink: int = 1
    residual: int = 128
    reparam: str = "authors"           # key reparameterisation: "authors" (alpha searched), "fixed", "none"
    alpha: float = 0.5                 # reparam="fixed": the exponent of every layer
    reparam_grid: int = 20             # reparam="authors": alpha in {1 - n / grid}
    reparam_bits: int = 4              # reparam="authors": K/V width of the alpha search
    shrink: str = "per_forward"        # "per_forward": halve at most once per call; "direct": jump
    flush_block: bool = True           # the fp window flushed whole when it holds `residual` tokens

    @property
    def needs_calibration(self) -> bool:
        return self.allocation == "sensitivity" or self.reparam != "none"

    @property
    def choices(self) -> list[int]:
        """Candidate final widths: powers of two in [min_bits, max_bits]."""
        return [1 << p for p in range(int(math.log2(self.min_bits)), int(math.log2(self.max_bits)) + 1)]

    def validate(self) -> None:
        super().validate()
        pow2 = (1, 2, 4, 8, 16)
        check_range(self.name, "budget", self.budget, 1, 16)
        check_range(self.name, "max_tokens", self.max_tokens, 1, 1 << 30, integer=True)
        check_choice(self.name, "min_bits", self.min_bits, pow2)
        check_choice(self.name, "max_bits", self.max_bits, pow2)
        check_choice(self.name, "init_bits", self.init_bits, pow2)
        if self.max_bits < self.min_bits:
            raise KVLabError(f"{self.name}: 'max_bits' must be >= min_bits={self.min_bits}, got {self.max_bits}")
        if self.init_bits < self.max_bits:
            raise KVLabError(f"{self.name}: 'init_bits' must be >= max_bits={self.max_bits}, got {self.init_bits}")
        if self.budget < self.min_bits:
            raise KVLabError(f"{self.name}: 'budget' must be >= min_bits={self.min_bits}, got {self.budget!r}")
        check_range(self.name, "group", self.group, 1, 1 << 20, integer=True)
        check_choice(self.name, "allocation", self.allocation, ALLOCATIONS)
        check_choice(self.name, "reparam", self.reparam, REPARAMS)
        check_range(self.name, "alpha", self.alpha, 0, 1)
        check_range(self.name, "reparam_grid", self.reparam_grid, 1, 1000, integer=True)
        check_range(self.name, "reparam_bits", self.reparam_bits, 1, 8, integer=True)
        check_choice(self.name, "shrink", self.shrink, SHRINKS)
        for f in ("count_window", "flush_block", "interpolate"):
            if not isinstance(getattr(self, f), bool):
                raise KVLabError(f"{self.name}: '{f}' must be true or false, got {getattr(self, f)!r}")

    # --- allocation ------------------------------------------------------------------------------
    def allocate(self, k_sens: torch.Tensor, v_sens: torch.Tensor, sizes=None) -> list[int]:
        """Final width per layer from per-layer sensitivities [layers, len(choices)] (the integer program)."""
        k_sens, v_sens = torch.as_tensor(k_sens).double().cpu(), torch.as_tensor(v_sens).double().cpu()
        if k_sens.shape != v_sens.shape or k_sens.dim() != 2 or k_sens.shape[1] != len(self.choices):
            raise KVLabError(f"pmkvq: sensitivities must both be [layers, {len(self.choices)}] "
                             f"(choices {self.choices}), got {tuple(k_sens.shape)} and {tuple(v_sens.shape)}")
        return allocate_bits(k_sens + v_sens, self.choices, self.budget, sizes)

    def allocated_bits(self, num_layers: int | None = None) -> list[int]:
        """Final width per layer (from calibration, or uniform)."""
        if self.allocation == "uniform":
            b = max(c for c in self.choices if c <= self.budget)
            return [b] * (num_layers or 1)
        state = self.fitted()
        bits = state.derived("bits", lambda: self.allocate(state["k"], state["v"]))
        if num_layers is not None and len(bits) != num_layers:
            raise KVLabError(f"pmkvq: calibrated for {len(bits)} layers, the model has {num_layers}")
        return list(bits)

    def layer_bits(self, layer: int, num_layers: int, total_tokens: int, quantized_tokens: int) -> tuple[int, bool]:
        """shrink="direct": (width, over_budget) of a layer holding `total_tokens`, `quantized_tokens` of
        them quantized: halve from init_bits while bits * quantized_tokens (+ 16 * fp tokens if
        count_window) > allocated * max_tokens."""
        budget_l = self.allocated_bits(num_layers)[layer] * self.max_tokens
        fp = total_tokens - quantized_tokens if self.count_window else 0
        bits = self.init_bits
        while 16 * fp + bits * quantized_tokens > budget_l and bits > self.min_bits:
            bits //= 2
        return bits, 16 * fp + bits * quantized_tokens > budget_l

    def next_bits(self, layer: int, num_layers: int, total_tokens: int, quantized_tokens: int,
                  bits: int) -> tuple[int, bool]:
        """shrink="per_forward" (progressive_modeling_llama.py:128-147): (width, over_budget) after one
        update of a layer that stored at `bits`: the memory 16 * fp tokens (count_window) + bits *
        quantized tokens is checked at the width the layer had, and over the budget the width halves
        once (not below min_bits; not while nothing is quantized: the authors raise MemoryError there)."""
        budget_l = self.allocated_bits(num_layers)[layer] * self.max_tokens
        fp = total_tokens - quantized_tokens if self.count_window else 0
        if 16 * fp + bits * quantized_tokens > budget_l and quantized_tokens > 0 and bits > self.min_bits:
            bits //= 2
        return bits, 16 * fp + bits * quantized_tokens > budget_l

    # --- the per-layer rule ------------------------------------------------------------------------
    def flush_count(self, kind, pending: int, stored: int) -> int:
        """flush_block: every pending token at every call (the method keeps the authors' window itself, so
        the per-forward width check runs at every call); else the core's residual window."""
        if self.flush_block:
            return pending
        return super().flush_count(kind, pending, stored)

    def rep_scales(self, layer: int, device) -> torch.Tensor | None:
        """The key scales s [kv_heads, head_dim] of a layer (None for reparam="none")."""
        if self.reparam == "none":
            return None
        return self.fitted().on(device)["rep_scales"][layer]

    def width(self, x: torch.Tensor, ctx: LayerContext) -> tuple[int, bool, int]:
        """(width, over_budget, window) of this call: the code width the quantized tokens are stored at
        (16: fp16, no codes), whether the layer is over its budget, and how many trailing tokens stay in
        the authors' fp window. `quantize` stores x[..., :t - window, :] at that width (packing reads it too)."""
        t = x.shape[-2]
        total = ctx.total_tokens if ctx.total_tokens is not None else ctx.start + t
        history = ctx.previous is not None          # prefill-decode / decode; None: fake
        # the authors' window: what the last block flush left (only where the core hands the whole region)
        window = t % self.residual if history and self.flush_block and self.residual > 0 else 0
        q = t - window
        if self.shrink == "per_forward" and history:
            bits, over = self.next_bits(ctx.layer, ctx.num_layers, total, q,
                                        int(ctx.previous.get("bits", self.init_bits)))
        else:
            bits, over = self.layer_bits(ctx.layer, ctx.num_layers, total, q)
        return bits, over, window

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        b, h, t, d = x.shape
        history = ctx.previous is not None          # prefill-decode / decode; None: fake
        bits, over, window = self.width(x, ctx)
        q = t - window
        g = min(self.group, d)
        if d % g:
            raise KVLabError(f"pmkvq: group={self.group} does not divide head_dim={d}; use a divisor of {d}")
        xq = x[..., :q, :] if window else x
        if bits >= 16 or q == 0:    # the progressive cache starts at full precision: stored as fp16, no scales
            xh, total_bits = xq, fp16_bits(xq)
        else:
            s = self.rep_scales(ctx.layer, x.device) if ctx.kind == "k" else None
            if s is None:
                xh, total_bits = quantize_uniform(xq, bits, dim=-1, group=g)
            else:                   # K_hat = s * Q(K / s): the authors' k_proj / s, q_proj * s
                s = s.float()[None, :, None, :]      # K / s and s * Q(.) in fp32 (bf16/fp16 models too)
                xh, total_bits = quantize_uniform(xq.float() / s, bits, dim=-1, group=g)
                xh = (xh * s).to(x.dtype)
        if window:
            xh = torch.cat([xh, x[..., q:, :]], dim=-2)
            total_bits = total_bits + fp16_bits(x[..., q:, :])
        info = {"bits": bits, "over_budget": over, "budget_bits": self.allocated_bits(ctx.num_layers)[ctx.layer]}
        if history and self.flush_block:
            info["window"] = window
        return Quantized(xh, total_bits, info=info)

    # --- calibration -------------------------------------------------------------------------------
    def position_stride(self, calib_tokens: int) -> int:
        """Positional interpolation: RoPE positions 0, s, 2s, ... with s = max_tokens // T (authors' effective_len)."""
        return max(self.max_tokens // calib_tokens, 1) if self.interpolate else 1

    def calibration_needs(self, calib_tokens: int) -> CalibrationNeeds | None:
        """Post-RoPE K and V (and the queries for reparam="authors") of the whole calibration batch, with
        dL/dK, dL/dV (L = the mean next-token cross-entropy) for the sensitivities, positions
        interpolated to `max_tokens` when `interpolate`."""
        if not self.needs_calibration:
            return None
        what = ("q", "k", "v") if self.reparam == "authors" else ("k", "v")
        return CalibrationNeeds(what=what, grads=self.allocation == "sensitivity", loss="mean",
                                position_stride=self.position_stride(calib_tokens), to_cpu=False)

    def calibration_key(self) -> dict:
        """What changes the fit (the budget and the progressive rules are applied after it); reparam="none"
        keeps the former key, so fits already on disk are reused."""
        key = {"method": "pmkvq-sensitivity", "version": 1, "choices": self.choices, "group": self.group}
        if self.reparam == "none":
            return key
        key.update(allocation=self.allocation, reparam=self.reparam, reparam_version=1)
        if self.reparam == "fixed":
            key["alpha"] = self.alpha
        else:
            key.update(reparam_grid=self.reparam_grid, reparam_bits=self.reparam_bits)
        return key

    def fit(self, captured: Captured) -> dict[str, torch.Tensor]:
        """{"k", "v": per-layer K/V sensitivities [layers, len(choices)] float64} (allocation="sensitivity")
        and, for reparam != "none", {"rep_scales": [layers, kv_heads, head_dim] float32, "alpha": [layers]
        float64, "max_keys": [layers, kv_heads, head_dim // 2] float32}."""
        out = {}
        if self.allocation == "sensitivity":
            out["k"], out["v"] = sensitivity(captured.tensors["k"], captured.tensors["v"], captured.grads["k"],
                                             captured.grads["v"], self.choices, min_group=self.group)
        if self.reparam != "none":
            maxk = max_keys(captured.tensors["k"])
            if self.reparam == "fixed":
                alphas = [float(self.alpha)] * len(maxk)
            else:
                alphas = [search_alpha(q, k, v, m, self.reparam_grid, self.reparam_bits, self.group)[0]
                          for q, k, v, m in zip(captured.tensors["q"], captured.tensors["k"],
                                                captured.tensors["v"], maxk)]
            out["rep_scales"] = torch.stack([key_scales(m, a) for m, a in zip(maxk, alphas)])
            out["alpha"] = torch.tensor(alphas, dtype=torch.float64)
            out["max_keys"] = torch.stack(maxk)
        return out


def max_keys(keys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, max |K| over the calibration tokens (and rows) of each rotary pair of channels (j, j + d/2):
    [kv_heads, d // 2] float32 (apply_smoothattention.py:20-26: the key cache reshaped to halves)."""
    out = []
    with torch.no_grad():
        for k in keys:
            n, h, t, d = k.shape
            a = k.detach().float().abs().reshape(n, h, t, 2, d // 2)
            out.append(a.amax(dim=(0, 2, 3)).cpu())
    return out


def key_scales(maxk: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = clamp(maxK ** alpha, 1e-4, 1e4), one per rotary pair, repeated over both halves: [kv_heads, d]
    (searching_scales.py:93-94, apply_smoothattention.py:40,46-47)."""
    s = (maxk.float() ** alpha).clamp(min=1e-4, max=1e4)
    return torch.cat([s, s], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of one row: q [H, T, d], k/v [kvh, T, d] (GQA: query head i reads kv head
    i // (H / kvh)), scaling d ** -0.5; [H, T, d] float32."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    T = q.shape[-2]
    mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - T)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v


def search_alpha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maxk: torch.Tensor, grid: int = 20,
                 bits: int = 4, group: int = 128) -> tuple[float, list[float]]:
    """One layer's alpha (searching_scales.py:86-118): over alpha = 1 - n / grid, n = 0 .. grid-1, the one
    minimising the mean squared error of the attention output between full precision and keys s * Q(K / s),
    values Q(V) (Q: `bits`, groups of `group` along head_dim); the first wins ties. q [n, H, T, d],
    k, v [n, kvh, T, d] post-RoPE (interpolated positions), maxk [kvh, d // 2]. Returns (alpha, losses)."""
    with torch.no_grad():
        q, k, v = q.detach().float(), k.detach().float(), v.detach().float()
        g = min(group, k.shape[-1])
        vq = quantize_uniform(v, bits, dim=-1, group=g)[0]
        ref = [_attention(q[r], k[r], v[r]) for r in range(q.shape[0])]
        losses, best, best_alpha = [], float("inf"), None
        for n in range(grid):
            alpha = 1 - n / grid
            s = key_scales(maxk, alpha).to(k.device)[None, :, None, :]
            kq = quantize_uniform(k / s, bits, dim=-1, group=g)[0] * s
            err = sum(float((_attention(q[r], kq[r], vq[r]) - ref[r]).double().square().sum())
                      for r in range(q.shape[0]))
            loss = err / (sum(x.numel() for x in ref))
            losses.append(loss)
            if loss < best:
                best, best_alpha = loss, alpha
    return best_alpha, losses


def sensitivity(keys: list[torch.Tensor], values: list[torch.Tensor], kgrads: list[torch.Tensor],
                vgrads: list[torch.Tensor], choices, min_group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """s[l, c] = mean |(Q_c(X_l) - X_l) * dLoss/dX_l| for X = post-RoPE K and V; returns ([L, C], [L, C]).

    Q_c is the cache's own quantizer at width c (asymmetric, groups of `min_group` along head_dim)."""
    n = len(keys)
    out_k = torch.zeros(n, len(choices), dtype=torch.float64)
    out_v = torch.zeros(n, len(choices), dtype=torch.float64)
    with torch.no_grad():
        for l in range(n):
            for c, bits in enumerate(choices):
                for x, g, out in ((keys[l], kgrads[l], out_k), (values[l], vgrads[l], out_v)):
                    x = x.detach()
                    grp = min(min_group, x.shape[-1])
                    xh, _ = quantize_uniform(x, bits, dim=-1, group=grp)
                    out[l, c] = ((xh.float() - x.float()) * g.float()).abs().mean().double().cpu()
    return out_k, out_v


for _b in (4, 3):
    preset(f"pmkvq-{_b}", f"pmkvq:budget={float(_b)}")
