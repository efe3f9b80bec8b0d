"""Uniform integer baselines: int-b round-to-nearest, symmetric or asymmetric, per token or per channel.

The plain baseline of every paper's tables (e.g. KVQuant Table 1 "int4/int3/int2", KIVI's
"fake per-token / per-channel" ablation). Keys and values may use different bits and axes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import LayerContext, Method, Quantized, check_choice, check_range
from ..primitives import quantize_uniform
from ..registry import preset, register

AXES = ("token", "channel")


@register
@dataclass(frozen=True)
class Uniform(Method):
    """int-b uniform quantization. `*_axis="token"`: one scale per token vector (groups along
    head_dim); `"channel"`: one scale per channel over `group` consecutive tokens."""

    name = "int"
    bits: int = 4
    v_bits: int | None = None           # default: same as bits
    k_axis: str = "token"
    v_axis: str = "token"
    group: int | None = None            # group size along the grouped axis (tokens for per-channel, head_dim
                                        # for per-token, whole vector when group >= head_dim); None = whole axis
    symmetric: bool = False
    sink: int = 0
    residual: int = 0

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "bits", self.bits, 1, 8, integer=True)
        if self.v_bits is not None:
            check_range(self.name, "v_bits", self.v_bits, 1, 8, integer=True)
        check_choice(self.name, "k_axis", self.k_axis, AXES)
        check_choice(self.name, "v_axis", self.v_axis, AXES)
        if self.group is not None:
            check_range(self.name, "group", self.group, 1, 1 << 20, integer=True)
        if self.symmetric and min(self.bits, self.v_bits or self.bits) < 2:
            check_range(self.name, "bits (symmetric)", min(self.bits, self.v_bits or self.bits), 2, 8, integer=True)

    @property
    def token_group(self) -> int:
        per_channel = "channel" in (self.k_axis, self.v_axis)
        return (self.group or 1) if per_channel else 1

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        axis = self.k_axis if ctx.kind == "k" else self.v_axis
        bits = self.bits if ctx.kind == "k" or self.v_bits is None else self.v_bits
        group = self.group
        if axis == "token" and group is not None and group < x.shape[-1] and x.shape[-1] % group:
            from ...errors import KVLabError
            raise KVLabError(f"int: group={group} does not divide head_dim={x.shape[-1]}; use a divisor of {x.shape[-1]}")
        xh, total = quantize_uniform(x, bits, dim=-1 if axis == "token" else -2, group=group,
                                     symmetric=self.symmetric)
        return Quantized(xh, total)


for _b in (8, 4, 3, 2):
    preset(f"int{_b}", f"int:bits={_b}")
    preset(f"int{_b}-channel", f"int:bits={_b},k_axis=channel,group=128")
