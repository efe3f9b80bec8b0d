"""Quantization primitives: vectorised over every head, token and group at once.

Conventions: tensors are `[batch, kv_heads, tokens, head_dim]`. A *group* shares one scale (and
zero point): `dim=-1` groups run along head_dim (per-token quantization), `dim=-2` groups run
along tokens (per-channel quantization, KIVI/KVQuant keys). `group=None` makes the whole extent of
`dim` one group. Scales and zero points are rounded to fp16, as a packed cache stores them.

Dtypes (models run in fp32, bf16 or fp16): every primitive computes in fp32 whatever the input
dtype, and returns dequantized tensors in the input's dtype and bits as float32 0-d tensors.
bf16 has 8 significant bits and fp16 overflows at 65504, so min-max ranges (mx - mn), scales,
zero points, means and variances, k-means sums, Hadamard products and bit counts taken in the
input dtype would be coarse or infinite; upcasting the input once (`.float()`, a no-op on fp32)
keeps fp32 results bit-identical and makes a bf16/fp16 result equal to the fp32 computation on
the upcast input, cast back. Constants are made as explicit float32 (never torch's default
dtype). What a packed cache stores as fp16 (scales, zero points, means, codebooks, outlier
values) is rounded with `_fp16`, which saturates at +-65504: a bf16 (or fp32) value beyond fp16's
range is stored as the largest fp16 number rather than inf (which would turn the whole group into
NaN); within fp16's range the rounding is unchanged. Callers that rotate (`hadamard_matrix`) ask
for a float32 matrix and multiply the upcast tensor.
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import KVLabError

SCALE_BITS = 16   # one fp16 scale per group
ZERO_BITS = 16    # one fp16 zero point per group (asymmetric only)
F16_MAX = float(torch.finfo(torch.float16).max)    # 65504: an fp16 field saturates here (`_fp16`)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to what an fp16 field stores (scales, zero points, offsets, codebooks), as float32.

    Saturating: values beyond +-65504 (possible in bf16 and fp32 models) become +-65504, not inf;
    NaN stays NaN. Every finite value within fp16's range rounds exactly as `t.half()` does."""
    return t.float().clamp(-F16_MAX, F16_MAX).half().float()


def _grouped(x: torch.Tensor, dim: int, group: int | None) -> tuple[torch.Tensor, int]:
    """Move `dim` last and split it into groups: returns ([..., n_groups, g], original length).

    A ragged tail group is padded by repeating its last element, which changes no min/max/absmax.
    """
    last = dim in (-1, x.dim() - 1)
    if not last:                     # a view; skipped where it would change nothing (decode: many small calls)
        x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = n if group is None or group >= n else group
    pad = (-n) % g
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g), n


