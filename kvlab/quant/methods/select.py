"""`select`: apply an inner method to chosen layers and to K, V or both; everything else stays fp16.

The building block of per-layer sensitivity studies (notebooks/02_sensitivity): quantize layer 7's
keys at 2 bits with every other tensor at full precision, and measure what that one choice costs.

Spec strings (they must survive `kvlab.quant.parse`, which splits fields on commas):

    select:inner=int:bits=2,layers=7,kind=k
    select:inner=kvquant:bits=3;outliers=0.01,layers=0+4+8,kind=kv
    select:inner=kivi-2,layers=all,kind=v

* `inner`:  the inner method's spec or preset, with its commas written as ';' (the registry
  parser splits on ','; the inner spec's own ':' and '=' are fine). Stored canonically: the
  inner method's own `spec` with ';' for ',' (so presets expand: `int2` -> `int:bits=2`).
  Use `select_spec(inner, layers, kind)` to build one from a normal inner spec.
* `layers`: layer indices joined by '+' ("3+7"), ranges allowed ("0-3+10" = 0,1,2,3,10), or "all".
  Stored sorted and expanded ("0+1+2+3+10").
* `kind`:   "k", "v" or "kv".

The wrapper declares what the core needs exactly as its inner method does (`needs_attention`,
`scope`, `key_site`, `token_group`, `flush_count`, `sink`, `residual`, `n_recent`, `rewrites_stored`,
`needs_calibration` + `calibration_needs` / `fit`), so the inner method runs under the same conditions as it would
alone; tensors of unselected layers/kinds are returned untouched and accounted at 16 bits. The
core's sink and residual windows apply to every layer (they are full precision either way).
HF QuantizedCache comparators (`replaces_cache`) cannot be restricted to layers and are refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from ...errors import KVLabError
from ..base import LayerContext, Method, Quantized, check_choice
from ..primitives import fp16_bits
from ..registry import parse, register

KINDS = ("k", "v", "kv")


def _encode_inner(spec: str) -> str:
    return spec.replace(",", ";")


def _decode_inner(spec: str) -> str:
    return spec.replace(";", ",")


def parse_layers(layers: str | int | Iterable[int] | None) -> tuple[int, ...] | None:
    """'3+7' / '0-3+10' / 5 / [3, 7] -> sorted unique indices; 'all' or None -> None (every layer)."""
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise KVLabError(f"select: 'layers' must be layer indices joined by '+' or 'all', got {layers!r}")
    if isinstance(layers, int):
        items = [layers]
    elif isinstance(layers, str):
        s = layers.strip().lower()
        if s in ("all", "*", ""):
            return None
        items = []
        for part in s.split("+"):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise KVLabError(f"select: 'layers' must be indices or ranges joined by '+' (e.g. 3+7 or 0-3+10) "
                                 f"or 'all', got {layers!r}")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise KVLabError(f"select: layer range '{part}' runs backwards; write {hi}-{lo}")
            items.extend(range(lo, hi + 1))
    else:
        try:
            items = [int(i) for i in layers]
        except (TypeError, ValueError):
            raise KVLabError(f"select: 'layers' must be indices joined by '+', a list of ints or 'all', "
                             f"got {layers!r}") from None
    if any(i < 0 for i in items):
        raise KVLabError(f"select: layer indices must be >= 0, got {sorted(items)}")
    if not items:
        raise KVLabError("select: 'layers' is empty; give at least one layer index or 'all'")
    return tuple(sorted(set(items)))


def select_spec(inner: str | Method, layers: str | int | Iterable[int] | None = "all", kind: str = "kv") -> str:
    """The spec string of `Select` for a normal inner spec (commas allowed) and a layer list."""
    return Select(inner=inner.spec if isinstance(inner, Method) else inner, layers=layers, kind=kind).spec


@register
@dataclass(frozen=True)
class Select(Method):
    """Apply `inner` to the layers in `layers` and the tensors in `kind`; the rest stays fp16."""

    name = "select"
    inner: str = "int4"
    layers: str = "all"
    kind: str = "kv"
    spec_always = ("inner", "layers", "kind")

    def __post_init__(self) -> None:
        if not isinstance(self.inner, str) or not self.inner.strip():
            raise KVLabError(f"select: 'inner' must be a method spec string, got {self.inner!r}")
        try:
            inner = parse(_decode_inner(self.inner))
        except KVLabError as e:
            raise KVLabError(f"select: invalid inner method '{_decode_inner(self.inner)}' (write its commas as "
                             f"';' inside a select spec): {e}") from None
        if isinstance(inner, Select):
            raise KVLabError("select: 'inner' may not itself be a select method; give the layer union instead")
        if getattr(inner, "replaces_cache", False):
            raise KVLabError(f"select: inner method '{inner.spec}' replaces the whole cache (HF QuantizedCache) and "
                             "cannot be restricted to layers or to K/V")
        sel = parse_layers(self.layers)
        if self.state is not None:          # a calibrated select passes its inner method's fit down
            inner = inner.with_state(self.state)
        object.__setattr__(self, "inner", _encode_inner(inner.spec))
        object.__setattr__(self, "layers", "all" if sel is None else "+".join(map(str, sel)))
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_sel", None if sel is None else frozenset(sel))
        self.validate()

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "kind", self.kind, KINDS)

    # --- the inner method and what the core reads from it ------------------------------------------
    @property
    def inner_method(self) -> Method:
        return self._inner

    @property
    def selected_layers(self) -> frozenset[int] | None:
        """The selected layer indices, or None for every layer."""
        return self._sel

    def selects(self, layer: int, kind: str) -> bool:
        return kind in self.kind and (self._sel is None or layer in self._sel)

    @property
    def needs_attention(self) -> bool:
        return self._inner.needs_attention

    @property
    def scope(self) -> str:
        return self._inner.scope

    @property
    def key_site(self) -> str:
        return self._inner.key_site

    @property
    def n_recent(self) -> int:
        return self._inner.n_recent

    @property
    def rewrites_stored(self) -> bool:
        return self._inner.rewrites_stored

    @property
    def needs_calibration(self) -> bool:
        return bool(getattr(self._inner, "needs_calibration", False))

    @property
    def sink(self) -> int:
        return self._inner.sink_tokens

    @property
    def residual(self) -> int:
        return self._inner.residual_tokens

    @property
    def sink_tokens(self) -> int:
        return self._inner.sink_tokens

    @property
    def residual_tokens(self) -> int:
        return self._inner.residual_tokens

    @property
    def token_group(self) -> int:
        return self._inner.token_group

    def flush_count(self, kind, pending: int, stored: int) -> int:
        """The inner method's flush rule (KIVI's authors' rule included), for every layer and kind."""
        return self._inner.flush_count(kind, pending, stored)

    def calibration_needs(self, calib_tokens: int):
        """The inner method's (all layers: calibration is shared per inner config)."""
        return self._inner.calibration_needs(calib_tokens)

    def calibration_key(self) -> dict:
        return self._inner.calibration_key()

    def fit(self, captured):
        return self._inner.fit(captured)

    # --- the rules ------------------------------------------------------------------------------
    def _check_layers(self, num_layers: int) -> None:
        if self._sel is not None and max(self._sel) >= num_layers:
            raise KVLabError(f"select: layer(s) {sorted(i for i in self._sel if i >= num_layers)} do not exist; "
                             f"the model has {num_layers} layers (0-{num_layers - 1})")

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        self._check_layers(ctx.num_layers)
        if not self.selects(ctx.layer, ctx.kind):
            return Quantized(x, fp16_bits(x))
        return self._inner.quantize(x, ctx)

    def quantize_cache(self, keys, values, ctxs):
        """Whole-cache inner methods decide over every layer; only the selected layers/kinds keep the result."""
        if ctxs:
            self._check_layers(ctxs[0].num_layers)
        qks, qvs = self._inner.quantize_cache(keys, values, ctxs)
        out_k, out_v = [], []
        for k, v, qk, qv, ctx in zip(keys, values, qks, qvs, ctxs):
            out_k.append(qk if self.selects(ctx.layer, "k") else Quantized(k, fp16_bits(k)))
            out_v.append(qv if self.selects(ctx.layer, "v") else Quantized(v, fp16_bits(v)))
        return out_k, out_v
