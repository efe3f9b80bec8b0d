"""`decode`: a deployed cache, one token per forward after the prefill, with bits accounted per step.

The cache policy is prefill-decode's (`PrefillDecode`): the prefill is stored full precision and,
before every later call, the tokens that left the method's fp residual window are quantized, so
with one token per forward every per-step rule runs at every step (KIVI's flush, PM-KVQ's
progressive widths). What `decode` adds is the regime and its account: the evaluator feeds the
continuation `decode_chunk` tokens per forward (1 by default; larger chunks are an approximation:
tokens within a chunk attend to each other at full precision), and after each call that read a
stored cache the policy records the bits the ledger holds per layer (a device tensor, no host sync)
and the element counts of the cache as it stood, keys and values apart (host integers; sink and
residual at 16 bits; under KIVI's authors' flush the fp16 key and value buffers differ).

`run.summary()` then adds `avg_bits_step_mean` (the mean over those steps), `avg_bits_end` (the
last step) and `decode_steps`; `run.step_bits()` returns the whole record (`step_record`), per
step and per layer, which is where PM-KVQ's progressive widths show.
"""
from __future__ import annotations

from array import array

import torch

from .prefill_decode import PrefillDecode


class Decode(PrefillDecode):
    name = "decode"

    def __init__(self, session, method):
        super().__init__(session, method)
        self.booked: list[torch.Tensor | None] = []    # per step: ledger bits per (layer, kind), device [L, 2]
        self.counts: list[array] = []                   # per step: (elements, fp16 elements) per (layer, kind)
        self.where: list[tuple[int, int, int]] = []     # per step: (sequence, step in the sequence, stored tokens)
        self.baselines: list[torch.Tensor | None] = []  # per sequence: bits booked by earlier sequences

    def begin_sequence(self, args: tuple, kwargs: dict) -> None:
        super().begin_sequence(args, kwargs)
        self.baselines.append(self.session.ledger.bits_by_layer())
        self.step_in_sequence = 0

    def after_call(self) -> None:
        """The call finished: record the bits of the stored cache it read (if any was stored)."""
        n_layers = self.session.n_layers
        row = array("q", bytes(32 * n_layers))              # (elements, fp16) of K, then of V, per layer
        stored = False
        tokens = 0
        for layer in self.session.cache.layers:             # one pass, host integers only
            if layer.is_initialized:
                T = layer.stored_length
                tokens = max(tokens, T - min(layer.last_new, T))
            ck = self.layer_counts(layer, "k")
            if ck is not None and layer.layer_idx < n_layers:
                cv = self.layer_counts(layer, "v")          # K and V apart: their fp16 windows may differ
                i = 4 * layer.layer_idx
                row[i], row[i + 1], row[i + 2], row[i + 3] = ck[0], ck[1], cv[0], cv[1]
                stored = stored or ck[0] > 0
        if not stored:                                      # the prefill: nothing stored before it
            return
        self.booked.append(self.session.ledger.bits_by_layer())   # the same tensor while nothing is booked
        self.counts.append(row)
        self.where.append((len(self.baselines) - 1, self.step_in_sequence, tokens))
        self.step_in_sequence += 1

    def step_record(self) -> dict:
        """Per decode step (every call that read a stored cache, all sequences): `sequence`, `step` (within
        its sequence), `tokens` (stored tokens the call read), `avg_bits` (bits per element of that cache,
        K and V, fp16 sink/residual included), `layer_bits` [steps, layers] (per layer, K and V) and
        `kind_bits` [steps, layers, 2] (per layer, K then V apart; KIVI's authors' flush keeps different
        fp16 key and value buffers). The HF-cache comparators' record has no `kind_bits`."""
        import numpy as np

        n_steps, n_layers = len(self.booked), self.session.n_layers
        if not n_steps:
            empty = np.zeros(0)
            return {"sequence": empty, "step": empty, "tokens": empty, "avg_bits": empty,
                    "layer_bits": np.zeros((0, n_layers)), "kind_bits": np.zeros((0, n_layers, 2))}
        dev = next((b.device for b in self.booked + self.baselines if b is not None), torch.device("cpu"))
        zero = torch.zeros(n_layers, 2, dtype=torch.float64, device=dev)
        booked = torch.stack([b if b is not None else zero for b in self.booked])
        base = [b if b is not None else zero for b in self.baselines]
        seq = [w[0] for w in self.where]
        booked = (booked - torch.stack([base[s] for s in seq])).cpu()        # one transfer, here
        counts = torch.from_numpy(np.array(self.counts, dtype=np.int64)).double().view(n_steps, n_layers, 2, 2)
        elems, fp = counts[..., 0], counts[..., 1]
        bits = booked + 16.0 * fp
        per_layer = bits.sum(-1) / elems.sum(-1)                              # NaN where a layer stores nothing
        return {"sequence": np.array(seq), "step": np.array([w[1] for w in self.where]),
                "tokens": np.array([w[2] for w in self.where]),
                "avg_bits": (bits.sum((1, 2)) / elems.sum((1, 2))).numpy(), "layer_bits": per_layer.numpy(),
                "kind_bits": (bits / elems).numpy()}

    def extra_summary(self) -> dict:
        packed = super().extra_summary()         # pack=True: the cache's resident bytes
        if not self.booked:
            return {"avg_bits_step_mean": float("nan"), "avg_bits_end": float("nan"), "decode_steps": 0, **packed}
        avg = self.step_record()["avg_bits"]
        return {"avg_bits_step_mean": float(avg.mean()), "avg_bits_end": float(avg[-1]), "decode_steps": len(avg),
                **packed}
