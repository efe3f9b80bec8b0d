"""KV statistics: plain, vectorised functions of captured tensors (notebooks/01_kv_statistics).

Inputs are what `kvlab.capture` returns: per layer a tensor `[batch, kv_heads, tokens, head_dim]`
(a list over layers, or one stacked `[layers, batch, kv_heads, tokens, head_dim]` tensor).
A *channel* is one (kv_head, dim) pair, numbered `head * head_dim + dim`; a *token vector* is one
head's `head_dim` numbers at one position. Every statistic is computed for all layers at once
(layers are stacked) with no Python loop over channels or tokens; results come back as CPU
tensors or pandas DataFrames in long format (one row per layer x tensor x statistic), ready for
seaborn.

    with kvlab.capture(lm, what=("k_pre", "k", "v")) as cap:
        lm.model(ids)
    kv = {w: cap[w] for w in ("k_pre", "k", "v")}
    analysis.magnitude_table(kv)            # |x| quantiles per layer
    analysis.channel_absmax_map(kv["k"])    # [layers, channels] heatmap data
    analysis.outlier_table(kv)              # outlier channels per layer, pre vs post RoPE
    analysis.token_range_table(kv)          # per-token ranges (max - min over head_dim)
    analysis.axis_error_table(kv)           # int-b error per token vs per channel
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .errors import KVLabError

LABELS = {"k_pre": "K pre-RoPE", "k": "K post-RoPE", "v": "V", "q": "Q"}
QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


def stack_layers(xs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Per-layer tensors -> one float32 CPU tensor [layers, batch, heads, tokens, head_dim]."""
    if torch.is_tensor(xs):
        if xs.dim() == 4:
            xs = xs[None]
        if xs.dim() != 5:
            raise KVLabError(f"expected [layers, batch, heads, tokens, head_dim], got shape {tuple(xs.shape)}")
        return xs.detach().float().cpu()
    xs = list(xs)
    if not xs:
        raise KVLabError("no layers given")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise KVLabError(f"layers differ in shape {sorted(shapes)}; analyse them separately")
    if len(next(iter(shapes))) != 4:
        raise KVLabError(f"expected per-layer tensors [batch, heads, tokens, head_dim], got {next(iter(shapes))}")
    return torch.stack([x.detach().float().cpu() for x in xs])


