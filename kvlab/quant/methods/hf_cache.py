"""transformers' QuantizedCache as a comparator (KIVI-style cache with quanto / HQQ / fp8 backends).

The method does not quantize tensors itself: it builds a `transformers.cache_utils.QuantizedCache`
(`replaces_cache = True`, `make_cache(config)`) that is passed as `past_key_values`, and
`accounted_bits(cache)` reads the cache's state afterwards and counts what a packed cache stores:
nbits per quantized element + one fp16 scale and one fp16 zero per group + the fp16 residual tokens
(+ one fp32 scale per tensor for fp8).

How the HF cache behaves (transformers 5.23, `QuantizedLayer.update`):
* the prefill attends to full-precision K/V, and the *whole* prefill is then stored quantized;
* later tokens collect in a full-precision residual; once it holds `residual` tokens everything
  (dequantized old tokens + residual) is re-quantized from scratch, so errors compound;
* quanto: nbits 2 or 4; axis 0 = groups of `group` consecutive values along head_dim (per-token),
  axis -1 = groups of `group` consecutive tokens per channel (per-channel, KIVI keys) — the number of
  [batch x head x token] rows must then be divisible by `group`, or quanto raises;
* HQQ: nbits 1, 2, 3, 4, 8; axis 1 = per-token groups along head_dim; axis 0 groups elements that
  are numel/group apart (unrelated values): kept for completeness, not in the presets;
* fp8: float8_e4m3 with one scale per tensor frozen at the prefill, no residual window (no other
  field applies).

Only meaningful in the prefill-then-decode protocol (the prefill never sees quantized K/V); the
interception core refuses it in fake-quant. `validate` cannot know the protocol.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import KVLabError
from ..base import LayerContext, Method, Quantized, check_choice, check_range
from ..registry import preset, register

BACKENDS = ("quanto", "hqq", "fp8")
_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}
_NBITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8), "fp8": (8,)}
_AXES = {"quanto": (0, -1), "hqq": (0, 1)}
_DEFAULT_AXIS = {"quanto": 0, "hqq": 1}
META_BITS = 16          # each scale and each zero point, counted as fp16


def backend_available(backend: str) -> tuple[bool, str]:
    """(available, reason) for a QuantizedCache backend in this environment."""
    if backend == "fp8":      # transformers' QuantizedCache has no fp8 backend before Fp8QuantizedLayer (5.2 has none)
        from transformers import __version__, cache_utils
        return (True, "") if hasattr(cache_utils, "Fp8QuantizedLayer") else \
            (False, f"the 'fp8' backend needs a transformers with Fp8QuantizedLayer (this is {__version__})")
    module, package = _PACKAGES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return (True, "") if found else (False, f"the '{backend}' backend needs `pip install {package}`")


@register
@dataclass(frozen=True)
class HFQuantizedCache(Method):
    """transformers QuantizedCache(backend, nbits, axis_key, axis_value, q_group_size=group,
    residual_length=residual). axis_key/axis_value None = the backend's per-token axis."""

    name = "hf"
    replaces_cache: ClassVar[bool] = True
    backend: str = "quanto"
    nbits: int | None = None           # None: 4 for quanto/hqq; fp8 is always 8
    axis_key: int | None = None
    axis_value: int | None = None
    group: int = 64
    residual: int = 128

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "backend", self.backend, BACKENDS)
        if self.backend == "fp8":
            if self.nbits is not None:
                check_choice(self.name, "nbits (fp8)", self.nbits, (8,))
            return
        if self.nbits is not None:
            check_choice(self.name, f"nbits ({self.backend})", self.nbits, _NBITS[self.backend])
        for f in ("axis_key", "axis_value"):
            v = getattr(self, f)
            if v is not None:
                check_choice(self.name, f"{f} ({self.backend})", v, _AXES[self.backend])
        check_range(self.name, "group", self.group, 1, 1 << 20, integer=True)

    @property
    def bits(self) -> int:
        """The backend's code width (nbits, default 4; 8 for fp8)."""
        return 8 if self.backend == "fp8" else (4 if self.nbits is None else self.nbits)

    # --- the cache ---------------------------------------------------------------------------------
    def make_cache(self, config):
        """A fresh `QuantizedCache` for one sequence (raises KVLabError if the backend is missing)."""
        from transformers.cache_utils import QuantizedCache

        ok, why = backend_available(self.backend)
        if not ok:
            raise KVLabError(f"hf: {why}")
        sliding = sliding_layers(config)
        if sliding:
            raise KVLabError(f"hf: transformers' QuantizedCache supports only models whose every layer is full "
                             f"attention; this model has sliding-window layers {sliding}. Compare kvlab's methods "
                             "on it, or the HF comparators on a full-attention model")
        if self.backend == "fp8":
            return QuantizedCache("fp8", config=config)
        ax = _DEFAULT_AXIS[self.backend]
        return QuantizedCache(self.backend, config=config, nbits=self.bits,
                              axis_key=ax if self.axis_key is None else self.axis_key,
                              axis_value=ax if self.axis_value is None else self.axis_value,
                              q_group_size=self.group, residual_length=self.residual)

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        raise KVLabError("hf: this method replaces the whole cache (make_cache); run it with kvlab.evaluate "
                         "in the prefill-decode protocol")

    # --- accounting --------------------------------------------------------------------------------
    def accounted_bits(self, cache) -> dict:
        """Bits a packed cache needs for the cache's current state, summed over layers.

        Every value is additive (sum the dicts of several sequences, then divide):
        {"k_bits", "v_bits", "k_elems", "v_elems", "packed_bytes", "measured_bytes"}.
        `measured_bytes` is what the backend's tensors actually occupy (codes, scales and zeros in
        their own dtypes, residual in the model dtype). Per layer: `accounted_layers(cache)`.
        """
        return self.totals(self.accounted_layers(cache))

    @staticmethod
    def totals(rows: list[dict]) -> dict:
        """`accounted_bits` from per-layer rows (`accounted_layers`), without reading the cache again."""
        tot = {k: sum(r[k] for r in rows) for k in ("k_bits", "v_bits", "k_elems", "v_elems", "measured_bytes")}
        tot["packed_bytes"] = (tot["k_bits"] + tot["v_bits"]) / 8.0
        return tot

    @staticmethod
    def average_bits(records: list[dict]) -> dict:
        """Bits per element over several `accounted_bits` records (sequences): avg_bits_k, avg_bits_v, avg_bits."""
        tot = {k: sum(r[k] for r in records) for k in ("k_bits", "v_bits", "k_elems", "v_elems")}
        return {"avg_bits_k": tot["k_bits"] / tot["k_elems"], "avg_bits_v": tot["v_bits"] / tot["v_elems"],
                "avg_bits": (tot["k_bits"] + tot["v_bits"]) / (tot["k_elems"] + tot["v_elems"])}

    def accounted_layers(self, cache) -> list[dict]:
        """Per layer: {"layer", "k_bits", "v_bits", "k_elems", "v_elems", "measured_bytes"}."""
        rows = []
        for i, layer in enumerate(cache.layers):
            row = {"layer": i, "measured_bytes": 0}
            for kind, q, fp in (("k", getattr(layer, "_quantized_keys", None), getattr(layer, "keys", None)),
                                ("v", getattr(layer, "_quantized_values", None), getattr(layer, "values", None))):
                bits, elems, measured = self._quantized_part(q)
                if fp is not None and torch.is_tensor(fp) and fp.dim() == 4 and self.backend != "fp8":
                    bits += 16.0 * fp.numel()
                    elems += fp.numel()
                    measured += fp.numel() * fp.element_size()
                row[f"{kind}_bits"], row[f"{kind}_elems"] = bits, elems
                row["measured_bytes"] += measured
            rows.append(row)
        return rows

    def resident_parts(self, cache) -> dict[str, int]:
        """Bytes the cache holds now: "packed" (the backend's quantized storage, as `_quantized_part` measures
        it) and "fp" (the residual keys / values in the model's dtype)."""
        out = {"packed": 0, "fp": 0}
        for layer in cache.layers:
            for q, fp in ((getattr(layer, "_quantized_keys", None), getattr(layer, "keys", None)),
                          (getattr(layer, "_quantized_values", None), getattr(layer, "values", None))):
                out["packed"] += self._quantized_part(q)[2]
                if torch.is_tensor(fp) and fp.dim() == 4:
                    out["fp"] += fp.numel() * fp.element_size()
        return out

    def _quantized_part(self, q) -> tuple[float, int, int]:
        """(accounted bits, elements, measured bytes) of one backend's quantized storage."""
        if q is None:
            return 0.0, 0, 0
        if self.backend == "fp8":
            data, scale = q
            return 8.0 * data.numel() + 32.0, data.numel(), _storage_bytes(data) + _storage_bytes(scale)
        if self.backend == "hqq":
            data, meta = q
            n = int(torch.Size(meta["shape"]).numel())
            groups = meta["scale"].numel() + meta["zero"].numel()
            measured = _storage_bytes(data) + _storage_bytes(meta["scale"]) + _storage_bytes(meta["zero"])
            return float(self.bits * n + META_BITS * groups), n, measured
        # quanto: a WeightQBitsTensor with _data (packed codes), _scale and _shift
        n = q.numel()
        groups = q._scale.numel() + q._shift.numel()
        return float(self.bits * n + META_BITS * groups), n, _storage_bytes(q)


def sliding_layers(config) -> list[int]:
    """Indices of the sliding-window layers in a (text) config (transformers' `layer_types`)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:   # the rule QuantizedCache itself applies (a config with `sliding_window` and no layer_types counts)
        from transformers.cache_utils import get_layer_types_and_kwargs
        types = get_layer_types_and_kwargs(cfg)[0]
    except ImportError:  # pragma: no cover - older transformers
        types = getattr(cfg, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t != "full_attention"]


def _storage_bytes(t) -> int:
    """Bytes a tensor (or a tensor subclass made of inner tensors, like quanto's) occupies."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n)) for n in names)
    return int(t.numel() * t.element_size())


for _nb in (4, 2):
    preset(f"hf-quanto-int{_nb}", f"hf:backend=quanto,nbits={_nb}")
    preset(f"hf-quanto-int{_nb}-kchannel", f"hf:backend=quanto,nbits={_nb},axis_key=-1")
    preset(f"hf-hqq-int{_nb}", f"hf:backend=hqq,nbits={_nb}")
preset("hf-fp8", "hf:backend=fp8")
