"""The bit and error ledger: what a session stored, per layer and tensor, and the reports built from it.

Bits and squared errors are accumulated as device tensors (a method never syncs with the host) and
read once, when a report is asked for; element counts are plain integers kept on the host. Squared
errors and norms are float32 whatever the model's dtype, and a bits tensor a method hands over in
bf16 or fp16 (bf16 counts stop being exact at 256, fp16 overflows at 65504) is widened to float32
before it is booked; other dtypes are booked as they come. Every relative error is a ratio of
norms and every bits figure a ratio of non-negative counts, so no report entry can be negative.
"""
from __future__ import annotations

import torch

from ..quant.base import Quantized

_NARROW = (torch.float16, torch.bfloat16)      # bits in these dtypes are widened to float32 when booked


class Ledger:
    """Per-layer, per-tensor bits and squared errors as device tensors; element counts on the host."""

    def __init__(self, n_layers: int):
        self.bits = {(l, t): None for l in range(n_layers) for t in "kv"}
        self.err2 = dict.fromkeys(self.bits)
        self.norm2 = dict.fromkeys(self.bits)
        self.region = {}                     # rewrite methods: (l, t) -> (bits, err2, norm2) of the region
        self.elems = dict.fromkeys(self.bits, 0)
        self.fp_elems = dict.fromkeys(self.bits, 0)
        self.attn_err2: list[torch.Tensor | None] = [None] * n_layers     # attention-output error, if measured
        self.attn_norm2: list[torch.Tensor | None] = [None] * n_layers
        self.measuring = False                        # set by the session for `quantize(..., measure_bytes=True)`
        self.measured = dict.fromkeys(self.bits, 0)   # bytes of the packed spans (measure_bytes), host ints
        self.measured_region = {}                     # rewrite methods: (l, t) -> bytes of the region
        self.version = 0                     # bumped whenever booked bits change (bits_by_layer reuses its result)
        self._by_layer: tuple[int, torch.Tensor | None] | None = None

    @staticmethod
    def _add(d, key, value):
        d[key] = value if d[key] is None else d[key] + value

    def quantized(self, layer: int, kind: str, x: torch.Tensor, q: Quantized, replace: bool = False) -> None:
        """Record what a method stored for `x`: its bits and its squared error (evicted tokens excluded).

        `replace=True` (methods that rewrite their whole quantized region, e.g. PM-KVQ) replaces the
        layer's region record instead of adding to it."""
        diff = q.x.float() - x.float()
        if q.keep is not None:  # evicted tokens: their error is eviction, not quantization
            diff = diff * q.keep[..., None]
        err2 = torch.linalg.vector_norm(diff, dtype=torch.float32).square()
        norm2 = torch.linalg.vector_norm(x, dtype=torch.float32).square()
        bits = q.bits.float() if q.bits.dtype in _NARROW else q.bits     # bf16/fp16 counts: widened
        self.version += 1
        if replace:
            self.region[(layer, kind)] = (bits, err2, norm2)
        else:
            self._add(self.bits, (layer, kind), bits)
            self._add(self.err2, (layer, kind), err2)
            self._add(self.norm2, (layer, kind), norm2)

    def packed(self, layer: int, kind: str, nbytes: int, replace: bool = False) -> None:
        """Record the bytes of one span's packed tensors (`kvlab.pack`); `replace` as in `quantized`."""
        if replace:
            self.measured_region[(layer, kind)] = int(nbytes)
        else:
            self.measured[(layer, kind)] += int(nbytes)

    def bits_by_layer(self) -> torch.Tensor | None:
        """All bits booked so far per (layer, kind) (rewritten regions included): a device tensor
        [layers, 2] (K, V) in float64, built without a host sync; None before any bits are booked.
        Unchanged bookings return the same (never modified) tensor: a decode step that flushed nothing
        costs no tensor work."""
        if self._by_layer is not None and self._by_layer[0] == self.version:
            return self._by_layer[1]
        parts = {k: b for k, b in self.bits.items() if b is not None}
        for k, r in self.region.items():
            parts[k] = r[0] if k not in parts else parts[k] + r[0]
        if not parts:
            flat = None
        else:
            first = next(iter(parts.values()))
            dev = first.device
            if all(p.dtype == first.dtype and p.device == dev for p in parts.values()):
                # one stack, then one exact widening to float64 (the same numbers as widening each part)
                zero = torch.zeros((), dtype=first.dtype, device=dev)
                flat = torch.stack([parts.get(k, zero) for k in self.bits]).double().view(-1, 2)
            else:
                zero = torch.zeros((), dtype=torch.float64, device=dev)
                flat = torch.stack([parts[k].double().to(dev) if k in parts else zero for k in self.bits]).view(-1, 2)
        self._by_layer = (self.version, flat)    # keys are ordered (layer 0 k, layer 0 v, layer 1 k, ...)
        return flat

    def total_bits(self) -> torch.Tensor | None:
        """All bits booked so far (rewritten regions included), one device scalar; None before any."""
        parts = [b for b in self.bits.values() if b is not None] + [r[0] for r in self.region.values()]
        if not parts:
            return None
        dev = parts[0].device
        return torch.stack([p.float().to(dev) for p in parts]).sum()

    def close_regions(self) -> None:
        """A sequence ended: its rewritten regions (the last record of each layer) become permanent, so the
        next sequence's rewrites replace only its own region."""
        self.version += 1
        for key, (bits, err2, norm2) in self.region.items():
            self._add(self.bits, key, bits)
            self._add(self.err2, key, err2)
            self._add(self.norm2, key, norm2)
        self.region = {}
        for key, n in self.measured_region.items():
            self.measured[key] += n
        self.measured_region = {}

    def attention(self, layer: int, out: torch.Tensor, ref: torch.Tensor) -> None:
        """Add one attention call's squared output error and reference norm (same queries, fp K/V)."""
        err2 = torch.linalg.vector_norm(out.float() - ref.float(), dtype=torch.float32).square()
        norm2 = torch.linalg.vector_norm(ref, dtype=torch.float32).square()
        self.attn_err2[layer] = err2 if self.attn_err2[layer] is None else self.attn_err2[layer] + err2
        self.attn_norm2[layer] = norm2 if self.attn_norm2[layer] is None else self.attn_norm2[layer] + norm2

    def count(self, layer: int, kind: str, n_elems: int, n_fp_elems: int = 0) -> None:
        """Count `n_elems` stored elements of which `n_fp_elems` are kept at fp16 (16 bits each)."""
        self.elems[(layer, kind)] += n_elems
        self.fp_elems[(layer, kind)] += n_fp_elems

    def table(self, extra_counts: dict | None = None):
        """One row per layer: bits/element and relative error for K and V (one host transfer).

        `extra_counts` {(layer, kind): (elements, fp16 elements)} is added for this report only (the
        live cache of a prefill-decode session, which is not final until the sequence ends)."""
        import pandas as pd

        extra_counts = extra_counts or {}
        keys = list(self.bits)

        def val(d, k, i):
            extra = self.region.get(k)
            base = d[k] if d[k] is not None else torch.zeros(())
            return base.float().cpu() + (extra[i].float().cpu() if extra else 0.0)
        bits = torch.stack([val(self.bits, k, 0) for k in keys]).tolist()
        err2 = torch.stack([val(self.err2, k, 1) for k in keys]).tolist()
        norm2 = torch.stack([val(self.norm2, k, 2) for k in keys]).tolist()
        nan = torch.tensor(float("nan"))
        attn = torch.stack([(e.float().cpu() / n.float().cpu().clamp_min(1e-30)).sqrt() if e is not None else nan
                            for e, n in zip(self.attn_err2, self.attn_norm2)]).tolist()
        rows = {}
        for (layer, kind), b, e, n in zip(keys, bits, err2, norm2):
            more, more_fp = extra_counts.get((layer, kind), (0, 0))
            elems, fp = self.elems[(layer, kind)] + more, self.fp_elems[(layer, kind)] + more_fp
            total_bits = b + 16.0 * fp
            row = rows.setdefault(layer, {"layer": layer})
            row[f"{kind}_bits"] = total_bits / elems if elems else float("nan")
            row[f"{kind}_rel_err"] = (e / n) ** 0.5 if n > 0 else 0.0
            row[f"{kind}_total_bits"] = total_bits
            row[f"{kind}_elems"] = elems
            row[f"{kind}_measured_bytes"] = (self.measured[(layer, kind)] + self.measured_region.get((layer, kind), 0)
                                             + 2 * fp) if self.measuring else float("nan")   # fp16 tokens: 2 B
            row["attn_rel_err"] = attn[layer]
        return pd.DataFrame(list(rows.values()))


