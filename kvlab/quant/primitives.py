"""Quantization primitives: vectorised over every head, token and group at once.

Conventions: tensors are `[batch, kv_heads, tokens, head_dim]`. A *group* shares one scale (and
zero point): `dim=-1` groups run along head_dim (per-token quantization), `dim=-2` groups run
along tokens (per-channel quantization, KIVI/KVQuant keys). `group=None` makes the whole extent of
`dim` one group. Scales and zero points are rounded to fp16, as a packed cache stores them.
"""
from __future__ import annotations

import torch

from ..errors import KVLabError

SCALE_BITS = 16   # one fp16 scale per group
ZERO_BITS = 16    # one fp16 zero point per group (asymmetric only)


def _grouped(x: torch.Tensor, dim: int, group: int | None) -> tuple[torch.Tensor, int]:
    """Move `dim` last and split it into groups: returns ([..., n_groups, g], original length).

    A ragged tail group is padded by repeating its last element, which changes no min/max/absmax.
    """
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = n if group is None or group >= n else group
    pad = (-n) % g
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g), n


def _ungrouped(xg: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    x = xg.reshape(*xg.shape[:-2], -1)[..., :n]
    return x.movedim(-1, dim)


def _bits_tensor(bits, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bits as a tensor broadcastable to the grouped layout [..., n_groups, 1]."""
    if not torch.is_tensor(bits):
        return torch.tensor(float(bits), device=x.device)
    b = bits.to(device=x.device, dtype=torch.float32)
    if b.dim() == 0:
        return b
    # caller gives bits shaped like x with `dim` reduced to 1 (or n_groups): move it like x
    b = b.movedim(dim, -1)
    return b.unsqueeze(-1)


def quantize_uniform(x: torch.Tensor, bits, *, dim: int = -1, group: int | None = None,
                     symmetric: bool = False, center: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest uniform quantization; returns (dequantized x, total stored bits).

    asymmetric (`symmetric=False`): levels mn + k*s, s = (mx - mn) / (2^b - 1), k in [0, 2^b - 1].
    `center="mean"` (QAQ code variant): levels mu + k*s, s = R / 2^b, k in [-2^(b-1), 2^(b-1) - 1].
    symmetric: levels k*s, s = absmax / (2^(b-1) - 1), k in [-2^(b-1), 2^(b-1) - 1] (needs b >= 2).
    `bits` is an int or a tensor shaped like x with `dim` reduced to 1 (mixed precision per group
    row, e.g. QAQ's per-token bits). Bits stored: b per element + fp16 scale (+ fp16 zero) per group.
    """
    xg, n = _grouped(x, dim, group)
    xf = xg.float()
    b = _bits_tensor(bits, x, dim)
    if symmetric:
        if (b < 2).any() if torch.is_tensor(bits) else float(bits) < 2:
            raise KVLabError("symmetric uniform quantization needs bits >= 2 (use symmetric=False for 1 bit)")
        half = 2.0 ** (b - 1) - 1
        scale = (xf.abs().amax(-1, keepdim=True) / half).half().float().clamp_min(1e-8)
        q = torch.round(xf / scale).clamp(min=-half - 1, max=half)
        xh = q * scale
        meta = SCALE_BITS
    else:
        mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        if center == "mean":
            mu = xf.mean(-1, keepdim=True).half().float()
            scale = ((mx - mn) / 2.0 ** b).half().float().clamp_min(1e-8)
            q = torch.round((xf - mu) / scale).clamp(min=-(2.0 ** (b - 1)), max=2.0 ** (b - 1) - 1)
            xh = mu + q * scale
        elif center == "minmax":
            mn = mn.half().float()
            scale = ((mx - mn) / (2.0 ** b - 1)).half().float().clamp_min(1e-8)
            q = torch.round((xf - mn) / scale).clamp(min=torch.zeros_like(b), max=2.0 ** b - 1)
            xh = mn + q * scale
        else:
            raise KVLabError(f"center must be 'minmax' or 'mean', got {center!r}")
        meta = SCALE_BITS + ZERO_BITS
    n_groups = xg.shape[:-1].numel()
    code_bits = (b.expand(xg.shape[:-1] + (1,)) * xg.shape[-1]).sum() if b.dim() else b * xg.numel()
    # padded elements are not stored: subtract their share of the code bits
    pad = xg.shape[-2] * xg.shape[-1] - n
    if pad:
        code_bits = code_bits - (b.expand(xg.shape[:-2] + (1, 1)).sum() if b.dim() else b * xg.shape[:-2].numel()) * pad
    total = code_bits + n_groups * meta
    return _ungrouped(xh.to(x.dtype), dim, n), total


def fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """Bits to store x at 16 bits per element (sink and residual tokens)."""
    return torch.tensor(16.0 * x.numel(), device=x.device)
