"""Packed storage that proves the bit accounting: what a method stores for a tensor, as real tensors.

Every method reports `Quantized.bits`, the bits a packed cache *would* need (codes + fp16 scales and zero
points + outliers + codebooks + widths). `pack(method, x, ctx)` builds that cache for one tensor of one
layer: codes bit-packed into uint8 words (`kvlab.quant.packing.pack_bits`), fp16 metadata, outlier values
and int32 indices, per-layer codebooks and thresholds, per-group widths; `unpack(packed)` dequantizes it
and returns exactly (`torch.equal`) the tensor `method.quantize(x, ctx).x` holds; `measured_bytes` is
the sum of the stored tensors' `nbytes`, to set against `Quantized.bits / 8`.

A `Packed` keeps three kinds of tensors:
  data    what the cache stores for this tensor (always counted);
  tables  per-layer tables (KVQuant's codebook, Q-Norm pair, key thresholds): the method books them once,
          on the layer's first chunk (`ctx.start <= sink`), and so are they counted (`tables_counted`);
  side    what kvlab's simulation needs to rebuild its tensor but a real cache does not store (never
          counted): PM-KVQ's key scales (folded into k_proj / q_proj), Q-Hitter's keep mask (a compacted
          cache keeps only the kept tokens, whose RoPE positions are already applied).

Where a method dequantizes with numbers fp16 cannot hold, the metadata is stored in the dtype the method
really uses (`packing.exact_float`: fp16 when exact, else bf16, else fp32) and measured and accounted bytes
differ: Q-Hitter's rounded-zero quantizer (fp32 scale; its zero point fits in b bits), QAQ's outliers
(kept at the input's precision: fp32 in an fp32 model), PM-KVQ's full-precision tokens and window (the
input's dtype). One packer pair per method class, in `_PACKERS` (`register_packer`); a method without one
is a KVLabError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import KVLabError
from .quant.base import LayerContext, Method
from .quant.methods.kivi import KIVI
from .quant.methods.kvquant import KVQuant, _nf_levels
from .quant.methods.pmkvq import PMKVQ
from .quant.methods.qaq import QAQ, decode_groups, encode_groups
from .quant.methods.qhitter import QHitter, rounded_zero_encode
from .quant.methods.quarot import QuaRot, rtn_decode, rtn_encode
from .quant.methods.uniform import Uniform
from .quant.packing import exact_float, pack_bits, unpack_bits
from .quant.primitives import (_fp16, _grouped, _ungrouped, hadamard_matrix, uniform_codebook, uniform_decode,
                               uniform_encode)
from .quant.registry import parse

__all__ = ["Packed", "pack", "unpack", "measured_bytes", "register_packer", "supported", "enable_packed_cache"]


@dataclass
class Packed:
    """One tensor as a packed cache stores it (see the module docstring); `unpack()` rebuilds it."""

    method: Method
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    tables_counted: bool = False
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    signature: tuple | None = field(default=None, repr=False, compare=False)    # `_signature`, once stored

    @property
    def nbytes(self) -> int:
        """Bytes the cache stores for this tensor: data + the layer's tables when this chunk carries them."""
        return sum(self.breakdown().values())

    def breakdown(self) -> dict[str, int]:
        """Bytes per stored tensor (tables prefixed "table:"; only when counted)."""
        out = {name: t.nbytes for name, t in self.data.items()}
        if self.tables_counted:
            out.update({f"table:{name}": t.nbytes for name, t in self.tables.items()})
        return out

    def unpack(self) -> torch.Tensor:
        return unpack(self)


PackFn = Callable[..., Packed]
UnpackFn = Callable[[Packed], torch.Tensor]
UnpackManyFn = Callable[[list[Packed]], torch.Tensor]
_PACKERS: dict[type, tuple[PackFn, UnpackFn]] = {}
_UNPACK_MANY: dict[type, UnpackManyFn] = {}


