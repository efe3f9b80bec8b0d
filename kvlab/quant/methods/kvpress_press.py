"""NVIDIA kvpress presses as comparators: StreamingLLM, SnapKV, ExpectedAttention and Knorm evict tokens.

`kvpress:press=snapkv,ratio=0.5` (presets `kvpress-<press>-<25|50|75>`, the ratio evicted) runs a kvpress
0.5.5 press through `kvlab.evaluate` on the same windows as every other method. kvpress pins
transformers < 5.3, so it lives in an environment of its own (`make kvpress-env`, `.venv-kvpress`);
where kvpress is not installed the method is not registered and asking for it is a KVLabError naming
the cause and the fix (`kvlab.quant.registry.unavailable`).

What kvpress does (read from the kvpress 0.5.5 wheel):
* `with press(model):` (presses/base_press.py:164-207) registers `press.forward_hook` on every
  `layer.self_attn` (line 203) and sets `self_attn.rotary_emb` to the model's (line 202);
* `forward_hook` (base_press.py:101-162) acts only while prefilling (`is_prefilling`, lines 37-40:
  cache_position[-1] + 1 == q_len), after the attention call, so the prefill itself reads full K/V;
  it reads the layer's keys and values from the cache, `compress`es them and writes them back (158-160);
* `ScorerPress.compress` (presses/scorer_press.py:77-103) keeps, per KV head, the
  `compute_n_kept(T, ratio)` = max(1, int(T * (1 - ratio))) (utils.py:104-114) highest-scoring tokens
  and gathers them: every head keeps the same number of tokens, not the same tokens;
* scores: StreamingLLM (presses/streaming_llm_press.py:38-54) the first n_sink=4 tokens and the most
  recent; Knorm (presses/knorm_press.py:32-46) minus the key norm; SnapKV (presses/snapkv_press.py:71-105)
  the attention of the last window_size=64 queries, pooled (kernel 5) and averaged over the GQA group,
  the window itself always kept (so the prefill must be longer than 64 tokens); ExpectedAttention
  (presses/expected_attention_press.py:62-165) the attention expected from the prefill's query mean
  and covariance rotated over the next 512 positions (through `self_attn.rotary_emb`, line 112), times the
  value norm, n_sink=4 kept;
* its pipeline (pipeline.py:289-312) feeds the tokens after a compressed context with
  `position_ids = context_length + i`: RoPE positions continue from the original length while the
  cache holds fewer tokens.

How kvlab runs a press: as its authors do, `with press(model):` for the whole kvlab block (the session
calls `KVPress.attach(model)` when the block opens and the returned detach when it closes), so the press's
own `forward_hook` runs after every attention call and compresses the cache during the prefill. The method
also brings its own cache (`replaces_cache`, as the HF QuantizedCache comparators, `kvlab.core.external`):
`make_cache(config)` returns a `PressCache`, a `DynamicCache` that counts the tokens each layer was given
and reports that original length as its sequence length with the evicted tokens as the mask offset, so
the continuation gets the positions kvpress's pipeline gives it and a causal mask over the kept tokens
plus itself. kvpress sets `self_attn.rotary_emb` on every attention module for good (base_press.py:202,
ExpectedAttention reads it); detaching removes what it added, so the model is left as it was.
Presses act during the prefill only, so the protocols are prefill-decode and decode; the fake
(teacher-forced) protocol has no prefill to press and is refused (`kvlab.protocols.check_protocol`).

Memory: a kept token is stored at 16 bits per element and an evicted one costs nothing (a press stores
no indices: the kept keys carry their RoPE), so `avg_bits` = 16 x kept / original elements, per original
K/V element: eviction and quantization on one axis. K/V errors are NaN (the cache hides them).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import KVLabError
from ..base import LayerContext, Method, Quantized, check_choice, check_range
from ..registry import preset, register, unavailable
from .hf_cache import HFQuantizedCache, sliding_layers

VERSION = "0.5.5"
SNAPKV_WINDOW = 64     # SnapKVPress.window_size (presses/snapkv_press.py), the queries it scores with
# kvlab's name -> kvpress class (all ScorerPress subclasses with kvpress's defaults)
PRESSES = {"streamingllm": "StreamingLLMPress", "snapkv": "SnapKVPress", "expected": "ExpectedAttentionPress",
           "knorm": "KnormPress"}
RATIOS = (0.25, 0.5, 0.75)
FIX = (f"run it in the kvpress environment: `make kvpress-env`, then `.venv-kvpress/bin/kvlab eval ...` "
       f"(kvpress {VERSION} pins transformers < 5.3, so it is not installed beside kvlab's own transformers)")


def kvpress_available() -> bool:
    """Whether the kvpress package is installed here (found, not imported: importing it is slow)."""
    try:
        return importlib.util.find_spec("kvpress") is not None
    except (ImportError, ValueError):
        return False


def _import_kvpress():
    try:
        import kvpress
    except ImportError as e:
        raise KVLabError(f"kvpress: NVIDIA kvpress is not installed ({e}); {FIX}") from e
    except Exception as e:  # noqa: BLE001 - installed beside a transformers it does not support
        raise KVLabError(f"kvpress: the installed kvpress failed to import ({type(e).__name__}: {e}); {FIX}") from e
    return kvpress


@dataclass(frozen=True)
class KVPress(Method):
    """A kvpress press (`press`: streamingllm, snapkv, expected, knorm) evicting `ratio` of the prefill."""

    name = "kvpress"
    replaces_cache: ClassVar[bool] = True
    spec_always: ClassVar[tuple[str, ...]] = ("press", "ratio")
    press: str = "snapkv"
    ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "press", self.press, tuple(PRESSES))
        # kvpress asserts 0 <= compression_ratio < 1 (presses/scorer_press.py:33-34)
        check_range(self.name, "ratio", self.ratio, 0.0, 1.0, hi_open=True)

    def build_press(self):
        """The kvpress press object (raises KVLabError when kvpress is missing or broken)."""
        return getattr(_import_kvpress(), PRESSES[self.press])(compression_ratio=float(self.ratio))

    def attach(self, model: torch.nn.Module):
        """Enter `with press(model):` for a kvlab block (the session calls this when the block opens);
        returns the function that leaves it and removes the `rotary_emb` attributes kvpress set."""
        press = self.build_press()
        attns = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
        had = {id(m) for m in attns if "rotary_emb" in m._modules or hasattr(m, "rotary_emb")}
        context = press(model)
        context.__enter__()

        def detach() -> None:
            context.__exit__(None, None, None)
            for m in attns:
                if id(m) not in had and hasattr(m, "rotary_emb"):
                    delattr(m, "rotary_emb")
        return detach

    def make_cache(self, config):
        """A fresh `PressCache` for one sequence."""
        sliding = sliding_layers(config)
        if sliding:
            raise KVLabError(f"kvpress: this model has sliding-window layers {sliding}; kvlab runs the presses on "
                             "models whose every layer is full attention")
        _import_kvpress()                        # without kvpress: the error naming the fix, here too
        return press_cache_class()(config, self.press)

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        raise KVLabError("kvpress: a press evicts from the whole cache after the prefill (make_cache); run it with "
                         "kvlab.evaluate in the prefill-decode or decode protocol")

    # --- accounting (the ExternalCache interface, as HFQuantizedCache) ------------------------------
    totals = staticmethod(HFQuantizedCache.totals)
    average_bits = staticmethod(HFQuantizedCache.average_bits)

    def resident_parts(self, cache) -> dict[str, int]:
        """Bytes the cache holds now: the kept keys / values, all full precision ("fp")."""
        fp = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                 if torch.is_tensor(t) and t.dim() == 4)
        return {"packed": 0, "fp": fp}

    def accounted_bits(self, cache) -> dict:
        """Bits of the cache's state summed over layers (see `accounted_layers`)."""
        return self.totals(self.accounted_layers(cache))

    def accounted_layers(self, cache) -> list[dict]:
        """Per layer: {"layer", "k_bits", "v_bits", "k_elems", "v_elems", "measured_bytes"}: 16 bits per
        stored element, elements counted over the original tokens (stored + evicted)."""
        rows = []
        for i, layer in enumerate(cache.layers):
            row = {"layer": i, "measured_bytes": 0}
            for kind, t in (("k", getattr(layer, "keys", None)), ("v", getattr(layer, "values", None))):
                if t is None or not torch.is_tensor(t) or t.dim() != 4 or t.numel() == 0:
                    row[f"{kind}_bits"], row[f"{kind}_elems"] = 0.0, 0
                    continue
                per_token = t.numel() // t.shape[-2]
                row[f"{kind}_bits"] = 16.0 * t.numel()
                row[f"{kind}_elems"] = t.numel() + per_token * cache.evicted.get(i, 0)
                row["measured_bytes"] += t.numel() * t.element_size()
            rows.append(row)
        return rows


