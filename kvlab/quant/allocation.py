"""Bit choices shared by methods: QAQ's closed forms, PM-KVQ's budgeted allocation, token scores.

Everything here is a plain function of tensors (or of small host-side arrays for the once-per-model
allocation), so the rules can be unit-tested and plotted without a model.

QAQ (Dong et al. 2024, "QAQ: Quality Adaptive Quantization for LLM KV Cache", Sec. 4.1)
    The quantized cache is modelled as independent noise of standard deviation sigma_t per token.
    Keys (through the softmax, second-order Taylor expansion of the ratio):
        sigma_K^2 <= ln(L^3 / (L - 1) * eps_S^2 + 1) / ||q||^2
    Values (X_d = sum_t S_t V_td, equal error share per token):
        sigma_V <= eps_X / (sqrt(L) * |S_t|)
    A uniform grid whose error is uniform in [-D, D] has sigma = D / sqrt(3), so the largest error
    span allowed, written e_max = sqrt(12) * sigma (the authors' code calls it `max_error`), is
        keys:   e_max = sqrt(12 / q_norm * ln(L^3 / (L - 1) * eps_k^2 + 1))   (q_norm = ||q||^2)
        values: e_max = sqrt(12 / L) * eps_v / a_max
    and the bits per group follow from the group's range R:
        paper (eq. for B_t):  B = ceil(log2(R / (2 sqrt(3) sigma))) = ceil(log2(R / e_max))
        code  (src/quantizer.py): B = ceil(log2(R / (2 e_max) + 1))   (about one bit fewer)
    both clamped to [n_min, n_max].

PM-KVQ (Liu et al. 2025, "PM-KVQ: Progressive Mixed-precision KV Cache Quantization for Long-CoT
LLMs", block-wise memory allocation): minimise sum_l s[l, b_l] subject to
sum_l b_l * size_l <= budget. The authors solve this integer program with cvxpy; with ~30 layers
and 2-5 candidate widths an exact dynamic program over the (gcd-reduced) budget is instant.

Q-Hitter / H2O token scores: min-max normalisation and top-k keep masks along the token axis.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np
import torch

from ..errors import KVLabError

# ----------------------------------------------------------------------------------------------
# QAQ closed forms
# ----------------------------------------------------------------------------------------------


def _as_tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.float()
    dev = like.device if like is not None else None
    return torch.tensor(float(x), device=dev)


def qaq_key_emax(tokens, eps: float, q_norm) -> torch.Tensor:
    """Largest key error span e_max = sqrt(12 / q_norm * ln(L^3/(L-1) * eps^2 + 1)).

    `tokens` (L) is the number of tokens attended over; L < 2 is treated as 2 (the formula has a
    pole at L = 1). `q_norm` is the *squared* query norm ||q||^2 (the paper's sum_d Q_d^2; the
    authors' code uses the constant 300), a number or a tensor broadcastable to the groups.
    """
    q = _as_tensor(q_norm)
    L = max(float(tokens), 2.0)
    inner = math.log(L ** 3 / (L - 1.0) * float(eps) ** 2 + 1.0)
    return torch.sqrt(12.0 / q.clamp_min(1e-12) * inner)


def qaq_value_emax(tokens, eps: float, a_max) -> torch.Tensor:
    """Largest value error span e_max = sqrt(12 / L) * eps / a_max (a_max = attention the token gets)."""
    a = _as_tensor(a_max)
    L = max(float(tokens), 1.0)
    return math.sqrt(12.0 / L) * float(eps) / a.clamp_min(1e-12)


def qaq_bits(value_range: torch.Tensor, e_max: torch.Tensor, n_min: int, n_max: int,
             variant: str = "paper") -> torch.Tensor:
    """Bits per group from its range R and its error span e_max (int64 tensor, broadcast shape).

    paper: ceil(log2(R / e_max)); code: ceil(log2(R / (2 e_max) + 1)); both clamped to [n_min, n_max].
    A constant group (R = 0) gets n_min.
    """
    r = value_range.float()
    e = e_max.float() if torch.is_tensor(e_max) else torch.tensor(float(e_max), device=r.device)
    ratio = r / e.clamp_min(1e-30)
    if variant == "paper":
        raw = torch.log2(ratio.clamp_min(1e-30))
    elif variant == "code":
        raw = torch.log2(ratio / 2.0 + 1.0)
    else:
        raise KVLabError(f"qaq_bits: variant must be 'paper' or 'code', got {variant!r}")
    # a tiny tolerance keeps exact powers of two (log2 computed in float32) from rounding up
    bits = torch.ceil(raw - 1e-5)
    bits = torch.nan_to_num(bits, nan=float(n_max), posinf=float(n_max), neginf=float(n_min))
    return bits.clamp(n_min, n_max).to(torch.int64)


# ----------------------------------------------------------------------------------------------
# PM-KVQ budgeted allocation
# ----------------------------------------------------------------------------------------------


def allocate_bits(sensitivity, choices, budget: float, sizes=None) -> list[int]:
    """Per-layer bit widths minimising total sensitivity under a memory budget (exact DP).

    sensitivity: [layers, len(choices)] — sensitivity of layer l when stored at choices[c]
                 (PM-KVQ: K + V sensitivity of the block).
    choices:     candidate bit widths, e.g. (2, 4, 8).
    budget:      average bits per element over all layers (weighted by `sizes`).
    sizes:       elements per token of each layer (default: all equal).
    Returns the chosen width per layer with sum(b_l * size_l) <= budget * sum(size_l).
    Raises KVLabError when even the smallest width does not fit.
    """
    s = np.asarray(torch.as_tensor(sensitivity, dtype=torch.float64).cpu(), dtype=np.float64)
    choices = [int(c) for c in choices]
    if s.ndim != 2 or s.shape[1] != len(choices):
        raise KVLabError(f"allocate_bits: sensitivity must be [layers, {len(choices)}], got shape {tuple(s.shape)}")
    n_layers = s.shape[0]
    sizes = [1] * n_layers if sizes is None else [int(z) for z in sizes]
    if len(sizes) != n_layers or min(sizes) <= 0:
        raise KVLabError("allocate_bits: 'sizes' needs one positive integer per layer")
    weights = np.array([[c * z for c in choices] for z in sizes], dtype=np.int64)     # [L, C]
    g = int(reduce(math.gcd, weights.reshape(-1).tolist()))
    w = weights // g
    cap = int(math.floor(float(budget) * sum(sizes) / g + 1e-9))
    if int(w.min(1).sum()) > cap:
        raise KVLabError(f"allocate_bits: budget={budget} average bits is below the smallest choice "
                         f"{min(choices)}; raise 'budget' or add a smaller bit width to the choices")
    if cap > 5_000_000:
        raise KVLabError("allocate_bits: budget too fine-grained for the exact solver (layer sizes share no factor)")
    cap = min(cap, int(w.max(1).sum()))
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    pick = np.zeros((n_layers, cap + 1), dtype=np.int64)
    for l in range(n_layers):
        best = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int64)
        for c in range(len(choices)):
            wc = int(w[l, c])
            if wc > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wc:] = dp[: cap + 1 - wc] + s[l, c]
            # strict '<' keeps the earlier (smaller) choice on ties
            better = cand < best
            best = np.where(better, cand, best)
            arg = np.where(better, c, arg)
        dp, pick[l] = best, arg
    end = int(np.argmin(dp))          # cheapest over every feasible weight; ties: least memory
    out = [0] * n_layers
    for l in range(n_layers - 1, -1, -1):
        c = int(pick[l, end])
        out[l] = choices[c]
        end -= int(w[l, c])
    return out


# ----------------------------------------------------------------------------------------------
# token scores (H2O / Q-Hitter)
# ----------------------------------------------------------------------------------------------


def minmax(x: torch.Tensor, dim=-1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(x - min) / (max - min) along `dim` (int or tuple); a constant slice maps to 0.

    `valid` (bool, x's shape): min and max over the valid entries only (Q-Hitter: the tokens still in
    the cache); invalid entries are normalised with the same min and max. `dim=(-2, -1)` over
    [b, kv_heads, tokens] is Q-Hitter's normalisation over every head of the layer at once."""
    if valid is None:
        mn = x.amin(dim=dim, keepdim=True)
        mx = x.amax(dim=dim, keepdim=True)
    else:
        mn = x.masked_fill(~valid, float("inf")).amin(dim=dim, keepdim=True)
        mx = x.masked_fill(~valid, float("-inf")).amax(dim=dim, keepdim=True)
        ok = torch.isfinite(mn) & torch.isfinite(mx)          # a slice with nothing valid maps to 0
        mn, mx = torch.where(ok, mn, torch.zeros_like(mn)), torch.where(ok, mx, torch.zeros_like(mx))
    return (x - mn) / (mx - mn).clamp_min(1e-12)


def topk_mask(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the k highest scores along the last axis, never choosing `exclude`d positions."""
    t = scores.shape[-1]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0 or t == 0:
        return mask
    s = scores.float()
    if exclude is not None:
        s = s.masked_fill(exclude, float("-inf"))
        k = min(k, t)
    idx = torch.topk(s, min(k, t), dim=-1).indices
    mask.scatter_(-1, idx, True)
    if exclude is not None:
        # when fewer than k positions are selectable, topk returns excluded ones: drop them
        mask &= ~exclude
    return mask