def register_packer(cls: type, pack_fn: PackFn, unpack_fn: UnpackFn, unpack_many: UnpackManyFn | None = None) -> None:
    """Packed storage for instances of exactly `cls` (a subclass may quantize differently: it registers its own).
    `pack_fn(method, x, ctx, keep)` returns a Packed, `unpack_fn(packed)` the dequantized tensor;
    optionally `unpack_many(packeds)`: chunks of one signature (`_signature`) dequantized in one vectorized
    call, stacked [N, *shape] (a decode cache holds one chunk per flushed token: `unpack_chunks`)."""
    _PACKERS[cls] = (pack_fn, unpack_fn)
    if unpack_many is not None:
        _UNPACK_MANY[cls] = unpack_many
    else:
        _UNPACK_MANY.pop(cls, None)


def supported() -> list[str]:
    """Method names with packed storage."""
    return sorted(c.name for c in _PACKERS)


def check_supported(method: Method | str) -> None:
    """Raise a KVLabError naming the method unless it has packed storage."""
    _entry(parse(method))


def _entry(method) -> tuple[PackFn, UnpackFn]:
    entry = _PACKERS.get(type(method))
    if entry is None:
        raise KVLabError(f"kvlab.pack: method '{method.name}' ({type(method).__qualname__}, spec "
                         f"'{method.spec}') has no packed storage; methods with one: {', '.join(supported())}")
    return entry


def enable_packed_cache(session) -> None:
    """`kvlab.quantize(..., pack=True)`: the session's cache layers hold the packed form (`Packed` chunks, one
    per flush, and the fp sink / pending tokens) and rebuild the dense K/V per call (`kvlab.core.cache`).

    For the prefill-decode and decode protocols, kvlab's own cache (not an HF QuantizedCache, which packs
    itself), full-attention layers and a layer-scope method with packed storage; anything else is a
    KVLabError naming what to change. Call before the session's first forward."""
    method = session.method
    spec = method.spec if method is not None else None
    if session.protocol not in ("prefill-decode", "decode"):
        raise KVLabError(f"pack=True: protocol '{session.protocol}' keeps no cache between calls to pack; use "
                         "protocol='decode' or 'prefill-decode', or drop pack=True")
    if method is None or session.policy is None:
        raise KVLabError(f"pack=True: '{spec}' brings its own cache (an HF QuantizedCache holds its packed form "
                         "itself: `kvlab.core.external.ExternalCache.resident_bytes`); drop pack=True for it")
    if method.scope != "layer":
        raise KVLabError(f"pack=True: '{spec}' quantizes the whole cache at once (scope '{method.scope}'), not span "
                         f"by span; packed caches cover layer-scope methods ({', '.join(supported())}); drop "
                         "pack=True for it")
    entry = _PACKERS.get(type(method))
    if entry is None:
        raise KVLabError(f"pack=True: method '{method.name}' (spec '{spec}') has no packed storage in kvlab.pack; "
                         f"methods with one: {', '.join(supported())}. Drop pack=True, or register a packer "
                         "(kvlab.pack.register_packer)")
    from .quant.methods.hf_cache import sliding_layers

    sliding = sliding_layers(session.model.config)
    if sliding:
        raise KVLabError(f"pack=True: the model has sliding-window layers ({sliding[:4]}...), whose stored tokens "
                         "shift; packed caches cover full-attention layers only. Drop pack=True for this model")
    session.pack = True                      # read by each KVLabLayer when the cache is built
    session.policy.pack = True
    session.ledger.measuring = True          # the chunks' bytes: packed_bytes_measured


def pack(method: Method | str, x: torch.Tensor, ctx: LayerContext, keep: torch.Tensor | None = None) -> Packed:
    """What `method` stores for x (one layer's K or V, [b, kv_heads, tokens, head_dim]) as real tensors.

    `keep` [b, kv_heads, tokens] (Q-Hitter only): the tokens the method keeps (its `Quantized.keep`);
    evicted tokens are not stored."""
    method = parse(method)
    pack_fn, _ = _entry(method)
    if keep is not None and not isinstance(method, QHitter):
        raise KVLabError(f"kvlab.pack: '{method.spec}' evicts nothing; `keep` is for eviction methods (qhitter)")
    return pack_fn(method, x, ctx, keep)


def unpack(packed: Packed) -> torch.Tensor:
    """The dequantized tensor (`method.quantize(x, ctx).x`, bit for bit; Q-Hitter: its kept tokens, the
    evicted ones 0)."""
    return _entry(packed.method)[1](packed)


