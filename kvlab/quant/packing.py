"""Packed storage helpers for `kvlab.pack`: b-bit codes in integer words and exact metadata dtypes. (The codes
themselves come from the quantizers, e.g. `primitives.uniform_encode` for `quantize_uniform`.)

Bit streams are little-endian and least significant bit first: code i occupies bits [i*b, (i+1)*b) of
the stream, so codes cross word boundaries when b does not divide the word (3, 5, 6, 7 bits) and a
stream of n codes takes ceil(n*b / w) words of w bits: exactly the b bits per element the accounting
counts, plus at most one partial word per stream. Everything is vectorised on the tensor's device.
"""
from __future__ import annotations

import torch

from ..errors import KVLabError

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
    """The `n` codes of a `pack_bits` stream, int32 [n]; or of several streams of equal length at once,
    words [N, L] -> codes [N, n] (one vectorized call for many chunks)."""
    bits, n = int(bits), int(n)
    rows = words.shape[:-1] if words.dim() == 2 else ()
    if bits == 0 or n == 0:
        return torch.zeros(*rows, n, dtype=torch.int32, device=words.device)
    w = _WORD_BITS.get(words.dtype)
    if w is None:
        raise KVLabError(f"unpack_bits: words must be uint8 or int32, got {words.dtype}")
    if words.shape[-1] * w < n * bits:
        raise KVLabError(f"unpack_bits: {words.shape[-1]} words of {w} bits hold fewer than {n} codes of {bits} bits")
    wide = words.to(torch.int64) & ((1 << w) - 1)
    if w % bits == 0:             # 1, 2, 4, 8 (16) bits: whole codes per word, shifted out directly
        per = w // bits
        if w == 8:                # uint8 words: int32 arithmetic is enough
            wide = wide.to(torch.int32)
        shifts = torch.arange(per, device=words.device, dtype=wide.dtype) * bits
        codes = (wide[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*rows, -1)[..., :n].to(torch.int32)
    stream = ((wide[..., None] >> torch.arange(w, device=words.device)) & 1).to(torch.uint8)
    stream = stream.reshape(*rows, -1)[..., : n * bits].reshape(*rows, n, bits).to(torch.int32)
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
