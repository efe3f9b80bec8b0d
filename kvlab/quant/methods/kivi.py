"""KIVI: tuning-free asymmetric low-bit KV-cache quantization.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024).
Sec. 3 (observations) and Sec. 3.3 / Algorithm 1:

* keys are quantized **per channel**: one asymmetric min-max scale and zero point per channel
  over a group of `group` consecutive tokens (keys have fixed outlier channels, so grouping along
  tokens keeps those channels' range to themselves);
* values are quantized **per token**: groups of `group` elements along head_dim (value errors
  mix across channels through the attention weights, so per-token error is what matters);
* quantization is asymmetric round-to-nearest, levels mn + k * (mx - mn) / (2^b - 1) (Eq. 1);
* the most recent `residual` tokens stay fp16 (R = 128 in the paper); tokens are quantized group
  by group as they leave that window. The interception core keeps the window and accounts it at
  16 bits; this method only sees the tokens to quantize, handed over in multiples of
  `token_group == group` so every key group is complete (a ragged last group in the fake-quant
  protocol is padded by the primitive, and counted only for its real tokens).
  Value groups must divide head_dim; a `group` >= head_dim makes one group per token vector.

Bits (codes + metadata): b per element + fp16 scale + fp16 zero point per group, i.e. for
head_dim D, T tokens: keys b*T*D + 32 * D * ceil(T/group), values b*T*D + 32 * T * D/group
(per batch and head). KIVI-2 with group 32 is 2 + 1 bits per element for both K and V.
LongChat-7B LongBench: fp16 38.72, KIVI-2 38.30, KIVI-4 38.79 (paper Table 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import KVLabError
from ..base import LayerContext, Method, Quantized, check_range
from ..primitives import quantize_uniform
from ..registry import preset, register


@register
@dataclass(frozen=True)
class KIVI(Method):
    """KIVI: keys per channel (groups of `group` tokens), values per token (groups of `group`
    along head_dim), asymmetric `bits`-bit, the last `residual` tokens fp16 (kept by the core)."""

    name = "kivi"
    bits: int = 2
    v_bits: int | None = None        # value bits; default: same as `bits` (the paper uses one b)
    group: int = 32
    residual: int = 128

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "bits", self.bits, 1, 8, integer=True)
        if self.v_bits is not None:
            check_range(self.name, "v_bits", self.v_bits, 1, 8, integer=True)
        check_range(self.name, "group", self.group, 1, 1 << 16, integer=True)
        check_range(self.name, "residual", self.residual, 0, 1 << 24, integer=True)
        if self.residual % self.group:
            raise KVLabError(f"{self.name}: 'residual' ({self.residual}) must be a multiple of 'group' "
                             f"({self.group}) so the fp16 window flushes whole key groups "
                             f"(e.g. residual={max(1, round(self.residual / self.group)) * self.group})")

    @property
    def token_group(self) -> int:
        return self.group

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        if ctx.kind == "k":
            # per channel: groups run along the token axis
            xh, bits = quantize_uniform(x, self.bits, dim=-2, group=self.group)
        else:
            head_dim = x.shape[-1]
            if self.group < head_dim and head_dim % self.group:
                raise KVLabError(f"{self.name}: 'group' ({self.group}) must divide head_dim ({head_dim}) "
                                 f"for per-token value groups; use a divisor of {head_dim}")
            b = self.bits if self.v_bits is None else self.v_bits
            # group >= head_dim: one group per token vector (e.g. the paper's group 32 on a tiny model)
            xh, bits = quantize_uniform(x, b, dim=-1, group=min(self.group, head_dim))
        return Quantized(xh, bits)


preset("kivi-2", "kivi:bits=2,group=32,residual=128")
preset("kivi-4", "kivi:bits=4,group=32,residual=128")