def _signature(p: Packed) -> tuple:
    """Chunks with equal signatures differ only in their numbers (and outlier counts): the same method object,
    shape, layout, data shapes and the very same per-layer tables (a packed cache shares equal ones), so they
    can be dequantized as one batch. Computed once per chunk (a stored chunk does not change)."""
    if p.signature is None:
        p.signature = (id(p.method), p.kind, p.shape, p.dtype, repr(p.layout),
                       tuple((k, tuple(t.shape)) for k, t in p.data.items() if not k.startswith("outlier")),
                       tuple((k, id(t)) for k, t in p.tables.items()), tuple(p.side))
    return p.signature


def unpack_chunks(packeds: list[Packed]) -> list[tuple[int, int, torch.Tensor]]:
    """Dequantize consecutive chunks: [(i, j, x)] where x is chunks i..j-1 concatenated along the token axis
    (dim -2). Runs of chunks with one signature whose method registered `unpack_many` are dequantized in
    one vectorized call (a decode cache flushes one chunk per token: unpacking them one by one costs a
    Python round per token and layer); anything else one by one. Bit for bit `unpack` of each chunk."""
    out, i = [], 0
    while i < len(packeds):
        p, j = packeds[i], i + 1
        many = _UNPACK_MANY.get(type(p.method))
        if many is not None and len(p.shape) >= 2:
            sig = _signature(p)
            while j < len(packeds) and _signature(packeds[j]) == sig:
                j += 1
        if j - i == 1:
            out.append((i, j, unpack(p)))
        else:
            x = many(packeds[i:j])                                     # [N, ..., t, d]
            x = x.movedim(0, -3)                                       # [..., N, t, d]
            out.append((i, j, x.reshape(*x.shape[:-3], -1, x.shape[-1])))
        i = j
    return out


def measured_bytes(method: Method | str, x: torch.Tensor, ctx: LayerContext,
                   keep: torch.Tensor | None = None) -> int:
    """Bytes of the packed tensors that store x (`pack(...).nbytes`), to compare with `Quantized.bits / 8`."""
    return pack(method, x, ctx, keep).nbytes


# =============================================================================================
# shared pieces
# =============================================================================================
def _half(t: torch.Tensor) -> torch.Tensor:
    """An fp16 field as the methods round it (`primitives._fp16`: saturating at +-65504, so a bf16/fp32 value
    beyond fp16's range is stored as 65504, as the method used it, not inf); `t.half()` for every value within
    fp16's range, and a no-op rounding on values the method already rounded with `_fp16`."""
    return _fp16(t).half()


def _codes(data: dict, name: str, codes: torch.Tensor, bits: int) -> None:
    data[name] = pack_bits(codes, bits)


def _outliers(data: dict, x_flat: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None,
              prefix: str = "outlier") -> None:
    """Sparse part: int32 flat indices into the tensor and the values at them (`values`: already in their
    stored dtype; default: x's values, narrowed by `exact_float`)."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if x_flat.numel() >= 1 << 31:
        raise KVLabError("kvlab.pack: outlier indices are int32; this tensor has 2^31 elements or more")
    data[f"{prefix}_index"] = idx.to(torch.int32)
    data[f"{prefix}_value"] = values if values is not None else exact_float(x_flat[idx])


def _put_outliers(flat: torch.Tensor, data: dict, prefix: str = "outlier") -> torch.Tensor:
    idx = data[f"{prefix}_index"].long()
    return flat.index_put((idx,), data[f"{prefix}_value"].to(flat.dtype))


def _pack_uniform(data: dict, x: torch.Tensor, bits: int, dim: int, group, symmetric: bool = False,
                  prefix: str = "") -> dict:
    e = uniform_encode(x, bits, dim=dim, group=group, symmetric=symmetric)
    _codes(data, f"{prefix}codes", e["codes"], bits)
    data[f"{prefix}scale"] = e["scale"]
    if "zero" in e:
        data[f"{prefix}zero"] = e["zero"]
    return {"bits": bits, "dim": dim, "group": group, "symmetric": symmetric, "shape": tuple(x.shape)}


def _unpack_uniform(data: dict, lay: dict, dtype, prefix: str = "", rows: tuple = ()) -> torch.Tensor:
    """`_pack_uniform`'s tensor; `rows` = (N,): data stacked from N chunks of one layout, -> [N, *shape]."""
    shape = lay["shape"]
    n = 1
    for s in shape:
        n *= s
    codes = unpack_bits(data[f"{prefix}codes"], lay["bits"], n).view(*rows, *shape)
    dim = lay["dim"] if lay["dim"] < 0 else lay["dim"] - len(shape)      # counted from the end: rows in front
    return uniform_decode(codes, data[f"{prefix}scale"], data.get(f"{prefix}zero"), lay["bits"], dim=dim,
                          group=lay["group"], dtype=dtype)


