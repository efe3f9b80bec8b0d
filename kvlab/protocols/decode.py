"""`decode`: a deployed cache, one token per forward after the prefill, with bits accounted per step.

The cache policy is prefill-decode's (`PrefillDecode`): the prefill is stored full precision and,
before every later call, the tokens that left the method's fp residual window are quantized, so
with one token per forward every per-step rule runs at every step (KIVI's flush, PM-KVQ's
progressive widths). What `decode` adds is the regime and its account: the evaluator feeds the
continuation `decode_chunk` tokens per forward (1 by default; larger chunks are an approximation:
tokens within a chunk attend to each other at full precision), and the session records, after each
call that read a stored cache, the average bits of the cache as it stood (sink and residual at 16
bits), on the device with no host sync. `run.summary()` then adds `avg_bits_step_mean` (the mean
over those steps) and `avg_bits_end` (the last step).
"""
from __future__ import annotations

import torch

from .prefill_decode import PrefillDecode


class Decode(PrefillDecode):
    name = "decode"

    def __init__(self, session, method):
        super().__init__(session, method)
        self.step_ratio_sum: torch.Tensor | None = None       # sum over steps of (bits / elements), all sequences
        self.steps = 0
        self.last_ratio: torch.Tensor | None = None
        self.baseline: torch.Tensor | None = None

    def begin_sequence(self, args: tuple, kwargs: dict) -> None:
        super().begin_sequence(args, kwargs)
        self.baseline = self.session.ledger.total_bits()     # bits booked by earlier sequences

    def after_call(self) -> None:
        """The call finished: book the average bits of the stored cache it read (if any was stored)."""
        counts = self.stored_counts()
        n = sum(c[0] for c in counts.values())
        if n == 0:                                            # the prefill: nothing stored before it
            return
        fp = sum(c[1] for c in counts.values())
        booked = self.session.ledger.total_bits()            # None while nothing was quantized
        if booked is None:
            ratio = torch.tensor(16.0 * fp / n, dtype=torch.float64)
        else:
            if self.baseline is not None:
                booked = booked - self.baseline
            ratio = (booked.double() + 16.0 * fp) / n
        self.step_ratio_sum = ratio if self.step_ratio_sum is None else self.step_ratio_sum + ratio
        self.steps += 1
        self.last_ratio = ratio

    def extra_summary(self) -> dict:
        if not self.steps:
            return {"avg_bits_step_mean": float("nan"), "avg_bits_end": float("nan"), "decode_steps": 0}
        mean, end = (float(x) for x in (self.step_ratio_sum / self.steps, self.last_ratio))   # one sync each, here
        return {"avg_bits_step_mean": mean, "avg_bits_end": end, "decode_steps": self.steps}