def summarize(table) -> dict:
    """Average bits per element (K, V, overall), packed bytes and mean relative errors of a ledger table."""
    kb, vb = table["k_total_bits"].sum(), table["v_total_bits"].sum()
    ke, ve = table["k_elems"].sum(), table["v_elems"].sum()
    measured = (float(table["k_measured_bytes"].sum(min_count=1) + table["v_measured_bytes"].sum(min_count=1))
                if "k_measured_bytes" in table else float("nan"))
    return {
        "avg_bits_k": kb / ke if ke else float("nan"),
        "avg_bits_v": vb / ve if ve else float("nan"),
        "avg_bits": (kb + vb) / (ke + ve) if ke + ve else float("nan"),
        "packed_bytes": (kb + vb) / 8.0,
        # the bytes of kvlab.pack's tensors (quantize(..., measure_bytes=True)), NaN unless measured
        "packed_bytes_measured": measured,
        "avg_bits_measured": 8.0 * measured / (ke + ve) if ke + ve else float("nan"),   # the same, per element
        "k_rel_err": float(table["k_rel_err"].mean()),
        "v_rel_err": float(table["v_rel_err"].mean()),
        "attn_rel_err": float(table["attn_rel_err"].mean()),     # NaN unless measured (attn_error=True)
    }