def _stacked(ps: list[Packed]) -> dict[str, torch.Tensor]:
    """The chunks' data tensors stacked on a new first dim (every field but outliers)."""
    return {k: torch.stack([p.data[k] for p in ps]) for k in ps[0].data if not k.startswith("outlier")}


def _new(method, x, ctx, **kw) -> Packed:
    return Packed(method=method, kind=ctx.kind, shape=tuple(x.shape), dtype=x.dtype, **kw)


# =============================================================================================
# uniform int-b and KIVI (quantize_uniform)
# =============================================================================================
def _pack_int(method: Uniform, x, ctx, keep) -> Packed:
    axis = method.k_axis if ctx.kind == "k" else method.v_axis
    bits = method.bits if ctx.kind == "k" or method.v_bits is None else method.v_bits
    group = method.group
    if axis == "token" and group is not None and group < x.shape[-1] and x.shape[-1] % group:
        raise KVLabError(f"int: group={group} does not divide head_dim={x.shape[-1]}; use a divisor of {x.shape[-1]}")
    p = _new(method, x, ctx)
    p.layout = _pack_uniform(p.data, x, bits, -1 if axis == "token" else -2, group, method.symmetric)
    return p


def _pack_kivi(method: KIVI, x, ctx, keep) -> Packed:
    p = _new(method, x, ctx)
    bits, dim, group = method.plan(ctx.kind, x.shape[-1])
    p.layout = _pack_uniform(p.data, x, bits, dim, group)
    return p


def _unpack_plain(p: Packed) -> torch.Tensor:
    return _unpack_uniform(p.data, p.layout, p.dtype)


def _unpack_plain_many(ps: list[Packed]) -> torch.Tensor:
    return _unpack_uniform(_stacked(ps), ps[0].layout, ps[0].dtype, rows=(len(ps),))


# =============================================================================================
# PM-KVQ: quantize_uniform at the layer's current width (key scales folded into the weights)
# =============================================================================================
def _pack_pmkvq(method: PMKVQ, x, ctx, keep) -> Packed:
    t, d = x.shape[-2], x.shape[-1]
    bits, _, window = method.width(x, ctx)
    g = min(method.group, d)
    if d % g:
        raise KVLabError(f"pmkvq: group={method.group} does not divide head_dim={d}; use a divisor of {d}")
    q = t - window
    xq = x[..., :q, :] if window else x
    p = _new(method, x, ctx)
    p.layout = {"bits": bits, "window": window}
    if bits >= 16 or q == 0:
        p.data["fp"] = exact_float(xq.contiguous())     # full precision: the input's values (booked as 16 bits)
    else:
        s = method.rep_scales(ctx.layer, x.device) if ctx.kind == "k" else None
        if s is not None:                       # the cache stores Q(K / s), in fp32 as the method computes it
            s = s.float()[None, :, None, :]
            p.side["key_scale"] = s
            xq = xq.float() / s
        p.layout["codes"] = _pack_uniform(p.data, xq, bits, -1, g)
    if window:
        p.data["window"] = exact_float(x[..., q:, :].contiguous())
    return p


def _unpack_pmkvq(p: Packed) -> torch.Tensor:
    if "fp" in p.data:
        xh = p.data["fp"].to(p.dtype)
    else:
        if "key_scale" in p.side:
            xh = (_unpack_uniform(p.data, p.layout["codes"], torch.float32) * p.side["key_scale"]).to(p.dtype)
        else:
            xh = _unpack_uniform(p.data, p.layout["codes"], p.dtype)
    if p.layout["window"]:
        xh = torch.cat([xh, p.data["window"].to(p.dtype)], dim=-2)
    return xh


