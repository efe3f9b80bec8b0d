"""QuaRot: round-to-nearest KV-cache quantization after a Hadamard rotation of every head vector.

Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs" (NeurIPS 2024); the
authors' code is github.com/spcl/QuaRot (line numbers below: commit 5008669, `fake_quant/` is the
simulation used for the paper's accuracy tables). Only the KV-cache part of QuaRot is modelled here
(weights and activations stay full precision, as everywhere in kvlab).

What QuaRot does to the cache
* **Keys** are rotated online after RoPE by a Walsh-Hadamard transform of each head vector scaled by
  1/sqrt(head_dim), and the queries by the same one, so q.k is unchanged
  (`fake_quant/rotation_utils.py:288-292`, `QKRotationWrapper.forward`); the rotated keys are then
  quantized per token and head (`rotation_utils.py:300-303`). Only power-of-two head_dim is accepted
  (`rotation_utils.py:275`) and the key group is the token (all heads) or one head (`:280`).
* **Values** get a per-head Hadamard fused into the weights, on the output side of `v_proj` and the
  input side of `o_proj` (`rotation_utils.py:216-226`, via `hadamard_utils.py:108-136`, which also asks
  for a power-of-two head_dim, `:113`); the rotated `v_proj` output is quantized per token by the
  layer's output quantizer (`fake_quant/main.py:91-95`, `quant_utils.py:251-254`).
* The quantizer is round-to-nearest with an integer zero point (`quant_utils.py:18-25`):
  q = clamp(round(x / s) + z, 0, 2^b - 1), x_hat = s * (q - z), maxq = 2^b - 1 (`:8-16`); per group
  of `g` elements max' = clip * max, min' = clip * min, s = (max' - min') / maxq, z = round(-min' / s)
  (`quant_utils.py:121-141`, the grouped path the values take). The keys' per-head path goes through
  the ungrouped `find_params` instead, whose range also contains 0: min' = clip * min(min, 0),
  max' = clip * max(max, 0) (`quant_utils.py:158-178`); kvlab reproduces both (the difference only
  shows when every rotated coordinate of a head vector has the same sign). Symmetric:
  s = clip * max(|min|, max) / (2^(b-1) - 1), q in [-2^(b-1), 2^(b-1) - 1] (`:30-35`, `:127-132`).
  The clip ratio must lie in (0, 1] (`quant_utils.py:119`).

Why kvlab needs no model change. H is orthogonal, so attention over the rotated, quantized cache
equals attention over x_hat = Q(x H) H^T: for keys (q H) . Q(k H) = q . (Q(k H) H^T); for values
softmax . Q(v H) H^T, which is what `o_proj`'s fused H^T computes. The method therefore returns
x_hat = dequant(quant(x @ H)) @ H^T (in fp32, cast back to the cache's dtype) for the post-RoPE keys
and the values kvlab stores. H is `kvlab.quant.primitives.hadamard_matrix`: the same natural-order
Walsh-Hadamard matrix as the fast transform for power-of-two head_dim; for other sizes kvlab builds a
Paley x Sylvester matrix (QuaRot refuses them for the KV cache; any orthogonal H keeps the identity
above exact), and a head_dim it cannot build raises a KVLabError naming the fix.

Defaults. The upstream command line has every KV flag off: `--k_bits 16`, `--v_bits 16` (no
quantization), `--k_groupsize -1` / `--v_groupsize -1` (one group for all heads of a token),
`--k_asym` / `--v_asym` off (symmetric), `--k_clip_ratio 1.0` / `--v_clip_ratio 1.0`
(`fake_quant/utils.py:135-153`). kvlab's defaults are the paper's 4-bit KV setting instead: `bits=4`
for keys and values, asymmetric (`asym=True`; the real 4-bit kernel path is asymmetric too, fp16 scale
and zero per token and head: `quarot/transformers/kv_cache.py:10-22`, `:150`), one group per head
vector (`group=None` = head_dim, 128 on LLaMA-2, the only key group besides whole tokens that
`rotation_utils.py:280` allows) and `clip_ratio=0.95` for keys and values (the value QuaRot's KV
experiments pass as `--k_clip_ratio 0.95 --v_clip_ratio 0.95` with `--k_groupsize 128 --k_asym`;
the repository itself ships no script with KV flags, so this one is not pinned to an upstream line).
`rotate_keys` / `rotate_values` (both true) switch the rotation off for the ablation: with both false
this is plain per-token RTN with the same clipping.

Bits: b per element + per group of `group` elements one fp16 scale (+ one fp16 zero point when
asymmetric); the rotation is fixed and data-independent, so it costs nothing. For head_dim D and the
default group, 2 + 32/D bits per element at 2 bits (2.5 for D = 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import KVLabError
from ..base import LayerContext, Method, Quantized, check_range
from ..primitives import SCALE_BITS, ZERO_BITS, _fp16, hadamard_matrix
from ..registry import preset, register


_ONE: dict[torch.device, torch.Tensor] = {}


def _bits_on(device: torch.device, value: float) -> torch.Tensor:
    """`value` as a 0-d float32 tensor on `device` without a host-to-device copy per call (a decode step
    quantizes one token per layer): a cached 1 times a Python number."""
    one = _ONE.get(device)
    if one is None:
        with torch.inference_mode(False):
            one = _ONE[device] = torch.ones((), device=device)
    return one * value


def rtn_groups(x: torch.Tensor, bits: int, group: int, *, asym: bool, clip_ratio: float,
               range_has_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot's fake quantizer on groups of `group` consecutive elements of the last axis.

    `x` is float32 with its last axis a multiple of `group`. Returns (x_hat float32, stored bits as a
    0-d tensor on x's device). Scales are rounded to fp16 (what a packed cache stores) and clamped at
    1e-8 (QuaRot's fix for an all-zero group, `quant_utils.py:134-136`, gives the same x_hat = 0).
    `range_has_zero`: min' = clip * min(min, 0), max' = clip * max(max, 0) (QuaRot's ungrouped
    `find_params`, which the per-head key path uses).
    """
    q, scale, zero = rtn_encode(x, bits, group, asym=asym, clip_ratio=clip_ratio, range_has_zero=range_has_zero)
    xh = rtn_decode(q, scale, zero)
    meta = SCALE_BITS + ZERO_BITS if asym else SCALE_BITS
    n_groups = q.shape[:-1].numel()
    total = _bits_on(x.device, float(bits * x.numel() + n_groups * meta))
    return xh.reshape(x.shape), total


