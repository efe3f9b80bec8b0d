"""Methods that bring their own transformers cache (HF QuantizedCache comparators), driven by the session.

Such a method (`replaces_cache = True`) builds a fresh cache per sequence (`make_cache(config)`),
which the session supplies as `past_key_values` exactly where it would supply a `KVLabCache`; the
cache quantizes on its own. Its bits are read from the cache's state (`accounted_bits(cache)`)
before every later call of a sequence, so, as for kvlab's own methods in prefill-decode, they
describe the cache the latest call was scored against; finished sequences keep their last record.
"""
from __future__ import annotations

import math

from ..quant.base import Method
from .arch import head_dim, text_config


class ExternalCache:
    """The bookkeeping of a cache-replacing method inside a session."""

    def __init__(self, method: Method, config, per_step: bool = False):
        self.method, self.config, self.per_step = method, config, per_step
        self.step_ratios: list[float] = []        # decode: bits per element of the cache each call read
        self.step_layers: list[list[float]] = []  # decode: the same per layer
        self.step_where: list[tuple[int, int, int]] = []    # decode: (sequence, step in it, stored tokens)
        self.sequence = -1
        self.records: list[dict] = []             # one per finished sequence
        self.current: dict | None = None          # the live sequence's cache, before its latest call
        self.current_layers: list[dict] = []      # the same, per layer
        self.cache = None                         # the live sequence's cache

    def attach(self, model) -> None:
        """The block opens: a method that acts on the model itself as well (a kvpress press enters
        `with press(model):`) does so through its `attach(model)`, which returns how to undo it."""
        self._detach = self.method.attach(model)

    def detach(self) -> None:
        """The block closes: undo `attach` (hooks removed, the model as it was)."""
        detach, self._detach = getattr(self, "_detach", None), None
        if detach is not None:
            detach()

    def new_cache(self):
        """Close the current sequence and build the cache of the next one."""
        if self.current is not None:
            self.records.append(self.current)
        self.current, self.current_layers = None, []
        self.sequence += 1
        self.step_in_sequence = 0
        self.cache = self.method.make_cache(self.config)      # the live sequence's cache (`resident_bytes`)
        return self.cache

    def before_call(self, cache) -> None:
        """A later call of the sequence is about to read `cache`: record what it stores."""
        self.current_layers = self.method.accounted_layers(cache)      # read the cache once per call
        self.current = self.method.totals(self.current_layers)
        n = self.current["k_elems"] + self.current["v_elems"]
        if self.per_step and n:
            self.step_ratios.append((self.current["k_bits"] + self.current["v_bits"]) / n)
            self.step_layers.append([(r["k_bits"] + r["v_bits"]) / (r["k_elems"] + r["v_elems"])
                                     if r["k_elems"] + r["v_elems"] else math.nan for r in self.current_layers])
            cfg = text_config(self.config)
            per_token = cfg.num_key_value_heads * head_dim(cfg)
            tokens = max((r["k_elems"] for r in self.current_layers), default=0) // per_token
            self.step_where.append((self.sequence, self.step_in_sequence, tokens))
            self.step_in_sequence += 1

    def resident_bytes(self, cache=None) -> dict[str, int]:
        """Bytes the cache (default: the live sequence's) holds now, in the parts of
        `kvlab.core.cache.cache_resident_bytes`, as the method measures its own state
        (`HFQuantizedCache.resident_parts`: "packed", the backend's codes, scales and zero points; "fp", the
        residual keys / values); "aux" 0."""
        cache = cache if cache is not None else self.cache
        parts = self.method.resident_parts(cache) if cache is not None else {"packed": 0, "fp": 0}
        out = {"packed": parts["packed"], "fp": parts["fp"], "aux": 0}
        out["total"] = sum(out.values())
        return out

    def step_record(self) -> dict:
        """Decode: the per-step record in the format of `kvlab.protocols.decode.Decode.step_record`."""
        import numpy as np

        n_layers = max((len(x) for x in self.step_layers), default=0)
        return {"sequence": np.array([w[0] for w in self.step_where]), "step": np.array([w[1] for w in self.step_where]),
                "tokens": np.array([w[2] for w in self.step_where]), "avg_bits": np.array(self.step_ratios),
                "layer_bits": np.array([x + [math.nan] * (n_layers - len(x)) for x in self.step_layers]).reshape(
                    len(self.step_layers), n_layers)}

    def summary(self) -> dict:
        records = self.records + ([self.current] if self.current is not None else [])
        nan = float("nan")
        bits = self.method.average_bits(records) if records else {"avg_bits_k": nan, "avg_bits_v": nan,
                                                                   "avg_bits": nan}
        packed = sum(r["packed_bytes"] for r in records) if records else nan
        out = {**bits, "packed_bytes": packed, "k_rel_err": nan, "v_rel_err": nan, "attn_rel_err": nan}
        if self.per_step:
            r = self.step_ratios
            out.update(avg_bits_step_mean=sum(r) / len(r) if r else nan, avg_bits_end=r[-1] if r else nan,
                       decode_steps=len(r))
        return out

    def layer_report(self):
        """Per layer of the live sequence's cache before its latest call: bits per element of K and V
        (the errors are not observable from outside the cache: NaN)."""
        import pandas as pd

        rows = []
        for r in self.current_layers:
            row = {"layer": r["layer"]}
            for kind in "kv":
                e = r[f"{kind}_elems"]
                row.update({f"{kind}_bits": r[f"{kind}_bits"] / e if e else math.nan, f"{kind}_rel_err": math.nan,
                            f"{kind}_total_bits": r[f"{kind}_bits"], f"{kind}_elems": e})
            row["attn_rel_err"] = math.nan
            rows.append(row)
        return pd.DataFrame(rows)