# =============================================================================================
# KVQuant: codebook indices, per-token (or per-key-group) offset/scale, dense-and-sparse outliers
# =============================================================================================
def _pack_kvquant(method: KVQuant, x, ctx, keep) -> Packed:
    e = method.encoding(x, ctx)
    cb = e["codebook"].to(device=x.device, dtype=torch.float32)
    k = cb.numel()
    code_bits = (k - 1).bit_length() if k > 1 else 0
    off, scl = _fp16(e["offset"].float()), _fp16(e["scale"].float()).clamp_min(1e-8)
    z = ((x.float() - off) / scl).contiguous()
    idx = torch.bucketize(z, ((cb[1:] + cb[:-1]) / 2).contiguous())
    p = _new(method, x, ctx, tables_counted=ctx.start <= method.sink_tokens)
    _codes(p.data, "codes", idx, code_bits)
    lay = p.layout = {"code_bits": code_bits, "meta": None}
    if e["lo"] is None:       # online ranges, per value token (all heads) or per key channel group
        if ctx.kind == "v":
            lay["meta"] = "token"
            p.data["offset"] = _half(off.expand(x.shape)[:, 0, :, 0])          # [b, T]
            p.data["scale"] = _half(e["scale"].float().expand(x.shape)[:, 0, :, 0])
        else:
            g = method.group or x.shape[-2]
            lay["meta"], lay["group"] = "channel", g
            p.data["offset"] = _half(off.expand(x.shape)[..., ::g, :])         # [b, H, ceil(T/g), D]
            p.data["scale"] = _half(e["scale"].float().expand(x.shape)[..., ::g, :])
    else:
        p.tables["k_lo"] = _half(e["lo"][0, :, 0, :])
        p.tables["k_hi"] = _half(e["hi"][0, :, 0, :])
    if method.kmeans:
        p.tables["codebook"] = _half(cb)
    if e["qnorm"] is not None:
        p.tables["qnorm"] = _half(e["qnorm"])
    if e["mask"] is not None:
        # the method keeps its outliers at `_fp16(x)` (saturating), stored as fp16
        _outliers(p.data, x.reshape(-1), e["mask"], _half(x.reshape(-1)[e["mask"].reshape(-1).nonzero().squeeze(1)]))
    return p


def _unpack_kvquant(p: Packed) -> torch.Tensor:
    return _unpack_kvquant_many([p])[0]


def _unpack_kvquant_many(ps: list[Packed]) -> torch.Tensor:
    """Chunks of one signature -> [N, *shape] (N = 1: one chunk); outliers, whose counts differ per chunk,
    are put back through flat indices offset by each chunk's position in the batch."""
    p, N = ps[0], len(ps)
    m, lay, shape = p.method, p.layout, p.shape
    dev = p.data["codes"].device
    data = _stacked(ps)
    n = 1
    for s in shape:
        n *= s
    if m.nf:
        cb = _nf_levels(m.bits, dev)
    elif m.kmeans:
        cb = p.tables["codebook"].float()
    else:
        cb = uniform_codebook(m.bits, dev)
    levels = cb
    if "qnorm" in p.tables:
        a, b = p.tables["qnorm"].float()
        levels = a * cb + b
    if lay["meta"] is None:
        lo = p.tables["k_lo"].float()[None, :, None, :]
        hi = p.tables["k_hi"].float()[None, :, None, :]
        off, scl = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-8)
        off, scl = _fp16(off), _fp16(scl).clamp_min(1e-8)
    elif lay["meta"] == "token":
        off = data["offset"].float()[:, :, None, :, None]
        scl = data["scale"].float()[:, :, None, :, None].clamp_min(1e-8)
    else:
        g, T = lay["group"], shape[-2]
        off = data["offset"].float().repeat_interleave(g, dim=-2)[..., :T, :]
        scl = data["scale"].float().repeat_interleave(g, dim=-2)[..., :T, :].clamp_min(1e-8)
    idx = unpack_bits(data["codes"], lay["code_bits"], n).view(N, *shape).long()
    xh = (levels.to(device=dev, dtype=torch.float32)[idx] * scl + off).to(p.dtype)
    if "outlier_index" in p.data:
        sparse = {"outlier_index": torch.cat([q.data["outlier_index"].long() + j * n for j, q in enumerate(ps)]),
                  "outlier_value": torch.cat([q.data["outlier_value"] for q in ps])}
        xh = _put_outliers(xh.reshape(-1), sparse).view(N, *shape)
    return xh


