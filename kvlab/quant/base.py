"""The method interface every quantizer and eviction method implements (kvpress-style).

A method is a frozen dataclass (its fields are its config) with one job: turn a whole
`[batch, kv_heads, tokens, head_dim]` tensor of one layer's keys or values into what the cache
stores, reported as a `Quantized` (dequantized tensor + exact bits + optional keep mask).
The interception core (`kvlab.hooks`) decides *which* tokens a method sees:

* the first `sink` tokens and (in the prefill-then-decode protocol) the most recent `residual`
  tokens stay full precision and are accounted at 16 bits by the core, never by the method;
* tokens are handed over in multiples of `token_group` (per-channel groups along tokens);
* `scope = "cache"` methods see every layer at once (`quantize_cache`), after the prefill;
* `needs_attention` methods get `LayerContext.attention` (attention received per key token);
* `key_site = "pre_rope"` methods see keys before the rotary embedding (KVQuant).

Methods never call `.item()` / `.cpu()`: bits are returned as device tensors and summed once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..errors import KVLabError

Kind = Literal["k", "v"]


@dataclass
class AttentionStats:
    """Attention statistics of one layer from the full-precision prefill, per KV head.

    received_sum:  [b, kv_heads, T]  attention each key token received, summed over queries
                   and over the query heads of its GQA group (H2O's accumulated attention).
    received_max:  [b, kv_heads, T]  largest attention the key token received from any of the
                   last `n_recent` queries and any query head of its group (QAQ's a_max).
    query_norm:    [b, kv_heads]     largest L2 norm of a (post-RoPE) query of the group.
    """

    received_sum: torch.Tensor
    received_max: torch.Tensor
    query_norm: torch.Tensor
    n_recent: int


@dataclass
class LayerContext:
    """What a method may know besides the tensor: where it is and what the prefill looked like."""

    layer: int
    num_layers: int
    kind: Kind
    start: int = 0                      # index (in the layer's stored tokens) of the first token handed over
    attention: AttentionStats | None = None
    total_tokens: int | None = None     # tokens the layer holds after this update


@dataclass
class Quantized:
    """A method's answer for one tensor.

    x:     dequantized values, same shape and dtype as the input (what attention will read).
    bits:  total bits a packed cache needs for this tensor (codes + scales/zeros + outliers +
           indices), a 0-d tensor on the input's device.
    keep:  optional bool mask [b, kv_heads, tokens]; False = evicted (attention never sees it,
           and it costs no bits).
    info:  optional tensors for plots (e.g. per-token bits), never needed by the core.
    """

    x: torch.Tensor
    bits: torch.Tensor
    keep: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """Base class of every kvlab method. Subclasses are frozen dataclasses registered by name."""

    name: ClassVar[str] = "base"
    needs_attention: ClassVar[bool] = False
    scope: ClassVar[Literal["layer", "cache"]] = "layer"
    key_site: ClassVar[Literal["post_rope", "pre_rope"]] = "post_rope"
    # attention stats: how many of the last queries `received_max` looks at
    n_recent: ClassVar[int] = 1
    # progressive methods (PM-KVQ): at every flush the core hands over the *whole* quantized
    # region (already-stored dequantized tokens + the new chunk) and replaces it and its bits.
    rewrites_stored: ClassVar[bool] = False
    # methods fitted on calibration data implement `calibrate(model, input_ids)` (may be a property)
    needs_calibration: ClassVar[bool] = False
    # fields shown in the spec string even at their default (readability: "int:bits=4", not "int")
    spec_always: ClassVar[tuple[str, ...]] = ("bits",)

    # --- the per-tensor rule (scope == "layer") -----------------------------------------------
    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        raise NotImplementedError(f"{type(self).__name__} does not quantize layer by layer")

    # --- the whole-cache rule (scope == "cache") ----------------------------------------------
    def quantize_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                       ctxs: list[LayerContext]) -> tuple[list[Quantized], list[Quantized]]:
        raise NotImplementedError(f"{type(self).__name__} does not quantize the whole cache")

    # --- token bookkeeping read by the core (dataclass fields may override) --------------------
    @property
    def sink_tokens(self) -> int:
        return int(getattr(self, "sink", 0))

    @property
    def residual_tokens(self) -> int:
        return int(getattr(self, "residual", 0))

    @property
    def token_group(self) -> int:
        return 1

    # --- config ---------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise KVLabError naming the field and the allowed values; subclasses extend."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("sink", "residual") and (not isinstance(v, int) or v < 0):
                raise KVLabError(f"{self.name}: '{f.name}' must be an integer >= 0, got {v!r}")

    @property
    def spec(self) -> str:
        """Short string that round-trips through `kvlab.quant.parse` (only non-default fields)."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default and f.name not in self.spec_always:
                continue
            parts.append(f"{f.name}={_fmt(v)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.spec


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def check_choice(method: str, field_name: str, value, allowed) -> None:
    if value not in allowed:
        raise KVLabError(f"{method}: '{field_name}' must be one of {sorted(allowed, key=str)}, got {value!r}")


def check_range(method: str, field_name: str, value, lo, hi, *, lo_open=False, hi_open=False, integer=False) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else isinstance(value, (int, float))
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        kind = "an integer" if integer else "a number"
        raise KVLabError(f"{method}: '{field_name}' must be {kind} in {lb}{lo}, {hi}{rb}, got {value!r}")