@functools.cache
def press_cache_class() -> type:
    """`PressCache`: the `transformers.DynamicCache` subclass a press's sequence is stored in (built on
    first use, so that importing kvlab does not import transformers)."""
    from transformers import DynamicCache

    class PressCache(DynamicCache):
        """A DynamicCache pressed after the prefill by a kvpress press; see the module docstring.

        `given[layer]` counts the tokens the model handed the layer (stored + evicted); `evicted` the
        tokens the press removed since."""

        def __init__(self, config, label: str):
            super().__init__(config=config)
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            self.label = label
            self.n_layers = int(text.num_hidden_layers)
            self.given: dict[int, int] = {}

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            if self.label == "snapkv" and not self.given.get(layer_idx) and key_states.shape[-2] <= SNAPKV_WINDOW:
                raise KVLabError(f"kvpress snapkv: the prefill has {key_states.shape[-2]} tokens; SnapKV scores them "
                                 f"with its last window_size={SNAPKV_WINDOW} queries and needs more (a longer prefill)")
            self.given[layer_idx] = self.given.get(layer_idx, 0) + key_states.shape[-2]
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        @property
        def evicted(self) -> dict[int, int]:
            return {i: n - self.stored_length(i) for i, n in self.given.items()}

        def stored_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(layer_idx)

        def original_length(self, layer_idx: int = 0) -> int:
            return self.given.get(layer_idx, 0)

        # the original length: the continuation's positions follow it (kvpress's pipeline passes
        # position_ids = context_length + i), and `is_prefilling` sees a non-empty cache after the prefill
        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.original_length(layer_idx)

        # kv_length = stored + new (the base class), offset by the evicted tokens: the kept ones sit
        # before every new position, and the new ones are causal among themselves
        def get_mask_sizes(self, query, layer_idx: int):
            kv_length, kv_offset = super().get_mask_sizes(query, layer_idx)
            return kv_length, kv_offset + self.original_length(layer_idx) - self.stored_length(layer_idx)

        def kept_fraction(self) -> float:
            """Stored / original tokens over the layers (1.0 before the prefill)."""
            orig = sum(self.original_length(i) for i in range(len(self.layers)))
            return sum(self.stored_length(i) for i in range(len(self.layers))) / orig if orig else 1.0

    return PressCache


