"""KIVI: tuning-free asymmetric low-bit KV-cache quantization.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024).
Sec. 3 (observations) and Sec. 3.3 / Algorithm 1:

* keys are quantized **per channel**: one asymmetric min-max scale and zero point per channel
  over a group of `group` consecutive tokens (keys have fixed outlier channels, so grouping along
  tokens keeps those channels' range to themselves);
* values are quantized **per token**: groups of `group` elements along head_dim (value errors
  mix across channels through the attention weights, so per-token error is what matters);
* quantization is asymmetric round-to-nearest, levels mn + k * (mx - mn) / (2^b - 1) (Eq. 1);
* the most recent tokens stay fp16 (`residual` R = 128 in the paper); when they are quantized is the
  `flush` rule (prefill-decode and decode protocols; `fake` has no window: every token is quantized).
  The interception core keeps the fp16 tokens and accounts them at 16 bits; this method only sees
  the tokens to quantize, keys in whole groups of `group` tokens (a ragged last group in the
  fake-quant protocol is padded by the primitive, and counted only for its real tokens).
  Value groups must divide head_dim; a `group` >= head_dim makes one group per token vector.

The flush rule, `flush` (`flush_count`):

* "authors" (default): the authors' code keeps separate fp buffers for keys and values
  (github.com/jy-yuan/KIVI, commit 876b4d2, `models/llama_kivi.py`, `LlamaAttention_KIVI.forward`;
  `LlamaFlashAttention_KIVI.forward` repeats it at lines 343-344, 386-387, 425-449):
  - keys: the prefill's first T - T % R keys are quantized, the last T % R stay fp (lines 193-208);
    each decoded key joins the fp key buffer, the attention reads it (121-129), and once the buffer
    holds R keys the whole buffer is quantized and emptied (131-144; asserts R % group == 0, 132).
    So a flush quantizes floor(pending_k / R) * R keys: between 0 and R-1 keys stay fp.
  - values: the prefill's values but the last R are quantized when T > R (210-220); each decoded
    value joins the fp buffer, the attention reads R + 1 fp values (165-172), then the oldest is
    quantized so R remain (174-187). So a flush quantizes max(0, pending_v - R) values, per token.
  kvlab flushes in `store`, before the next call's attention: the same cache as the authors' flush
  after the previous call's attention. Their code divides by R; with `residual=0` kvlab quantizes
  keys as soon as a whole group is pending and values at once.
* "sliding": kvlab's earlier rule, for both K and V: whole groups of `group` once more than R are
  pending, so R .. R + group - 1 tokens stay fp (`Method.flush_count`'s default).

The authors' rule holds 0 .. R-1 fp keys (about R/2 on average over decode steps) and R fp values,
sliding R .. R+group-1 of each, so its average bits are lower. E.g. a 512-token prefill scored in
prefill-decode, R = 128, KIVI-2 (3 bits per element with metadata): authors quantize all 512 keys
(512 % 128 == 0) and 384 values, (3 + (384*3 + 128*16)/512) / 2 = 4.625 bits, sliding 384 of each,
6.25 bits. The spec always names the rule (`kivi:bits=2,flush=authors`), so results stored under
the earlier spec (`kivi:bits=2`, sliding) keep their own key.

Bits (codes + metadata): b per element + fp16 scale + fp16 zero point per group, i.e. for
head_dim D, T tokens: keys b*T*D + 32 * D * ceil(T/group), values b*T*D + 32 * T * D/group
(per batch and head). KIVI-2 with group 32 is 2 + 1 bits per element for both K and V.
LongChat-7B LongBench: fp16 38.72, KIVI-2 38.30, KIVI-4 38.79 (paper Table 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import KVLabError
from ..base import Kind, LayerContext, Method, Quantized, check_choice, check_range
from ..primitives import quantize_uniform
from ..registry import preset, register


FLUSH_RULES = ("authors", "sliding")


@register
@dataclass(frozen=True)
class KIVI(Method):
    """KIVI: keys per channel (groups of `group` tokens), values per token (groups of `group`
    along head_dim), asymmetric `bits`-bit, the recent tokens fp16 (kept by the core) as `flush`
    says: "authors" (separate key and value buffers, the authors' code) or "sliding" (kvlab's
    earlier whole-group window for both)."""

    name = "kivi"
    bits: int = 2
    v_bits: int | None = None        # value bits; default: same as `bits` (the paper uses one b)
    group: int = 32
    residual: int = 128
    flush: str = "authors"           # "authors" | "sliding": when the fp16 tokens are quantized
    spec_always = ("bits", "flush")

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "bits", self.bits, 1, 8, integer=True)
        if self.v_bits is not None:
            check_range(self.name, "v_bits", self.v_bits, 1, 8, integer=True)
        check_range(self.name, "group", self.group, 1, 1 << 16, integer=True)
        check_range(self.name, "residual", self.residual, 0, 1 << 24, integer=True)
        check_choice(self.name, "flush", self.flush, FLUSH_RULES)
        if self.residual % self.group:
            raise KVLabError(f"{self.name}: 'residual' ({self.residual}) must be a multiple of 'group' "
                             f"({self.group}) so the fp16 key buffer flushes whole key groups, under either "
                             f"flush rule (the authors' code asserts it too) "
                             f"(e.g. residual={max(1, round(self.residual / self.group)) * self.group})")

    @property
    def token_group(self) -> int:
        return self.group

    def flush_count(self, kind: Kind, pending: int, stored: int) -> int:
        """Tokens of `kind` to quantize now out of `pending` fp ones (see the module docstring).

        "authors": keys floor(pending / R) * R (the whole key buffer once it holds R keys), values
        max(0, pending - R) (all but the R most recent); "sliding": the default whole groups."""
        if self.flush == "sliding":
            return super().flush_count(kind, pending, stored)
        R = self.residual
        if kind == "k":
            step = R if R > 0 else self.group           # R = 0: every whole group at once
            return (pending // step) * step
        return max(0, pending - R)

    def plan(self, kind: str, head_dim: int) -> tuple[int, int, int]:
        """(bits, axis, group) of `kind`'s uniform quantizer: keys per channel (groups along the token
        axis), values per token (groups along head_dim; group >= head_dim makes one group per token
        vector, e.g. the paper's group 32 on a tiny model). `kvlab.pack` reads the same plan."""
        if kind == "k":
            return self.bits, -2, self.group
        if self.group < head_dim and head_dim % self.group:
            raise KVLabError(f"{self.name}: 'group' ({self.group}) must divide head_dim ({head_dim}) "
                             f"for per-token value groups; use a divisor of {head_dim}")
        return (self.bits if self.v_bits is None else self.v_bits), -1, min(self.group, head_dim)

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        bits, dim, group = self.plan(ctx.kind, x.shape[-1])
        xh, total = quantize_uniform(x, bits, dim=dim, group=group)
        return Quantized(xh, total)


preset("kivi-2", "kivi:bits=2,group=32,residual=128")
preset("kivi-4", "kivi:bits=4,group=32,residual=128")
