"""PM-KVQ: Progressive Mixed-precision KV cache Quantization (Liu et al. 2025, "PM-KVQ: Progressive
Mixed-precision KV Cache Quantization for Long-CoT LLMs", arXiv 2505.18610).

1. Block-wise sensitivity (calibration, `kvlab.calibrate` -> `fit`): for every layer l and width b,
       s_K[l, b] = mean | (Q_b(K_l) - K_l) * dL/dK_l |       (same for V; post-RoPE K, as the
   authors' rope-output hooks), from one forward + backward pass of the LM loss on calibration
   text. Q_b is the cache's own quantizer (asymmetric, group `group` along head_dim per token).
2. Block-wise memory allocation (`kvlab.quant.allocation.allocate_bits`): the widths b_l in
   {min_bits, ..., max_bits} (powers of two) minimising sum_l s_K[l, b_l] + s_V[l, b_l] subject to
   sum_l b_l * size_l <= budget * sum_l size_l — the authors' integer program, solved exactly.
   Layer l's memory budget is then budget_l = b_l * max_tokens (bits per element-slot).
3. Progressive cache: every layer starts storing at `init_bits` (16, integer codes) and halves
   (16 -> 8 -> 4 -> 2) whenever its memory exceeds its budget:
       bits * (quantized tokens) > budget_l                                  (count_window=false)
       16 * (sink + window tokens) + bits * (quantized tokens) > budget_l    (count_window=true)
   Codes only (the accounting reported by the run also counts scales and zeros). With
   count_window=false a layer reaches exactly its allocated width when the sequence reaches
   `max_tokens`; count_window=true is the authors' code (progressive_quantized_cache.py), which
   charges the fp16 sink and window to the same budget — then a layer is at half its allocated
   width by `max_tokens`, and a budget below 16 * (sink + window) / max_tokens is exceeded from
   the start. `max_tokens` should be the context length you evaluate (kvlab's default window: 512;
   the paper: 32k-token reasoning traces).
   The width is a deterministic function of the layer's length (`ctx.total_tokens`), so the
   method declares `rewrites_stored`: at every flush it is handed the whole quantized region
   (already-stored dequantized tokens + the new chunk) and re-quantizes it at the current width —
   equivalent to the authors' integer bit-width shrinking of stored codes (min/max are preserved).
   If even `min_bits` does not fit, the layer stays at `min_bits` (the authors raise MemoryError);
   `info["over_budget"]` says so.
4. Sink 1 and window (residual) 128 tokens stay fp16 (kept by the core).

Positional-interpolation calibration (`interpolate=true`, the authors' `effective_len`): a
calibration sequence of T < max_tokens tokens is run with RoPE positions 0, s, 2s, ... where
s = max_tokens // T, so short calibration text exercises the rotary frequencies of long contexts.
Only the sensitivity pass uses it; the authors' other calibration step (SmoothAttention-style
key reparameterisation searched with interpolated positions) is not implemented.

In the fake-quant protocol every token is quantized at the width of the final length (no history).
`allocation="uniform"` skips calibration: every layer gets the largest width <= budget.
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


@register
@dataclass(frozen=True)
class PMKVQ(Method):
    """PM-KVQ progressive mixed precision. budget: average bits per element at `max_tokens`."""

    name = "pmkvq"
    rewrites_stored: ClassVar[bool] = True
    budget: float = 4.0
    max_tokens: int = 512
    min_bits: int = 2
    max_bits: int = 8
    init_bits: int = 16
    group: int = 128
    allocation: str = "sensitivity"
    interpolate: bool = True
    count_window: bool = False
    sink: int = 1
    residual: int = 128

    @property
    def needs_calibration(self) -> bool:
        return self.allocation == "sensitivity"

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
        """(width, over_budget) of a layer holding `total_tokens`, `quantized_tokens` of them quantized:
        halve from init_bits while bits * quantized_tokens (+ 16 * fp tokens if count_window)
        > allocated * max_tokens."""
        budget_l = self.allocated_bits(num_layers)[layer] * self.max_tokens
        fp = total_tokens - quantized_tokens if self.count_window else 0
        bits = self.init_bits
        while 16 * fp + bits * quantized_tokens > budget_l and bits > self.min_bits:
            bits //= 2
        return bits, 16 * fp + bits * quantized_tokens > budget_l

    # --- the per-layer rule ------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        b, h, t, d = x.shape
        total = ctx.total_tokens if ctx.total_tokens is not None else ctx.start + t
        bits, over = self.layer_bits(ctx.layer, ctx.num_layers, total, t)
        g = min(self.group, d)
        if d % g:
            raise KVLabError(f"pmkvq: group={self.group} does not divide head_dim={d}; use a divisor of {d}")
        if bits >= 16:   # the progressive cache starts at full precision: stored as fp16, no scales
            xh, total_bits = x, fp16_bits(x)
        else:
            xh, total_bits = quantize_uniform(x, bits, dim=-1, group=g)
        return Quantized(xh, total_bits, info={"bits": bits, "over_budget": over,
                                               "budget_bits": self.allocated_bits(ctx.num_layers)[ctx.layer]})

    # --- calibration -------------------------------------------------------------------------------
    def position_stride(self, calib_tokens: int) -> int:
        """Positional interpolation: RoPE positions 0, s, 2s, ... with s = max_tokens // T (authors' effective_len)."""
        return max(self.max_tokens // calib_tokens, 1) if self.interpolate else 1

    def calibration_needs(self, calib_tokens: int) -> CalibrationNeeds | None:
        """Post-RoPE K and V of the whole calibration batch with dL/dK, dL/dV (L = the mean next-token
        cross-entropy), positions interpolated to `max_tokens` when `interpolate`."""
        if not self.needs_calibration:
            return None
        return CalibrationNeeds(what=("k", "v"), grads=True, loss="mean",
                                position_stride=self.position_stride(calib_tokens), to_cpu=False)

    def calibration_key(self) -> dict:
        """What changes the sensitivities (the budget and allocation are applied after them)."""
        return {"method": "pmkvq-sensitivity", "version": 1, "choices": self.choices, "group": self.group}

    def fit(self, captured: Captured) -> dict[str, torch.Tensor]:
        """Per-layer K/V sensitivities {"k", "v": [layers, len(choices)] float64} from a capture."""
        ks, vs = sensitivity(captured.tensors["k"], captured.tensors["v"], captured.grads["k"], captured.grads["v"],
                             self.choices, min_group=self.group)
        return {"k": ks, "v": vs}


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