def _quantiles(flat: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles (linear interpolation) along the last axis of [rows, n]; no size limit (sort-based)."""
    s = flat.sort(-1).values
    n = s.shape[-1]
    pos = torch.tensor([float(q) * (n - 1) for q in qs])
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo
    return s[..., lo] * (1 - frac) + s[..., hi] * frac


# ----------------------------------------------------------------------------- magnitudes
def abs_quantiles(xs, qs: Sequence[float] = QUANTILES) -> torch.Tensor:
    """Quantiles of |x| over all elements of each layer: [layers, len(qs)]."""
    x = stack_layers(xs)
    return _quantiles(x.abs().reshape(x.shape[0], -1), qs)


def magnitude_table(tensors: Mapping[str, Sequence[torch.Tensor]], qs: Sequence[float] = QUANTILES):
    """Long DataFrame (layer, tensor, quantile, value) of |x| quantiles per layer for each named tensor."""
    import pandas as pd

    rows = []
    for name, xs in tensors.items():
        q = abs_quantiles(xs, qs)
        for layer in range(q.shape[0]):
            for j, qq in enumerate(qs):
                rows.append({"layer": layer, "tensor": LABELS.get(name, name), "quantile": float(qq),
                             "value": float(q[layer, j])})
    return pd.DataFrame(rows)


def histograms(xs, layers: Sequence[int] | None = None, bins: int = 121, limit: float | None = None):
    """Histograms of the values of some layers (default: every layer given) on one shared symmetric range.

    Returns (edges [bins + 1], densities [len(layers), bins]). `limit` defaults to the largest |x|
    among those layers; values beyond it fall into the end bins.
    """
    x = stack_layers(xs)
    layers = list(range(x.shape[0])) if layers is None else list(layers)
    x = x[layers].reshape(len(layers), -1)
    lim = float(limit) if limit is not None else float(x.abs().max().clamp_min(1e-8))
    edges = torch.linspace(-lim, lim, bins + 1)
    idx = torch.bucketize(x.clamp(-lim, lim), edges[1:-1])
    counts = torch.zeros(len(layers), bins).scatter_add_(1, idx, torch.ones_like(x))
    dens = counts / (counts.sum(1, keepdim=True) * (edges[1] - edges[0]))
    return edges, dens


# ----------------------------------------------------------------------------- channels
def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel absmax over batch and tokens: [..., heads, head_dim] for x [..., batch, heads, tokens, head_dim]."""
    return x.detach().abs().amax(dim=(-4, -2))


def channel_absmax_map(xs, relative: bool = False) -> torch.Tensor:
    """[layers, heads * head_dim]: per-channel absmax of every layer (channel = head * head_dim + dim).

    `relative=True` divides each layer's row by its median channel absmax (1 = a typical channel), so
    layers of different scale share one colour scale and outlier channels stand out.
    """
    m = channel_absmax(stack_layers(xs))
    m = m.reshape(m.shape[0], -1)
    return m / m.median(-1, keepdim=True).values.clamp_min(1e-12) if relative else m


def outlier_score(xs) -> torch.Tensor:
    """Per layer: largest channel absmax / median channel absmax (1 = no outlier channel). [layers]"""
    m = channel_absmax_map(xs)
    return m.amax(-1) / m.median(-1).values.clamp_min(1e-12)


def outlier_channels(xs, factor: float = 4.0) -> torch.Tensor:
    """Bool [layers, heads * head_dim]: channels whose absmax exceeds `factor` x the layer's median channel absmax."""
    m = channel_absmax_map(xs)
    return m > factor * m.median(-1, keepdim=True).values


def outlier_table(tensors: Mapping[str, Sequence[torch.Tensor]], factor: float = 4.0):
    """Per layer and tensor: outlier score (max / median channel absmax), number and fraction of
    outlier channels (absmax > `factor` x median) and the channels themselves."""
    import pandas as pd

    rows = []
    for name, xs in tensors.items():
        m = channel_absmax_map(xs)
        med = m.median(-1, keepdim=True).values.clamp_min(1e-12)
        out = m > factor * med
        score = (m.amax(-1, keepdim=True) / med).squeeze(-1)
        for layer in range(m.shape[0]):
            idx = out[layer].nonzero().flatten().tolist()
            rows.append({"layer": layer, "tensor": LABELS.get(name, name), "score": float(score[layer]),
                         "n_outliers": len(idx), "frac_outliers": len(idx) / m.shape[1], "channels": idx})
    return pd.DataFrame(rows)


def rope_pair_spread(k_pre, k) -> torch.Tensor:
    """How RoPE spreads a channel's magnitude onto its rotation partner, per layer.

    For every channel, the ratio absmax(post-RoPE) / absmax(pre-RoPE) is computed; returns
    [layers, heads * head_dim]. Rotation mixes dims i and i + head_dim/2 (the HF `rotate_half`
    layout), so a quiet partner of a loud pre-RoPE channel gets a ratio >> 1.
    """
    pre, post = channel_absmax_map(k_pre), channel_absmax_map(k)
    return post / pre.clamp_min(1e-12)


# ----------------------------------------------------------------------------- tokens
def token_ranges(x: torch.Tensor) -> torch.Tensor:
    """max - min over head_dim of every token vector: [..., batch, heads, tokens] for x [..., batch, heads, tokens, head_dim]."""
    x = x.detach()
    return x.amax(-1) - x.amin(-1)


def token_range_table(tensors: Mapping[str, Sequence[torch.Tensor]], qs: Sequence[float] = (0.5, 0.99, 1.0),
                      first: int = 1):
    """Per layer and tensor: quantiles of per-token ranges (over batch, heads and tokens) and the mean
    range of the first `first` tokens relative to the median (the attention-sink token stands out)."""
    import pandas as pd

    rows = []
    for name, xs in tensors.items():
        r = token_ranges(stack_layers(xs))                       # [L, b, h, t]
        q = _quantiles(r.reshape(r.shape[0], -1), qs)
        head = r[..., :first].mean(dim=(1, 2, 3))
        for layer in range(r.shape[0]):
            row = {"layer": layer, "tensor": LABELS.get(name, name)}
            row.update({f"q{qq:g}": float(q[layer, j]) for j, qq in enumerate(qs)})
            row["first_vs_median"] = float(head[layer] / q[layer, 0].clamp_min(1e-12)) if 0.5 in qs else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def token_range_profile(x: torch.Tensor) -> torch.Tensor:
    """Per-token range of one layer's [batch, heads, tokens, head_dim] averaged over batch and heads: [tokens]."""
    return token_ranges(x.detach().float()).mean(dim=(-3, -2))


# ----------------------------------------------------------------------------- what it means for quantization
def axis_error(xs, bits: int = 2, group: int | None = None) -> dict[str, torch.Tensor]:
    """Relative error ||x_hat - x|| / ||x|| per layer of asymmetric int-`bits` quantization with one
    scale per token vector ("token", groups along head_dim) vs one per channel ("channel", groups of
    `group` tokens, default all tokens). {"token": [layers], "channel": [layers]}."""
    from .quant.primitives import quantize_uniform

    x = stack_layers(xs)
    out = {}
    norm = x.pow(2).sum(dim=(1, 2, 3, 4)).sqrt().clamp_min(1e-12)
    for axis, dim in (("token", -1), ("channel", -2)):
        xh, _ = quantize_uniform(x, bits, dim=dim, group=group if axis == "channel" else None)
        out[axis] = (xh - x).pow(2).sum(dim=(1, 2, 3, 4)).sqrt() / norm
    return out


def axis_error_table(tensors: Mapping[str, Sequence[torch.Tensor]], bits: Sequence[int] = (2, 4),
                     group: int | None = None):
    """Long DataFrame (layer, tensor, bits, axis, rel_err) of `axis_error` for each tensor and bit width."""
    import pandas as pd

    rows = []
    for name, xs in tensors.items():
        for b in bits:
            err = axis_error(xs, b, group)
            for axis, e in err.items():
                rows += [{"layer": layer, "tensor": LABELS.get(name, name), "bits": int(b),
                          "axis": f"per {axis}", "rel_err": float(e[layer])} for layer in range(e.shape[0])]
    return pd.DataFrame(rows)
