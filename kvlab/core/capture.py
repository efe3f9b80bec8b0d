"""The capture client: per-layer buffers of the tensors a `kvlab.capture` block asked for.

One slot per sequence (a fresh forward opens one); calls that extend a sequence (prefill-decode,
generate) append along the token axis. `attn` holds the statistics over all keys so far, so only
the latest is kept.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import KVLabError

CAPTURABLE = ("k_pre", "k", "v", "q", "attn")


class Recorder:
    """Buffers `what` per layer and per sequence; `max_tokens` keeps the first N; `to` moves on access."""

    def __init__(self, what: Iterable[str], n_layers: int, max_tokens: int | None = None, to: str | None = None,
                 retain_grad: bool = False):
        self.what = tuple(what)
        bad = [w for w in self.what if w not in CAPTURABLE]
        if bad:
            raise KVLabError(f"cannot capture {bad}; choose from {CAPTURABLE}")
        self.max_tokens, self.to, self.retain_grad = max_tokens, to, retain_grad
        self.buffers: dict[str, list[list[torch.Tensor | None]]] = {w: [[] for _ in range(n_layers)]
                                                                     for w in self.what}

    def wants(self, what: str) -> bool:
        return what in self.what

    def new_sequence(self) -> None:
        """Open a new sequence slot in every layer's buffers."""
        for per_kind in self.buffers.values():
            for per_layer in per_kind:
                per_layer.append(None)

    def record(self, what: str, layer: int, x: torch.Tensor) -> None:
        if self.retain_grad and x.requires_grad:
            x.retain_grad()
        else:
            x = x.detach()
        slots = self.buffers[what][layer]
        prev = slots[-1] if slots else None
        if what == "attn":            # statistics over all keys so far: keep the latest
            slots[-1] = x
            return
        if self.max_tokens is not None:
            have = 0 if prev is None else prev.shape[-2]
            x = x[..., : max(self.max_tokens - have, 0), :]
        slots[-1] = x if prev is None else torch.cat([prev, x], dim=-2)

    def tensors(self, what: str) -> list[torch.Tensor]:
        """Per layer: the captured sequences of `what`, concatenated along the batch axis."""
        if what not in self.buffers:
            raise KVLabError(f"'{what}' was not captured; this block captured {self.what}")
        per_layer = []
        for layer, seqs in enumerate(self.buffers[what]):
            seqs = [s for s in seqs if s is not None]
            if not seqs:
                raise KVLabError(f"nothing captured for '{what}' in layer {layer}: run the model inside the block")
            shapes = {tuple(s.shape[2:]) if what != "attn" else s.shape[-1] for s in seqs}
            if len(shapes) > 1:
                raise KVLabError(f"captured '{what}' sequences differ in length {sorted(shapes)}: capture one "
                                 "forward at a time, or equal-length batches")
            t = seqs[0] if len(seqs) == 1 else torch.cat(seqs, dim=0)
            per_layer.append(t.to(self.to) if self.to else t)
        return per_layer