# =============================================================================================
# QAQ (head / layer level): per-group widths, fp16 (min, step) or (mean, std), outliers
# =============================================================================================
def _pack_qaq(method: QAQ, x, ctx, keep) -> Packed:
    if method.scope != "layer":
        raise KVLabError(f"kvlab.pack: '{method.spec}' quantizes the whole cache at once (level=token or "
                         f"variant=code, scope 'cache'); packed storage covers QAQ's layer-scope configs")
    p = _new(method, x, ctx)
    if x.shape[-2] == 0:
        p.layout = {"empty": True, "device": x.device}
        return p
    plan = method.layer_plan(x, ctx)
    xg, bits, mask = plan["groups"], plan["bits"], plan["mask"]
    mn, mx, mu, sd = plan["stats"]
    idx, p0, p1 = encode_groups(xg, bits, mn, mx, mu, sd, plan["grid"])
    p.data["p0"], p.data["p1"] = _half(p0.squeeze(-1)), _half(p1.squeeze(-1))
    widths = bits.expand(xg.shape[:-1])
    varies = method.n_min < method.n_max
    if varies:
        p.data["width"] = widths.to(torch.uint8)
    elem_w = widths[..., None].expand(xg.shape)
    code = idx.to(torch.int32)
    stored = ~mask
    used = sorted(int(w) for w in widths.unique().tolist())
    for w in used:                              # at most n_max - n_min + 1 streams, one per width
        _codes(p.data, f"codes_w{w}", code[stored & (elem_w == w)], w)
    _outliers(p.data, xg.reshape(-1), mask)
    p.layout = {"empty": False, "groups": tuple(xg.shape), "grid": plan["grid"], "widths": used,
                "width": None if varies else int(method.n_max if widths.numel() == 0 else used[0])}
    return p


def _unpack_qaq(p: Packed) -> torch.Tensor:
    lay = p.layout
    b, h, t, d = p.shape
    if lay["empty"]:
        return torch.zeros(p.shape, dtype=p.dtype, device=lay["device"])
    gshape = lay["groups"]
    dev = p.data["p0"].device
    widths = p.data["width"].long() if "width" in p.data else \
        torch.full(gshape[:-1], lay["width"], dtype=torch.int64, device=dev)
    flat_mask = torch.zeros(gshape, dtype=torch.bool, device=dev).reshape(-1)
    flat_mask[p.data["outlier_index"].long()] = True
    mask = flat_mask.view(gshape)
    elem_w = widths[..., None].expand(gshape)
    idx = torch.zeros(gshape, dtype=torch.float32, device=dev)
    for w in lay["widths"]:
        sel = ~mask & (elem_w == w)
        n = int(sel.sum())
        idx[sel] = unpack_bits(p.data[f"codes_w{w}"], w, n).float()
    xh = decode_groups(idx, widths, p.data["p0"].float()[..., None], p.data["p1"].float()[..., None], lay["grid"])
    flat = xh.reshape(-1)
    flat = flat.index_put((p.data["outlier_index"].long(),), p.data["outlier_value"].float())
    xh = flat.view(gshape)
    if p.method.level == "layer":
        xh = xh.reshape(b, t, h, d).transpose(1, 2)
    return xh.to(p.dtype)