def _ungrouped(xg: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    x = xg.reshape(*xg.shape[:-2], -1)
    if x.shape[-1] != n:
        x = x[..., :n]
    return x if dim in (-1, x.dim() - 1) else x.movedim(-1, dim)


_CONSTANTS: dict[tuple[float, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scalar_bits(bits, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, 2^b - 1, 0) for a plain bit width, as 0-d float32 tensors on `device`, made once per width and
    device (a decode step quantizes one token per layer, where making small tensors costs as much as the
    arithmetic). Read-only: never modify them in place."""
    key = (float(bits), torch.device(device))
    if key not in _CONSTANTS:
        with torch.inference_mode(False):        # ordinary tensors, usable inside and outside inference mode
            b = torch.tensor(float(bits), dtype=torch.float32, device=device)
            _CONSTANTS[key] = (b, 2.0 ** b - 1, torch.zeros_like(b))
    return _CONSTANTS[key]


def _bits_tensor(bits, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bits as a tensor broadcastable to the grouped layout [..., n_groups, 1]."""
    if not torch.is_tensor(bits):
        return _scalar_bits(bits, x.device)[0]
    b = bits.to(device=x.device, dtype=torch.float32)
    if b.dim() == 0:
        return b
    # caller gives bits shaped like x with `dim` reduced to 1 (or n_groups): move it like x
    b = b.movedim(dim, -1)
    return b.unsqueeze(-1)


def _uniform_codes(xf: torch.Tensor, b: torch.Tensor, levels: torch.Tensor | None, zero: torch.Tensor | None,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The uniform quantizer's integer codes on grouped float32 values xf [..., n_groups, g] (center "minmax"):
    (q, scale, raw, mn), all but q [..., n_groups, 1]: raw the fp16-valued scale (what an fp16 field stores;
    it may be 0, or slightly negative where fp16 rounds mn above mx), scale = raw clamped at 1e-8 (what
    divides and dequantizes), mn the fp16-valued minimum.

    asymmetric: q = round((x - mn) / scale) in [0, 2^b - 1], scale = (mx - mn) / (2^b - 1), x_hat = mn + q * scale.
    symmetric:  q = round(x / scale) in [-2^(b-1), 2^(b-1) - 1], scale = absmax / (2^(b-1) - 1), mn None,
    x_hat = q * scale. `b`, `levels` (2^b - 1), `zero` (0): float32 tensors broadcastable to [..., n_groups, 1]
    (`levels` and `zero` unused, may be None, when symmetric).
    The one place these codes are computed: `quantize_uniform` dequantizes them, `uniform_encode` (kvlab.pack)
    stores them."""
    if symmetric:
        half = 2.0 ** (b - 1) - 1
        raw = _fp16(xf.abs().amax(-1, keepdim=True) / half)
        scale = raw.clamp_min(1e-8)
        return torch.round(xf / scale).clamp(min=-half - 1, max=half), scale, raw, None
    mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    mn = _fp16(mn)
    raw = _fp16((mx - mn) / levels)
    scale = raw.clamp_min(1e-8)
    return torch.round((xf - mn) / scale).clamp(min=zero, max=levels), scale, raw, mn


def _check_symmetric_bits(bits) -> None:
    if (bits < 2).any() if torch.is_tensor(bits) else float(bits) < 2:
        raise KVLabError("symmetric uniform quantization needs bits >= 2 (use symmetric=False for 1 bit)")


def quantize_uniform(x: torch.Tensor, bits, *, dim: int = -1, group: int | None = None,
                     symmetric: bool = False, center: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest uniform quantization; returns (dequantized x, total stored bits).

    asymmetric (`symmetric=False`): levels mn + k*s, s = (mx - mn) / (2^b - 1), k in [0, 2^b - 1].
    `center="mean"` (QAQ code variant): levels mu + k*s, s = R / 2^b, k in [-2^(b-1), 2^(b-1) - 1].
    symmetric: levels k*s, s = absmax / (2^(b-1) - 1), k in [-2^(b-1), 2^(b-1) - 1] (needs b >= 2).
    `bits` is an int or a tensor shaped like x with `dim` reduced to 1 (mixed precision per group
    row, e.g. QAQ's per-token bits). Bits stored: b per element + fp16 scale (+ fp16 zero) per group.
    The codes of the minmax and symmetric grids are `_uniform_codes`' (stored by `uniform_encode`).
    """
    xg, n = _grouped(x, dim, group)
    xf = xg.float()
    b = _bits_tensor(bits, x, dim)
    if symmetric:
        _check_symmetric_bits(bits)
        q, scale, _, _ = _uniform_codes(xf, b, None, None, True)
        xh = q * scale
        meta = SCALE_BITS
    else:
        if center == "mean":
            mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
            mu = _fp16(xf.mean(-1, keepdim=True))
            scale = _fp16((mx - mn) / 2.0 ** b).clamp_min(1e-8)
            q = torch.round((xf - mu) / scale).clamp(min=-(2.0 ** (b - 1)), max=2.0 ** (b - 1) - 1)
            xh = mu + q * scale
        elif center == "minmax":
            levels, zero = _scalar_bits(bits, x.device)[1:] if not torch.is_tensor(bits) else \
                (2.0 ** b - 1, torch.zeros_like(b))
            q, scale, _, mn = _uniform_codes(xf, b, levels, zero, False)
            xh = mn + q * scale
        else:
            raise KVLabError(f"center must be 'minmax' or 'mean', got {center!r}")
        meta = SCALE_BITS + ZERO_BITS
    n_groups = xg.shape[:-1].numel()
    # padded elements are not stored: subtract their share of the code bits
    pad = xg.shape[-2] * xg.shape[-1] - n
    if not torch.is_tensor(bits):
        total = torch.full((), _plain_total(float(bits), xg.numel(), xg.shape[:-2].numel(), pad, n_groups, meta),
                           dtype=torch.float32, device=x.device)
        return _ungrouped(xh.to(x.dtype), dim, n), total
    code_bits = (b.expand(xg.shape[:-1] + (1,)) * xg.shape[-1]).sum() if b.dim() else b * xg.numel()
    if pad:
        code_bits = code_bits - (b.expand(xg.shape[:-2] + (1, 1)).sum() if b.dim() else b * xg.shape[:-2].numel()) * pad
    total = code_bits + n_groups * meta
    return _ungrouped(xh.to(x.dtype), dim, n), total


def uniform_encode(x: torch.Tensor, bits: int, *, dim: int = -1, group: int | None = None,
                   symmetric: bool = False) -> dict:
    """What a packed cache stores for `quantize_uniform(x, bits, dim=, group=, symmetric=)` (center "minmax",
    plain int bits): the codes it dequantized (`_uniform_codes`), as {"codes": int32 in x's shape, unsigned in
    [0, 2^b - 1] (symmetric: offset by 2^(b-1)), "scale": fp16 [..., n_groups], "zero": fp16 minimum
    [..., n_groups] (asymmetric only)}. `uniform_decode` rebuilds quantize_uniform's tensor bit for bit."""
    if symmetric:
        _check_symmetric_bits(bits)
    xg, n = _grouped(x, dim, group)
    b, levels, zero = _scalar_bits(bits, x.device)
    q, _, raw, mn = _uniform_codes(xg.float(), b, levels, zero, symmetric)
    out = {}
    if symmetric:
        q = q + float(1 << (int(bits) - 1))
    else:
        out["zero"] = mn.squeeze(-1).half()
    out["scale"] = raw.squeeze(-1).half()        # before the 1e-8 clamp (`uniform_decode` clamps again)
    out["codes"] = _ungrouped(q, dim, n).to(torch.int32)
    return out


def uniform_decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, *,
                   dim: int = -1, group: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat from `uniform_encode`'s parts (codes in x's shape): min + q * scale, or (q - 2^(b-1)) * scale
    symmetric; `quantize_uniform`'s dequantization, in `dtype`."""
    cg, n = _grouped(codes, dim, group)
    q = cg.float()
    scale = scale.float().unsqueeze(-1).clamp_min(1e-8)
    if zero is None:
        xh = (q - float(1 << (int(bits) - 1))) * scale
    else:
        xh = zero.float().unsqueeze(-1) + q * scale
    return _ungrouped(xh.to(dtype), dim, n)


@functools.lru_cache(maxsize=1024)
def _plain_total(bits: float, numel: int, rows: int, pad: int, n_groups: int, meta: int) -> float:
    """`quantize_uniform`'s total bits for a plain bit width: b * elements - b * rows * pad + groups * meta
    in float32 tensor arithmetic with b a 0-d float32 tensor (the operations a tensor `bits` of 0 dims
    goes through), done once per shape and kept: a decode step asks for the same shapes in every layer."""
    b = torch.tensor(bits, dtype=torch.float32)
    code_bits = b * numel
    if pad:
        code_bits = code_bits - b * rows * pad
    return (code_bits + n_groups * meta).item()


def fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """Bits to store x at 16 bits per element (sink and residual tokens); a float32 0-d tensor."""
    return torch.full((), 16.0 * x.numel(), dtype=torch.float32, device=x.device)


# =============================================================================================
# Grouping levels beyond per-token / per-channel
# =============================================================================================
LEVELS = ("token", "channel", "head", "layer")
OUTLIER_VALUE_BITS = 16   # an outlier's value, fp16 (KVQuant's sparse matrix values)
OUTLIER_INDEX_BITS = 32   # its position, int32 (KVQuant's CSR/CSC column index)


def _level_flat(x: torch.Tensor, level: str | None, dim: int):
    """View `x` so that one group-axis `d` covers the requested level; returns (x2, d, restore).

    token:   groups along head_dim (d=-1), one row per [b, head, token]
    channel: groups along tokens (d=-2), one row per [b, head, channel]
    head:    tokens x head_dim of one [b, head] flattened into one row (d=-1)
    layer:   the whole tensor flattened into one row (d=-1)
    None:    plain axis `dim` (the convention of `quantize_uniform`).
    """
    if level is None:
        return x, dim, (lambda y: y)
    if level == "token":
        return x, -1, (lambda y: y)
    if level == "channel":
        return x, -2, (lambda y: y)
    shape = x.shape
    if level == "head":
        if x.dim() < 2:
            raise KVLabError(f"level='head' needs a tensor with at least 2 dims, got shape {tuple(shape)}")
        return x.reshape(*shape[:-2], shape[-2] * shape[-1]), -1, (lambda y: y.reshape(shape))
    if level == "layer":
        return x.reshape(1, -1), -1, (lambda y: y.reshape(shape))
    raise KVLabError(f"level must be one of {list(LEVELS)}, got {level!r}")


def _groups(x: torch.Tensor, dim: int = -1, group: int | None = None, level: str | None = None):
    """Grouped layout used by every primitive below.

    Returns (xg [..., n_groups, g], valid [n_groups, g] bool (False on padding), restore) where
    `restore(yg)` maps a tensor in the grouped layout back to x's shape.
    """
    x2, d, undo = _level_flat(x, level, dim)
    xg, n = _grouped(x2, d, group)
    g = xg.shape[-1]
    valid = (torch.arange(xg.shape[-2] * g, device=x.device) < n).reshape(xg.shape[-2], g)

    def restore(yg: torch.Tensor) -> torch.Tensor:
        return undo(_ungrouped(yg, d, n))

    return xg, valid, restore


def _masked_mean_std(xg: torch.Tensor, keep: torch.Tensor):
    """Mean and (population) std over the last axis of `xg`, counting only `keep` elements (in fp32:
    a bf16 count stops being exact at 256 elements)."""
    xg = xg.float()
    w = keep.to(xg.dtype)
    cnt = w.sum(-1, keepdim=True).clamp_min(1.0)
    mu = (xg * w).sum(-1, keepdim=True) / cnt
    var = (((xg - mu) * w) ** 2).sum(-1, keepdim=True) / cnt
    return mu, var.sqrt()


def quantize_grouped(x: torch.Tensor, bits, level: str = "token", group: int | None = None, *,
                     symmetric: bool = False, center: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_uniform` at a grouping level: "token" | "channel" | "head" | "layer".

    token/channel are `quantize_uniform(dim=-1 / -2)`; "head" makes one group per [b, head] over
    tokens x head_dim and "layer" one group for the whole tensor (QAQ's quantization levels,
    Dong et al. 2024, Sec. 4); `group` then splits that flattened row into groups of `group`.
    `bits` is an int, or a tensor with one entry per row of the level ([b, h, T, 1] for token,
    [b, h, 1, D] for channel, [b, h, 1, 1] for head, 0-d for layer). Same bit accounting as
    `quantize_uniform` (b per element + fp16 scale (+ zero) per group).
    """
    x2, d, undo = _level_flat(x, level, -1)
    if torch.is_tensor(bits) and bits.dim() and level in ("head", "layer"):
        bits = bits.reshape(*x2.shape[:-1], 1) if level == "head" else bits.reshape(())
    xh, total = quantize_uniform(x2, bits, dim=d, group=group, symmetric=symmetric, center=center)
    return undo(xh), total


# =============================================================================================
# Normal-quantile codebook (QAQ "normal" method; NF-style)
# =============================================================================================
def normal_levels(bits: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels and bucket edges of the b-bit N(0, 1) quantile codebook.

    With n = 2^b equal-probability buckets, bucket i spans Phi^-1(i/n) .. Phi^-1((i+1)/n) and is
    represented by its median level_i = Phi^-1((i + 0.5) / n)  (QAQ, Dong et al. 2024, Sec. 4
    "normal" method; the authors' `normal_quantiles_center` / `_upper_bound`).
    Returns (levels [n], inner edges [n-1] = Phi^-1(i/n), i = 1..n-1).
    """
    n = 2 ** int(bits)
    i = torch.arange(n, dtype=torch.float64, device=device)
    levels = torch.special.ndtri((i + 0.5) / n)
    edges = torch.special.ndtri(i[1:] / n)
    return levels.float(), edges.float()


def quantize_normal(x: torch.Tensor, bits: int, *, dim: int = -1, group: int | None = None,
                    level: str | None = None, exclude: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-quantile quantization: x -> mu + sigma * level_i, i = bucket of (x - mu) / sigma.

    Per group, mu and sigma (population std) are computed over the elements not in `exclude`
    (outliers: QAQ's statistics exclude them) and stored as fp16; the bucket edges are the N(0,1)
    quantiles i/2^b and each bucket dequantizes to its median (see `normal_levels`).
    Bits: b per element + 2 fp16 (mu, sigma) per group. Excluded elements are still encoded
    (callers put the outliers back with `merge_outliers` and count them with `outlier_bits`).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise KVLabError(f"quantize_normal: bits must be an integer in [1, 16], got {bits!r}")
    xg, valid, restore = _groups(x, dim, group, level)
    xf = xg.float()
    keep = valid if exclude is None else (valid & ~_groups(exclude, dim, group, level)[0])
    mu, sd = _masked_mean_std(xf, keep)
    mu, sd = _fp16(mu), _fp16(sd).clamp_min(1e-8)
    levels, edges = normal_levels(bits, x.device)
    idx = torch.bucketize(((xf - mu) / sd).contiguous(), edges)
    xh = mu + sd * levels[idx]
    n_groups = xg.shape[:-1].numel()
    total = torch.tensor(float(bits) * x.numel() + n_groups * (SCALE_BITS + ZERO_BITS), dtype=torch.float32,
                         device=x.device)
    return restore(xh).to(x.dtype), total


# =============================================================================================
# Non-uniform codebooks (KVQuant NUQ: sensitivity-weighted k-means)
# =============================================================================================
def kmeans_1d(values: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 50,
              tol: float = 1e-7) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd) on the last axis; returns sorted centroids [..., k].

    Minimises sum_i w_i (v_i - c_{a(i)})^2. Deterministic init at the (weighted) quantiles
    (j + 0.5) / k of the sample; in 1-D the assignment step is a bucketize on the midpoints of
    the sorted centroids, the update c_j = sum_{a(i)=j} w_i v_i / sum_{a(i)=j} w_i (an empty
    cluster keeps its centroid). Leading axes are independent problems (e.g. one per layer).
    """
    if k < 1:
        raise KVLabError(f"kmeans_1d: k must be >= 1, got {k}")
    v = values.float()
    w = torch.ones_like(v) if weights is None else weights.float().expand_as(v)
    lead = v.shape[:-1]
    v2, w2 = v.reshape(-1, v.shape[-1]), w.reshape(-1, v.shape[-1])
    # deterministic init: weighted quantiles of the sorted sample
    vs, order = v2.sort(-1)
    ws = w2.gather(-1, order)
    cw = ws.cumsum(-1)
    tot = cw[:, -1:].clamp_min(1e-30)
    targets = (torch.arange(k, device=v.device, dtype=torch.float32) + 0.5) / k * tot
    pos = torch.searchsorted(cw.contiguous(), targets.contiguous()).clamp_max(v2.shape[-1] - 1)
    c = vs.gather(-1, pos)
    for _ in range(int(iters)):
        mids = (c[:, 1:] + c[:, :-1]) / 2
        a = torch.searchsorted(mids.contiguous(), v2.contiguous())
        sw = torch.zeros_like(c).scatter_add_(-1, a, w2)
        swv = torch.zeros_like(c).scatter_add_(-1, a, w2 * v2)
        new = torch.where(sw > 0, swv / sw.clamp_min(1e-30), c).sort(-1).values
        done = (new - c).abs().max() <= tol * (1.0 + c.abs().max())
        c = new
        if bool(done):       # calibration only: one sync per iteration is fine
            break
    return c.reshape(*lead, k)


def kmeans_codebook(values: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                    iters: int = 50) -> torch.Tensor:
    """KVQuant's NUQ datatype: 2^b centroids of a (sensitivity-)weighted k-means, fp16-rounded.

    Hooper et al. 2024, Sec. 3.4 "nuqX": the datapoint weights are the Fisher information
    (squared gradients dL/dA of the activations) so that sensitive values pull the centroids
    (`weights=None` is plain k-means). `values` are the *normalised* activations of one layer
    (see `quantize_to_codebook`); leading axes give one codebook each. Returns [..., 2^b] sorted.
    """
    return _fp16(kmeans_1d(values, 2 ** int(bits), weights, iters)).sort(-1).values


def uniform_codebook(bits: int, device=None) -> torch.Tensor:
    """The 2^b evenly spaced levels in [-1, 1]: with min-max normalisation this is plain asymmetric int-b."""
    return torch.linspace(-1.0, 1.0, 2 ** int(bits), dtype=torch.float32, device=device)


def round_to_codebook(z: torch.Tensor, codebook: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest entry of a sorted 1-D codebook for every element of z (values outside clamp to the ends).

    `levels` (same length) replaces the reconstruction value of each entry while the decision
    boundaries stay the codebook's midpoints (Q-Norm corrected levels, KVQuant App. "Q-Norm").
    """
    cb = codebook.to(device=z.device, dtype=torch.float32)
    mids = ((cb[1:] + cb[:-1]) / 2).contiguous()
    out = cb if levels is None else levels.to(device=z.device, dtype=torch.float32)
    return out[torch.bucketize(z.float().contiguous(), mids)]


def codebook_bits(codebook: torch.Tensor) -> torch.Tensor:
    """Bits to store a codebook: 16 per entry (fp16). Count it once per layer (KVQuant per-layer LUT)."""
    return torch.tensor(16.0 * codebook.numel(), dtype=torch.float32, device=codebook.device)


def quantize_to_codebook(x: torch.Tensor, codebook: torch.Tensor, *, dim: int = -1, group: int | None = None,
                         level: str | None = None, offset: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
                         levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-uniform quantization with per-group normalisation (KVQuant, Hooper et al. 2024, Sec. 3.4).

    z = (x - offset) / scale with offset = (max + min) / 2 and scale = (max - min) / 2 of each
    group (over the elements not in `exclude`), so z lies in [-1, 1]; every z is rounded to its
    nearest codebook entry c and x_hat = c * scale + offset. Given `offset`/`scale` (broadcastable
    to x, e.g. KVQuant's offline per-channel key ranges) they are used instead and cost no bits
    here (the caller counts them once). Bits: log2(len(codebook)) per element + 2 fp16 (offset,
    scale) per group when computed online. The codebook itself is not counted: see `codebook_bits`.
    `levels`: reconstruction values replacing the codebook's (see `round_to_codebook`).
    """
    k = codebook.numel()
    code = float(math.ceil(math.log2(k))) if k > 1 else 0.0
    meta = torch.zeros((), dtype=torch.float32, device=x.device)
    if offset is None and scale is None:
        offset, scale, n_groups = group_minmax(x, dim=dim, group=group, level=level, exclude=exclude)
        meta = meta + n_groups * (SCALE_BITS + ZERO_BITS)
    elif offset is None or scale is None:
        raise KVLabError("quantize_to_codebook: give both offset and scale, or neither")
    off, scl = _fp16(offset.float()), _fp16(scale.float()).clamp_min(1e-8)
    xh = round_to_codebook((x.float() - off) / scl, codebook, levels) * scl + off
    return xh.to(x.dtype), meta + code * x.numel()


def group_minmax(x: torch.Tensor, *, dim: int = -1, group: int | None = None, level: str | None = None,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """KVQuant's per-group normalisation: offset = (max + min) / 2, scale = (max - min) / 2 over the
    elements not in `exclude`, so (x - offset) / scale lies in [-1, 1]. Both fp16-rounded and
    expanded to x's shape; also returns the number of groups (2 fp16 numbers are stored per group).
    """
    xg, valid, restore = _groups(x, dim, group, level)
    xf = xg.float()
    keep = valid if exclude is None else (valid & ~_groups(exclude, dim, group, level)[0])
    big = torch.finfo(torch.float32).max
    mx = torch.where(keep, xf, torch.full_like(xf, -big)).amax(-1, keepdim=True)
    mn = torch.where(keep, xf, torch.full_like(xf, big)).amin(-1, keepdim=True)
    empty = ~keep.any(-1, keepdim=True)
    mx = torch.where(empty, xf.amax(-1, keepdim=True), mx)
    mn = torch.where(empty, xf.amin(-1, keepdim=True), mn)
    off = _fp16((mx + mn) / 2)
    scl = _fp16((mx - mn) / 2).clamp_min(1e-8)
    return restore(off.expand_as(xf)), restore(scl.expand_as(xf)), xg.shape[:-1].numel()


# =============================================================================================
# Dense-and-sparse outlier split
# =============================================================================================
def _rank(t: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of every element along the last axis (0 = first in the order), ties broken by position."""
    order = t.argsort(dim=-1, descending=descending, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(t.shape[-1], device=t.device).expand_as(order))


def split_outliers(x: torch.Tensor, ratio: float, *, dim: int = -1, group: int | None = None,
                   level: str | None = None, mode: str = "magnitude") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense-and-sparse split per vector/group: returns (dense, outlier mask).

    mode="magnitude" (KVQuant's per-vector dense-and-sparse, Hooper et al. 2024, Sec. 3.5): the
      k = ceil(ratio * n) elements of largest |x| of each group of n elements are outliers.
    mode="sides" (QAQ, Dong et al. 2024, Sec. 4.3; also KVQuant's online per-token thresholds at
      the ratio/2 and 1 - ratio/2 percentiles): the ceil(ratio/2 * n) smallest and the
      ceil(ratio/2 * n) largest values of each group are outliers.
    Counts are capped so that at least one element stays dense (ties are broken by position, so
    the counts are exact). `dense` equals x with every outlier replaced by the mean of its group's
    dense elements: min, max and mean of each group are then those of the dense part alone, so a
    quantizer run on `dense` (same grouping) gets statistics that exclude the outliers.
    Outliers are stored at fp16 + an int32 index: `outlier_bits(mask)`; put them back with
    `merge_outliers(x_hat, x, mask)`.
    """
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise KVLabError(f"split_outliers: ratio must be a number in [0, 1), got {ratio!r}")
    if mode not in ("magnitude", "sides"):
        raise KVLabError(f"split_outliers: mode must be 'magnitude' or 'sides', got {mode!r}")
    if ratio == 0.0:
        return x, torch.zeros_like(x, dtype=torch.bool)
    xg, valid, restore = _groups(x, dim, group, level)
    xf = xg.float()
    n = valid.sum(-1, keepdim=True).float()                  # [G, 1] real size of each group
    eps = 1e-9
    if mode == "magnitude":
        k = torch.minimum(torch.ceil(ratio * n - eps), n - 1)
        score = torch.where(valid, xf.abs(), torch.full_like(xf, -1.0))
        mask = _rank(score, descending=True) < k
    else:
        k = torch.minimum(torch.ceil(ratio / 2 * n - eps), torch.floor((n - 1) / 2))
        inf = torch.full_like(xf, float("inf"))
        low = _rank(torch.where(valid, xf, inf), descending=False) < k
        high = _rank(torch.where(valid, xf, -inf), descending=True) < k
        mask = low | high
    mask = mask & valid
    mu, _ = _masked_mean_std(xf, valid & ~mask)
    dense = torch.where(mask, mu.expand_as(xf), xf)
    return restore(dense).to(x.dtype), restore(mask)


def split_outliers_threshold(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Outliers = values outside [lower, upper] (broadcastable thresholds, e.g. KVQuant's offline
    per-channel key thresholds from calibration). Returns (dense, mask); dense replaces each
    outlier by the midpoint (lower + upper) / 2, which lies inside the range."""
    mask = (x < lower) | (x > upper)
    mid = ((lower + upper) / 2).to(x.dtype)
    return torch.where(mask, mid.expand_as(x), x), mask


def merge_outliers(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Put the full-precision outliers back: x where mask else x_hat (fp16-rounded, as stored)."""
    if mask is None:
        return x_hat
    return torch.where(mask, _fp16(x).to(x.dtype), x_hat)


def outlier_bits(mask: torch.Tensor | None) -> torch.Tensor:
    """Bits of the sparse part: (16-bit value + 32-bit index) per outlier (KVQuant's CSR layout)."""
    if mask is None:
        return torch.zeros((), dtype=torch.float32)
    return mask.sum().float() * (OUTLIER_VALUE_BITS + OUTLIER_INDEX_BITS)


# =============================================================================================
# Q-Norm (KVQuant)
# =============================================================================================
def qnorm_params(x_hat: torch.Tensor, x: torch.Tensor, *, dim: int = -1, group: int | None = None,
                 level: str | None = None, exclude: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The affine map a * x_hat + c that gives x_hat the mean and std of x, per group.

    a = sigma(x) / sigma(x_hat) (1 where sigma(x_hat) = 0), c = mu(x) - a * mu(x_hat), both fp16;
    statistics over the elements not in `exclude`. Returns (a, c, keep) in the grouped layout
    [..., n_groups, 1] (for level="layer": [1, 1, 1], i.e. two scalars).
    """
    hg, valid, _ = _groups(x_hat, dim, group, level)
    xg = _groups(x, dim, group, level)[0]
    keep = valid if exclude is None else (valid & ~_groups(exclude, dim, group, level)[0])
    mu_x, sd_x = _masked_mean_std(xg.float(), keep)
    mu_h, sd_h = _masked_mean_std(hg.float(), keep)
    a = torch.where(sd_h > 0, sd_x / sd_h.clamp_min(1e-30), torch.ones_like(sd_h))
    a = _fp16(a)
    c = _fp16(mu_x - a * mu_h)
    return a, c, keep


def qnorm(x_hat: torch.Tensor, x: torch.Tensor, *, dim: int = -1, group: int | None = None,
          level: str | None = None, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Norm (Hooper et al. 2024, KVQuant Sec. 3.6 / App. "Q-Norm"): after dequantization, match
    each group's mean and standard deviation to the pre-quantization ones,
        x_qn = (x_hat - mu(x_hat)) * sigma(x) / sigma(x_hat) + mu(x)  =  a * x_hat + c,
    removing the distribution shift low-bit quantization causes. Elements in `exclude` (outliers
    kept exact) are left untouched and excluded from the statistics.
    Bits: 2 fp16 numbers (a, c) per group. KVQuant's own code fits (a, c) once per layer at
    calibration (on its codebook); `kvlab.quant.methods.kvquant` does that, this is the online form.
    """
    a, c, keep = qnorm_params(x_hat, x, dim=dim, group=group, level=level, exclude=exclude)
    hg, _, restore = _groups(x_hat, dim, group, level)
    out = torch.where(keep, a * hg.float() + c, hg.float())
    n_groups = hg.shape[:-1].numel()
    return restore(out).to(x_hat.dtype), torch.tensor(float(n_groups * (SCALE_BITS + ZERO_BITS)), dtype=torch.float32,
                                                       device=x.device)


def quantile_along(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """The q-quantile of x along `dim` with linear interpolation (numpy's default), without
    `torch.quantile`'s input-size limit. q=0 / q=1 are the min / max."""
    xs = x.float().sort(dim).values
    n = x.shape[dim]
    pos = q * (n - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    frac = pos - lo
    a, b = xs.select(dim, lo), xs.select(dim, hi)
    return a + (b - a) * frac


# =============================================================================================
# Orthogonal rotations (QuaRot's Hadamard)
# =============================================================================================
_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _sylvester(n: int) -> torch.Tensor:
    """The +-1 Walsh-Hadamard matrix of order n = 2^a in natural (Sylvester) order,
    H[i, j] = (-1)^popcount(i & j): H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of the prime field GF(q) (chi(0) = 0)."""
    squares = {(a * a) % q for a in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, q) - torch.arange(q).view(q, 1)) % q
    return chi[idx]


def _paley(k: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order k from Paley's constructions over a prime q, or None.

    Paley I  (q = k - 1, q = 3 mod 4): H = I + S with S = [[0, 1^T], [-1, Q]] skew (S S^T = q I).
    Paley II (q = k/2 - 1, q = 1 mod 4): the symmetric conference matrix C = [[0, 1^T], [1, Q]] gives
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
    """
    q = k - 1
    if q % 4 == 3 and _is_prime(q):
        s = torch.zeros(k, k, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(k, dtype=torch.float64) + s
    if k % 2 == 0:
        q = k // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _hadamard_pm1(n: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of order n (float64, CPU): Sylvester for n = 2^a, else the Kronecker
    product of a Paley matrix of order m * 2^b (m the odd part of n, smallest b that works) with the
    Sylvester matrix of order n / (m * 2^b), as QuaRot's `get_hadK` pairs a fixed order-K matrix with
    a Walsh-Hadamard transform for non-powers of two."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KVLabError(f"hadamard_matrix: the order must be an integer >= 1, got {n!r}")
    two = n & -n                      # largest power of two dividing n
    if two == n:
        return _sylvester(n)
    k = n // two
    while k <= n:
        core = _paley(k)
        if core is not None:
            return torch.kron(core, _sylvester(n // k))
        k *= 2
    raise KVLabError(f"hadamard_matrix: kvlab builds no Hadamard matrix of order {n}: it builds orders 2^a "
                     f"(Sylvester) and 2^a times a Paley order (q + 1, q prime = 3 mod 4, or 2(q + 1), q prime "
                     f"= 1 mod 4), e.g. 12, 20, 24, 28, 36, 40, 48, 80, 96, 112; any Hadamard order is 1, 2 or a "
                     f"multiple of 4")


def hadamard_matrix(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Hadamard matrix H / sqrt(n) of order n: orthogonal (H H^T = I), every entry
    +-1/sqrt(n), so a vector's energy is spread evenly over all n coordinates (QuaRot's rotation,
    Ashkboos et al. 2024). For n = 2^a it is the Walsh-Hadamard matrix in natural order (what a fast
    Walsh-Hadamard transform applies; symmetric); other orders use a Paley x Sylvester Kronecker
    product (see `_hadamard_pm1`; a KVLabError names the orders it can build).

    Built once per (n, device, dtype) and cached: the returned tensor is shared, never modify it
    in place. Created outside inference mode, so it can be used in and out of it. Rotate in float32
    (the default): 1/sqrt(n) is not exact in bf16/fp16 for odd powers of two (n = 128: an error of
    up to 2^-9 per entry in bf16), so a low-precision H is not orthogonal to within the rounding of
    the rotated values; multiply the upcast tensor (`x.float() @ H`, as `kvlab/quant/methods/quarot.py` does).
    """
    key = (n, torch.device(device if device is not None else "cpu"), dtype)
    h = _HADAMARD.get(key)
    if h is None:
        pm1 = _hadamard_pm1(n)
        with torch.inference_mode(False):
            h = (pm1 / math.sqrt(n)).to(device=key[1], dtype=dtype)
        _HADAMARD[key] = h
    return h