def preset_name(press: str, ratio: float) -> str:
    """`kvpress-snapkv-50`: the name of a press evicting `ratio` of the prefill (a preset for 25, 50, 75 %)."""
    return f"kvpress-{press}-{100 * ratio:g}"


PRESET_SPECS = {preset_name(p, r): f"kvpress:press={p},ratio={r!r}" for p in PRESSES for r in RATIOS}


def is_press(spec) -> bool:
    """Whether a stored method spec is a kvpress press (works without kvpress installed)."""
    return str(spec).strip().startswith("kvpress:")


FAMILY = "kvpress (eviction)"       # how figures name the presses' group


def press_label(spec: str) -> str:
    """A readable label for a stored kvpress spec, without kvpress installed: its preset name
    ("kvpress:press=snapkv,ratio=0.5" -> "kvpress-snapkv-50"); anything else is returned unchanged."""
    s = str(spec).strip()
    if not is_press(s):
        return s
    fields = dict(item.split("=", 1) for item in s.split(":", 1)[1].split(",") if "=" in item)
    try:
        return preset_name(fields.get("press", "snapkv"), float(fields.get("ratio", 0.5)))
    except ValueError:
        return s


if kvpress_available():
    register(KVPress)
    for _name, _spec in PRESET_SPECS.items():
        preset(_name, _spec)
else:
    unavailable(["kvpress", *PRESET_SPECS], f"NVIDIA kvpress is not installed in this environment; {FIX}")
