"""The method interface every quantizer and eviction method implements (kvpress-style).

A method is a frozen dataclass (its fields are its config) with one job: turn a whole
`[batch, kv_heads, tokens, head_dim]` tensor of one layer's keys or values into what the cache
stores, reported as a `Quantized` (dequantized tensor + exact bits + optional keep mask).
The interception core (`kvlab.hooks`) decides *which* tokens a method sees:

* the first `sink` tokens and (in the prefill-then-decode protocol) the most recent `residual`
  tokens stay full precision and are accounted at 16 bits by the core, never by the method;
* tokens are handed over in multiples of `token_group` (per-channel groups along tokens); in
  prefill-decode, `flush_count(kind, pending, stored)` says how many per layer and kind (default:
  the whole groups that left the residual window; KIVI's authors' rule differs for K and V);
* `scope = "cache"` methods see every layer at once (`quantize_cache`), after the prefill;
* `needs_attention` methods get `LayerContext.attention` (attention received per key token);
* `key_site = "pre_rope"` methods see keys before the rotary embedding (KVQuant).

Methods fitted on calibration data (`needs_calibration`) declare what to capture
(`calibration_needs() -> CalibrationNeeds`) and turn the capture into tensors (`fit(Captured)`);
`kvlab.calibrate` runs the model, caches the fit on disk and returns `method.with_state(state)`, a
new instance whose `state` (a `FittedState`) the method reads. Methods never run the model
themselves and never import the core.

Methods never call `.item()` / `.cpu()`: bits are returned as device tensors and summed once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch

from ..errors import KVLabError

Kind = Literal["k", "v"]


@dataclass
class AttentionStats:
    """Attention statistics of one layer from the full-precision prefill, per KV head.

    received_sum:  [b, kv_heads, T]  attention each key token received, summed over queries
                   and over the query heads of its GQA group (H2O's accumulated attention).
    received_max:  [b, kv_heads, T]  largest attention the key token received from any of the
                   last `n_recent` queries of the sequence (across calls) and any query head of its
                   group (QAQ's a_max over its attention window).
    query_norm:    [b, kv_heads]     largest L2 norm of a (post-RoPE) query of the group.
    recent:        [b, kv_heads, r, T] the attention of each of those last r <= n_recent queries
                   (oldest first; heads of the group folded by max), or None; `received_max` is its
                   max over r.
    """

    received_sum: torch.Tensor
    received_max: torch.Tensor
    query_norm: torch.Tensor
    n_recent: int
    recent: torch.Tensor | None = None


@dataclass
class LayerContext:
    """What a method may know besides the tensor: where it is and what the prefill looked like."""

    layer: int
    num_layers: int
    kind: Kind
    start: int = 0                      # index (in the layer's stored tokens) of the first token handed over
    attention: AttentionStats | None = None
    total_tokens: int | None = None     # tokens the layer holds after this update
    # the `Quantized.info` this method returned for the same layer and kind at its previous call in
    # this sequence ({} at the first call), in the protocols that flush stored tokens later
    # (prefill-decode, decode); None where every chunk is quantized once as it enters (fake).
    # Progressive methods (PM-KVQ) read their current width from it.
    previous: dict | None = None


@dataclass(frozen=True)
class CalibrationNeeds:
    """What a method's calibration captures; `kvlab.calibrate` runs one capture per distinct needs.

    what:            per-layer tensors, each [n, kv_heads, T, head_dim]: "k_pre" (keys before RoPE),
                     "k" (post-RoPE keys), "v", and "q" (post-RoPE queries, [n, heads, T, head_dim])
    grads:           also dL/dX for each captured X (L: next-token cross-entropy; weights get no grad)
    loss:            "row_sum": each row alone, L = its summed cross-entropy (KVQuant's Fisher pass);
                     "mean": all rows in one batch, L = the mean cross-entropy (PM-KVQ's sensitivity)
    position_stride: RoPE positions 0, s, 2s, ... (positional interpolation, PM-KVQ's effective_len)
    to_cpu:          move captured tensors to the CPU as float32 (large captures), else keep them
                     on the model's device in its dtype
    """

    what: tuple[str, ...]
    grads: bool = False
    loss: Literal["row_sum", "mean"] = "row_sum"
    position_stride: int = 1
    to_cpu: bool = True

    def __post_init__(self):
        bad = [w for w in self.what if w not in ("k_pre", "k", "v", "q")]
        if bad or not self.what:
            raise KVLabError(f"CalibrationNeeds.what must name some of 'k_pre', 'k', 'v', 'q'; got {self.what!r}")
        if self.loss not in ("row_sum", "mean"):
            raise KVLabError(f"CalibrationNeeds.loss must be 'row_sum' or 'mean', got {self.loss!r}")


@dataclass
class Captured:
    """What `kvlab.calibrate` captured for a `CalibrationNeeds`: per name, one tensor per layer
    [n, kv_heads, T, head_dim], and (when `grads`) dL/dX of the same shapes under `grads[name]`."""

    tensors: dict[str, list[torch.Tensor]]
    grads: dict[str, list[torch.Tensor]] | None = None


class FittedState:
    """Tensors a method learned at calibration (kept on the CPU), with per-device copies made once.

    Immutable once built: `derived(name, fn)` memoises a value computed from the tensors (e.g. an
    allocation), so a fitted method never needs to write to itself."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self._on: dict[Any, dict[str, torch.Tensor]] = {}
        self._derived: dict[str, Any] = {}

    def on(self, device) -> dict[str, torch.Tensor]:
        """The tensors on `device` (copied on first use)."""
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self.tensors.items()}
        return self._on[device]

    def derived(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self._derived:
            self._derived[name] = compute()
        return self._derived[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def keys(self):
        return self.tensors.keys()

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"FittedState({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self.tensors.items())})"


@dataclass
class Quantized:
    """A method's answer for one tensor.

    x:     dequantized values, same shape and dtype as the input (what attention will read).
    bits:  total bits a packed cache needs for this tensor (codes + scales/zeros + outliers +
           indices), a 0-d tensor on the input's device.
    keep:  optional bool mask [b, kv_heads, tokens]; False = evicted (attention never sees it,
           and it costs no bits).
    info:  optional values for reports and plots, never read by the core (the session keeps the
           latest per layer and tensor as `run.info[layer]["k" | "v"]`). The keys `kvlab.bitmaps`
           reads, by convention:
             "bits":          the code width of this call, an int (PM-KVQ's current width);
             "bits_k"/"bits_v": per-token-and-head widths, a tensor [batch, kv_heads, tokens] (QAQ);
           method-specific extras are free (PM-KVQ: "over_budget", "budget_bits").
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
    # methods fitted on calibration data implement `calibration_needs` and `fit` (may be a property)
    needs_calibration: ClassVar[bool] = False
    # fields shown in the spec string even at their default (readability: "int:bits=4", not "int")
    spec_always: ClassVar[tuple[str, ...]] = ("bits",)
    # calibration result (`kvlab.calibrate` sets it through `with_state`); not part of the config:
    # excluded from the spec string, equality and hashing
    state: FittedState | None = field(default=None, kw_only=True, compare=False, repr=False,
                                      metadata={"spec": False})

    # --- the per-tensor rule (scope == "layer") -----------------------------------------------
    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        raise NotImplementedError(f"{type(self).__name__} does not quantize layer by layer")

    # --- the whole-cache rule (scope == "cache") ----------------------------------------------
    def quantize_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                       ctxs: list[LayerContext]) -> tuple[list[Quantized], list[Quantized]]:
        raise NotImplementedError(f"{type(self).__name__} does not quantize the whole cache")

    # --- the authors' eviction of scope == "cache" methods (H2O, Q-Hitter) ----------------------
    @property
    def per_step(self) -> bool:
        """True: the prefill-decode / decode policies call `step_cache` for each layer at every flush
        (a cache re-decided after every call) instead of `quantize_cache` once after the prefill."""
        return False

    @property
    def per_query(self) -> bool:
        """True: the fake protocol stores each chunk through `store_tokens` and masks keys per query
        with `query_keep` (a teacher-forced simulation of the per-step rule) instead of one keep set
        from `quantize_cache` for every query."""
        return False

    def step_cache(self, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext, keep: torch.Tensor | None,
                   new: int, state: dict) -> tuple[Quantized, Quantized]:
        """One flush of a `per_step` method on one layer's span of stored tokens k, v [b, kvh, n, d].

        The last `new` tokens entered the span since the previous flush (full precision); the others
        are stored as this method left them. `keep` [b, kvh, n] is the current keep mask (None = all
        kept; an evicted token must stay evicted), `ctx.attention` the attention each token received
        so far (accumulated over every call, evicted tokens masked), `state` a dict the policy keeps
        per layer and sequence for the method. Returns per K and V a `Quantized` whose `x` is the
        stored form of the `new` tokens only [b, kvh, new, d], `keep` the mask of the whole span and
        `bits` the bits of the whole span as it now stands (kept tokens only)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-step cache rule")

    def store_tokens(self, k: torch.Tensor, v: torch.Tensor, state: dict) -> tuple[Quantized, Quantized]:
        """`per_query` methods, fake protocol: the stored form of a chunk entering the cache (bits of
        all its tokens, none evicted yet); `state` is the layer's dict for `query_keep`."""
        raise NotImplementedError(f"{type(self).__name__} has no per-query simulation")

    def query_keep(self, logits: torch.Tensor, n_groups: int, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_query` methods, fake protocol: from one call's fp32 attention logits [b, heads, q, kv]
        (-inf where the model forbids a key) the per-query keep mask [b, kvh, q, kv] and the keep set
        of the cache as it stands after the last query [b, kvh, kv] (what the bits count)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-query simulation")

    # --- methods that bring their own cache (`replaces_cache`) may also act on the model ---------
    def attach(self, model: torch.nn.Module) -> Callable[[], None] | None:
        """Called when a kvlab block opens on `model` (a kvpress press enters `with press(model):`);
        returns the function the block calls when it closes, or None when there is nothing to undo."""
        return None

    # --- calibration (needs_calibration) -------------------------------------------------------
    def calibration_needs(self, calib_tokens: int) -> CalibrationNeeds | None:
        """What to capture for `fit` from rows of `calib_tokens` tokens (None: no calibration needed)."""
        return None

    def calibration_key(self) -> dict:
        """The config fields that change the fit (with the capture, the key of the disk cache)."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in config_fields(self)}}

    def fit(self, captured: Captured) -> dict[str, torch.Tensor]:
        """Turn a capture into the tensors this method reads at quantization time (pure, cacheable)."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to fit")

    def with_state(self, state: FittedState | Mapping[str, torch.Tensor]) -> "Method":
        """A copy of this method carrying a calibration result."""
        return dataclasses.replace(self, state=state if isinstance(state, FittedState) else FittedState(state))

    def fitted(self) -> FittedState:
        """The calibration result; a KVLabError says how to get one when there is none."""
        if self.state is None:
            raise KVLabError(f"{self.spec}: this configuration needs calibration; use "
                             f"`kvlab.calibrate(lm, {self.spec!r})` (kvlab.evaluate and the tasks do it for you)")
        return self.state

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

    def flush_count(self, kind: Kind, pending: int, stored: int) -> int:
        """How many of a layer's `pending` fp tokens of `kind` the prefill-decode protocols quantize now.

        Called before each call stores its tokens, per layer and kind ("k", "v"): `pending` counts the
        trailing stored tokens of that kind not yet quantized (after the sink; the latest call's tokens
        included), `stored` the tokens the layer stores. The oldest `n` of them are handed to `quantize`
        (0 = none now); keys and values may differ (KIVI's authors' rule). Default: every whole
        `token_group` that left the `residual` window, the same for K and V."""
        group = self.token_group
        return max(0, ((pending - self.residual_tokens) // group) * group)

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
        for f in config_fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default and f.name not in self.spec_always:
                continue
            parts.append(f"{f.name}={_fmt(v)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.spec


def config_fields(method_or_class) -> list[dataclasses.Field]:
    """The dataclass fields that make up a method's config (spec string), i.e. all but `state`."""
    return [f for f in dataclasses.fields(method_or_class) if f.metadata.get("spec", True)]


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
