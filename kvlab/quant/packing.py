"""Packed storage helpers for `kvlab.pack`: b-bit codes in integer words, exact metadata dtypes, and the
codes of `primitives.quantize_uniform` (which `kvlab.pack` reproduces bit for bit).

Bit streams are little-endian and least significant bit first: code i occupies bits [i*b, (i+1)*b) of
the stream, so codes cross word boundaries when b does not divide the word (3, 5, 6, 7 bits) and a
stream of n codes takes ceil(n*b / w) words of w bits: exactly the b bits per element the accounting
counts, plus at most one partial word per stream. Everything is vectorised on the tensor's device.
"""
from __future__ import annotations

import torch

from ..errors import KVLabError
from .primitives import _fp16, _grouped, _scalar_bits, _ungrouped

MAX_CODE_BITS = 16
_WORD_BITS = {torch.uint8: 8, torch.int32: 32}


def pack_bits(codes: torch.Tensor, bits: int, word: torch.dtype = torch.uint8) -> torch.Tensor:
    """Pack integer `codes` (any shape, values in [0, 2^bits)) into a 1-D stream of `word`s (uint8 or int32).

    bits = 0 stores nothing (an empty tensor). A code outside [0, 2^bits) is a KVLabError."""
    bits = int(bits)
    if not 0 <= bits <= MAX_CODE_BITS:
        raise KVLabError(f"pack_bits: bits must be in [0, {MAX_CODE_BITS}], got {bits}")
    if word not in _WORD_BITS:
        raise KVLabError(f"pack_bits: word must be torch.uint8 or torch.int32, got {word}")
    flat = codes.reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.int64)
    flat = flat.to(torch.int32)
    if bits == 0 or flat.numel() == 0:
        return torch.empty(0, dtype=word, device=codes.device)
    if bool(((flat < 0) | (flat >= (1 << bits))).any()):
        raise KVLabError(f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)        # one byte per bit
    w = _WORD_BITS[word]
    pad = (-stream.numel()) % w
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    acc = torch.int32 if w == 8 else torch.int64
    weights = torch.ones((), dtype=acc, device=flat.device) << torch.arange(w, device=flat.device, dtype=acc)
    words = (stream.view(-1, w).to(acc) * weights).sum(-1, dtype=torch.int64)
    if word == torch.int32:                       # two's complement: bit 31 is the sign bit
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(word)


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The `n` codes of a `pack_bits` stream, int32 [n]."""
    bits, n = int(bits), int(n)
    if bits == 0 or n == 0:
        return torch.zeros(n, dtype=torch.int32, device=words.device)
    w = _WORD_BITS.get(words.dtype)
    if w is None:
        raise KVLabError(f"unpack_bits: words must be uint8 or int32, got {words.dtype}")
    if words.numel() * w < n * bits:
        raise KVLabError(f"unpack_bits: {words.numel()} words of {w} bits hold fewer than {n} codes of {bits} bits")
    wide = words.to(torch.int64) & ((1 << w) - 1)
    stream = ((wide[:, None] >> torch.arange(w, device=words.device)) & 1).to(torch.uint8)
    stream = stream.reshape(-1)[: n * bits].view(n, bits).to(torch.int32)
    return (stream << torch.arange(bits, device=words.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def stream_bytes(n: int, bits: int, word: torch.dtype = torch.uint8) -> int:
    """Bytes of a `pack_bits` stream of n codes."""
    w = _WORD_BITS[word]
    return -(-n * bits // w) * (w // 8)


def exact_float(t: torch.Tensor, candidates=(torch.float16, torch.bfloat16, torch.float32)) -> torch.Tensor:
    """`t` in the first dtype of `candidates` that holds every value exactly (NaN included), else as is.

    What the accounting books as fp16 is stored as fp16 whenever that loses nothing; where the method
    reconstructs from values fp16 cannot hold (an fp32 scale, an fp32 outlier), the storage widens, and
    the measured bytes show it."""
    for dt in candidates:
        if dt == t.dtype:
            return t
        c = t.to(dt)
        back = c.to(t.dtype)
        if bool(((back == t) | (back.isnan() & t.isnan())).all()):
            return c
    return t


# =============================================================================================
# quantize_uniform's codes (plain int bits)
# =============================================================================================
def uniform_encode(x: torch.Tensor, bits: int, *, dim: int = -1, group: int | None = None,
                   symmetric: bool = False) -> dict:
    """The codes and fp16 metadata `primitives.quantize_uniform(x, bits, dim=, group=)` dequantizes with
    (center "minmax", plain int bits): {"codes": x's shape, unsigned in [0, 2^b - 1] (symmetric: offset
    by 2^(b-1)), "scale": fp16 [..., n_groups] (before the 1e-8 clamp), "zero": fp16 minimum [...,
    n_groups] (asymmetric)}. Repeats quantize_uniform's operations one for one; the tests check the
    decoded tensor against quantize_uniform's bit for bit."""
    xg, n = _grouped(x, dim, group)
    xf = xg.float()
    b, levels, zero = _scalar_bits(bits, x.device)
    out = {}
    if symmetric:
        half = 2.0 ** (b - 1) - 1
        raw = _fp16(xf.abs().amax(-1, keepdim=True) / half)
        q = torch.round(xf / raw.clamp_min(1e-8)).clamp(min=-half - 1, max=half)
        q = q + float(1 << (int(bits) - 1))
    else:
        mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        mn = _fp16(mn)
        raw = _fp16((mx - mn) / levels)
        q = torch.round((xf - mn) / raw.clamp_min(1e-8)).clamp(min=zero, max=levels)
        out["zero"] = mn.squeeze(-1).half()
    out["scale"] = raw.squeeze(-1).half()
    out["codes"] = _ungrouped(q, dim, n).to(torch.int32)
    return out


def uniform_decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, *,
                   dim: int = -1, group: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat from `uniform_encode`'s parts (codes in x's shape): min + q * scale, or q * scale symmetric."""
    cg, n = _grouped(codes, dim, group)
    q = cg.float()
    scale = scale.float().unsqueeze(-1).clamp_min(1e-8)
    if zero is None:
        xh = (q - float(1 << (int(bits) - 1))) * scale
    else:
        xh = zero.float().unsqueeze(-1) + q * scale
    return _ungrouped(xh.to(dtype), dim, n)