# =============================================================================================
# Q-Hitter: kept tokens only, b-bit codes per token group
# =============================================================================================
def _pack_qhitter(method: QHitter, x, ctx, keep) -> Packed:
    b, h, t, d = x.shape
    keep = torch.ones(b, h, t, dtype=torch.bool, device=x.device) if keep is None else keep.to(x.device)
    if tuple(keep.shape) != (b, h, t):
        raise KVLabError(f"kvlab.pack: keep must be [batch, kv_heads, tokens] = {(b, h, t)}, got {tuple(keep.shape)}")
    p = _new(method, x, ctx)
    p.side["keep"] = keep
    bits = method.bits
    if method.zero == "rounded":
        q, scale, zero, _ = rounded_zero_encode(x, bits, method.group)
        q, scale, zero = q[keep], scale[keep], zero[keep]          # [n_kept, n_groups, g] / [n_kept, n_groups, 1]
        _codes(p.data, "codes", _ungrouped(q, -1, d), bits)
        _codes(p.data, "zero", zero, bits)                        # an integer in [0, 2^b - 1]
        p.data["scale"] = exact_float(scale.squeeze(-1))          # the authors' float32 scale
    else:
        e = uniform_encode(x, bits, dim=-1, group=method.group)
        _codes(p.data, "codes", e["codes"][keep], bits)
        p.data["scale"], p.data["zero"] = e["scale"][keep], e["zero"][keep]
    p.layout = {"bits": bits, "n_kept": int(keep.sum())}
    return p


def _unpack_qhitter(p: Packed) -> torch.Tensor:
    m, lay = p.method, p.layout
    b, h, t, d = p.shape
    keep = p.side["keep"]
    n_kept, bits = lay["n_kept"], lay["bits"]
    codes = unpack_bits(p.data["codes"], bits, n_kept * d).view(n_kept, d)
    if m.zero == "rounded":
        cg, _ = _grouped(codes, -1, m.group)
        zero = unpack_bits(p.data["zero"], bits, cg.shape[0] * cg.shape[1]).view(cg.shape[0], cg.shape[1], 1).float()
        xh = (cg.float() - zero) * p.data["scale"].float()[..., None]
        kept = _ungrouped(xh.to(p.dtype), -1, d)
    else:
        kept = uniform_decode(codes, p.data["scale"], p.data["zero"], bits, dim=-1, group=m.group, dtype=p.dtype)
    out = torch.zeros(p.shape, dtype=p.dtype, device=codes.device)
    out[keep] = kept
    return out


# =============================================================================================
# QuaRot: codes of the Hadamard-rotated vectors (the rotation is fixed: nothing stored)
# =============================================================================================
def _pack_quarot(method: QuaRot, x, ctx, keep) -> Packed:
    plan = method.plan(x, ctx)
    xf = x.float()
    if plan["h"] is not None:
        xf = xf @ plan["h"]
    q, scale, zero = rtn_encode(xf, plan["bits"], plan["group"], asym=method.asym, clip_ratio=plan["clip"],
                                range_has_zero=plan["range_has_zero"])
    bits = plan["bits"]
    p = _new(method, x, ctx)
    offset = 0 if method.asym else 1 << (bits - 1)
    _codes(p.data, "codes", q + offset, bits)
    p.data["scale"] = _half(scale.squeeze(-1))
    if zero is not None:
        p.data["zero"] = exact_float(zero.squeeze(-1), (torch.float16, torch.int32))  # integers: fp16 up to 2048
    p.layout = {"bits": bits, "group": plan["group"], "offset": offset, "rotate": plan["h"] is not None}
    return p


def _unpack_quarot(p: Packed) -> torch.Tensor:
    lay = p.layout
    d = p.shape[-1]
    g = lay["group"]
    n = 1
    for s in p.shape:
        n *= s
    dev = p.data["scale"].device
    q = unpack_bits(p.data["codes"], lay["bits"], n).view(*p.shape[:-1], d // g, g).float() - lay["offset"]
    scale = p.data["scale"].float()[..., None].clamp_min(1e-8)
    zero = p.data["zero"].float()[..., None] if "zero" in p.data else None
    xh = rtn_decode(q, scale, zero).reshape(p.shape)
    if lay["rotate"]:
        xh = xh @ hadamard_matrix(d, dev, torch.float32).mT
    return xh.to(p.dtype)


register_packer(Uniform, _pack_int, _unpack_plain, _unpack_plain_many)
register_packer(KIVI, _pack_kivi, _unpack_plain, _unpack_plain_many)
register_packer(PMKVQ, _pack_pmkvq, _unpack_pmkvq)
register_packer(KVQuant, _pack_kvquant, _unpack_kvquant, _unpack_kvquant_many)
register_packer(QAQ, _pack_qaq, _unpack_qaq)
register_packer(QHitter, _pack_qhitter, _unpack_qhitter)
register_packer(QuaRot, _pack_quarot, _unpack_quarot)