def rtn_encode(x: torch.Tensor, bits: int, group: int, *, asym: bool, clip_ratio: float,
               range_has_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`rtn_groups`' codes (also read by `kvlab.pack`): (q [..., d // group, group] float integers,
    in [0, 2^b - 1] (asym) or [-2^(b-1), 2^(b-1) - 1]; scale [..., d // group, 1] (fp16-valued, clamped at
    1e-8); zero point [..., d // group, 1] float integers (asym) or None)."""
    d = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], d // group, group)
    hi = xg.amax(-1, keepdim=True)
    lo = xg.amin(-1, keepdim=True)
    if range_has_zero:
        hi, lo = hi.clamp_min(0.0), lo.clamp_max(0.0)
    hi, lo = hi * clip_ratio, lo * clip_ratio
    if asym:
        maxq = float(2 ** bits - 1)
        scale = _fp16((hi - lo) / maxq).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        q = (torch.round(xg / scale) + zero).clamp(0.0, maxq)
        return q, scale, zero
    maxq = float(2 ** (bits - 1) - 1)
    scale = _fp16(torch.maximum(lo.abs(), hi) / maxq).clamp_min(1e-8)
    return torch.round(xg / scale).clamp(-maxq - 1.0, maxq), scale, None


def rtn_decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """x_hat = scale * (q - zero) (asym) or scale * q, in the grouped layout of `rtn_encode`."""
    return scale * (q - zero) if zero is not None else scale * q


@register
@dataclass(frozen=True)
class QuaRot(Method):
    """QuaRot's KV cache: Hadamard-rotate each head vector, b-bit RTN per token and head (groups of
    `group` rotated channels, default the whole head vector), rotate back. Keys and values may use
    different bits (`v_bits`) and clip ratios (`v_clip_ratio`)."""

    name = "quarot"
    bits: int = 4                       # key bits (and value bits unless v_bits is set)
    v_bits: int | None = None           # value bits; default: same as bits
    group: int | None = None            # rotated channels per scale; None = head_dim (one group per head vector)
    asym: bool = True                   # asymmetric (scale + zero point) or symmetric (scale only)
    clip_ratio: float = 0.95            # range multiplier in (0, 1], keys (and values unless v_clip_ratio is set)
    v_clip_ratio: float | None = None   # value clip ratio; default: same as clip_ratio
    rotate_keys: bool = True            # Hadamard on the keys (QuaRot's online q/k rotation)
    rotate_values: bool = True          # Hadamard on the values (QuaRot's fused v_proj/o_proj rotation)
    sink: int = 0                       # first tokens kept fp16 by the core (QuaRot: none)
    residual: int = 0                   # most recent tokens kept fp16 by the core in prefill-decode (QuaRot: none)

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "bits", self.bits, 1, 8, integer=True)
        if self.v_bits is not None:
            check_range(self.name, "v_bits", self.v_bits, 1, 8, integer=True)
        if self.group is not None:
            check_range(self.name, "group", self.group, 1, 1 << 16, integer=True)
        check_range(self.name, "clip_ratio", self.clip_ratio, 0.0, 1.0, lo_open=True)
        if self.v_clip_ratio is not None:
            check_range(self.name, "v_clip_ratio", self.v_clip_ratio, 0.0, 1.0, lo_open=True)
        for f in ("asym", "rotate_keys", "rotate_values"):
            if not isinstance(getattr(self, f), bool):
                raise KVLabError(f"{self.name}: '{f}' must be true or false, got {getattr(self, f)!r}")
        if not self.asym:
            for f in ("bits", "v_bits"):
                if getattr(self, f) == 1:
                    raise KVLabError(f"{self.name}: '{f}' must be >= 2 for symmetric quantization "
                                     f"(asym=false has no 1-bit grid); use asym=true or {f}=2")

    def plan(self, x: torch.Tensor, ctx: LayerContext) -> dict:
        """How `quantize` stores x (also read by `kvlab.pack`): {"bits", "clip", "group", "range_has_zero",
        "h": the float32 Hadamard matrix or None (no rotation)}."""
        keys = ctx.kind == "k"
        d = x.shape[-1]
        group = d if self.group is None else self.group
        if group > d or d % group:
            raise KVLabError(f"{self.name}: 'group' ({self.group}) must divide head_dim ({d}): groups are "
                             f"rotated channels of one head vector; use a divisor of {d} or group=none")
        h = None
        if self.rotate_keys if keys else self.rotate_values:
            try:
                h = hadamard_matrix(d, x.device, torch.float32)
            except KVLabError as e:
                raise KVLabError(f"{self.name}: no Hadamard rotation for head_dim {d} ({e}); use "
                                 f"rotate_keys=false,rotate_values=false (unrotated per-token RTN) or a "
                                 f"method without a rotation (int, kivi)") from None
        return {"bits": self.bits if keys or self.v_bits is None else self.v_bits,
                "clip": self.clip_ratio if keys or self.v_clip_ratio is None else self.v_clip_ratio,
                "group": group, "range_has_zero": keys and group == d, "h": h}

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        p = self.plan(x, ctx)
        h = p["h"]
        xf = x.float()
        if h is not None:
            xf = xf @ h
        xh, total = rtn_groups(xf, p["bits"], p["group"], asym=self.asym, clip_ratio=p["clip"],
                               range_has_zero=p["range_has_zero"])
        if h is not None:
            xh = xh @ h.mT
        return Quantized(xh.to(x.dtype), total)


for _b in (8, 4, 3, 2):
    preset(f"quarot-{_b}", f"quarot:bits={_b}")
