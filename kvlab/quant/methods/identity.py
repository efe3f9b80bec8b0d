"""The identity method: stores K/V untouched at 16 bits. Logits must equal the bare model's bit for bit."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import LayerContext, Method, Quantized
from ..primitives import fp16_bits
from ..registry import preset, register


@register
@dataclass(frozen=True)
class Identity(Method):
    name = "fp16"

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        return Quantized(x, fp16_bits(x))


preset("fp", "fp16")
