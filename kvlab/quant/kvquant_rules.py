"""KVQuant rules that follow the authors' code, for `kvlab.quant.methods.kvquant`.

Upstream: github.com/SqueezeAILab/KVQuant at commit 57a238357f0ffe50084670fcd5781c9848f80ea2 (2024-07-09);
file:line references below are to that commit:

* `gradients/run-fisher.py` computes the Fisher information of the cached activations;
* `quant/kvquant/simquant_module_quantizer.py` ("SQM") holds calibration (`SimQuant.quantize`) and the
  simulated quantizer (`QuantLinearSim`, `get_outliers`, `quant_fn_nf`, `quant_fn_nuq_recon`);
* `quant/llama_simquant.py` wires them up (flags `--nuq --nf --fisher --norm --include_sparse
  --sparsity-threshold --cap_outliers --first_few_fp16 --nsamples --seqlen`).

Layouts here are kvlab's: calibration tensors [n_rows, kv_heads, T, head_dim]; a key or value "token
vector" is the whole k_proj / v_proj output of one token (kv_heads * head_dim numbers), as upstream
hooks those Linear layers.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch

UPSTREAM = "SqueezeAILab/KVQuant@57a2383"

# sensitivity weights of the k-means (Sec. 3.4): what multiplies each calibration value's squared error
FISHER = ("activation", "normalised", "none")

# NormalFloat's outermost quantile (SQM:645-646: "from https://arxiv.org/pdf/2306.06965.pdf", QLoRA's NF4)
NF_OFFSET = 0.5 * (1 / 32 + 1 / 30)

AUTHORS_CALIB_ROWS = 16      # llama_simquant.py:312 `--nsamples` default 16; run-fisher `--num_examples 16`
AUTHORS_CALIB_LEN = 2048     # quant/README.md and gradients/README.md: `--seqlen 2048`


def fisher_weights(grad: torch.Tensor | None, scale: torch.Tensor, rule: str) -> torch.Tensor | None:
    """Per-value k-means weights from dL/dA (A: the k_proj / v_proj output) and the normalisation scale.

    "activation": (dL/dA)^2, the authors' rule: run-fisher.py:285-286 stores `act.grad ** 2` of k_proj
        and v_proj, and SQM:508-519 passes it unchanged as KMeans `sample_weight` of the *normalised*
        values z = (A - offset) / scale.
    "normalised": (dL/dA * scale)^2 = (dL/dz)^2, the Fisher information of z itself (kvlab <= calibration v1).
    "none": plain k-means (SQM:520-528, no `--fisher`).
    The loss scale does not matter: upstream takes the row's *mean* cross-entropy (run-fisher.py:277-279),
    kvlab the row's sum; every row has the same length, so the weights differ by one constant factor.
    """
    if rule == "none" or grad is None:
        return None
    g = grad.float()
    if rule == "activation":
        return g * g
    if rule == "normalised":
        return (g * scale) ** 2
    raise ValueError(f"unknown fisher rule {rule!r}; one of {FISHER}")


def nf_signposts(bits: int) -> torch.Tensor:
    """The 2^b NormalFloat levels in [-1, 1] of `--nf` (SQM:634-695), ascending.

    With p0 = NF_OFFSET and h = 2^(b-1): the negative half is the N(0,1) quantiles at h probabilities evenly
    spaced from p0 to 1/2 (both included), divided by |Phi^-1(p0)| (so -1 .. 0); the positive half is the
    quantiles at h probabilities evenly spaced above 1/2 up to 1 - p0, divided by Phi^-1(1 - p0) (so .. 1).
    That is h - 1 negative levels, an exact 0 and h positive ones (asymmetric, like QLoRA's NF4). b >= 2
    (upstream divides by h - 1; QuantLinearSim takes bits 2..5, SQM:586-587).
    """
    b = int(bits)
    if b < 2:
        raise ValueError("NormalFloat needs bits >= 2")
    h = 2 ** (b - 1)
    nd = NormalDist()
    lo_q, hi_q = nd.inv_cdf(NF_OFFSET), nd.inv_cdf(1 - NF_OFFSET)
    neg = [nd.inv_cdf(NF_OFFSET + i * (0.5 - NF_OFFSET) / (h - 1)) / abs(lo_q) if i < h - 1 else 0.0
           for i in range(h)]
    pos = [nd.inv_cdf(0.5 + j * (0.5 - NF_OFFSET) / h) / hi_q for j in range(1, h + 1)]
    return torch.tensor(neg + pos, dtype=torch.float32)


def sink_tokens_mask(shape: torch.Size | tuple, sink: int, device=None) -> torch.Tensor:
    """True at the first `sink` tokens of every row of a [n, kv_heads, T, head_dim] calibration tensor
    (broadcastable bool [1, 1, T, 1]): the attention-sink tokens the authors leave out of k-means.

    SQM:490-495 marks rows i*2048 .. i*2048 + first_few_fp16 of every calibration sample as outliers
    before the k-means (and SQM:441-446 before the cap_outliers range); the Q-Norm statistics use the
    same mask (SQM:533-548). At inference they stay fp16 (SQM:75-76, 356-359), as kvlab's `sink` does.
    """
    T = shape[2]
    return (torch.arange(T, device=device) < sink).view(1, 1, T, 1)


def _token_vectors(x: torch.Tensor) -> torch.Tensor:
    """[n, H, T, D] -> [n, T, H*D]: one row per token over the layer's KV heads (the k_proj output)."""
    n, H, T, D = x.shape
    return x.transpose(1, 2).reshape(n, T, H * D)


def _from_token_vectors(y: torch.Tensor, shape) -> torch.Tensor:
    n, H, T, D = shape
    return y.reshape(n, T, H, D).transpose(1, 2)


def cap_count(outliers: float, width: int) -> int:
    """Outliers kept per key token and side under cap_outliers: ceil(rho/2 * H*D).

    Upstream hard-codes 21 at inference (SQM:66-67), i.e. ceil(0.005 * 4096) for LLaMA-7B at 1% (the only
    setting it was run at), and uses ceil((1 - t) * hidden) with t = 1 - rho/2 at calibration (SQM:413, 433).
    """
    return max(0, min(width, math.ceil(outliers / 2 * width - 1e-9)))


def cap_outlier_mask(z: torch.Tensor, mask: torch.Tensor, n_cap: int) -> torch.Tensor:
    """cap_outliers at inference (SQM:56-73): of the values outside the calibrated range (`mask`), keep per
    token vector only the `n_cap` largest z (above) and the `n_cap` smallest z (below) as sparse outliers;
    the others stay in the dense part (rounded to the nearest codebook entry). z: normalised keys."""
    zt, mt = _token_vectors(z.float()), _token_vectors(mask)
    k = min(n_cap, zt.shape[-1])
    inf = torch.full_like(zt, float("inf"))
    keep = torch.zeros_like(mt)
    if k > 0:
        up = torch.where(mt & (zt > 0), zt, -inf).topk(k, dim=-1).indices
        down = torch.where(mt & (zt < 0), zt, inf).topk(k, dim=-1, largest=False).indices
        keep.scatter_(-1, up, True)
        keep.scatter_(-1, down, True)
    return _from_token_vectors(keep & mt, z.shape)


def cap_fit_mask(k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_cap: int,
                 sink: torch.Tensor | None) -> torch.Tensor:
    """The calibration keys left out of k-means under cap_outliers (SQM:421-461, keys only per
    llama_simquant.py:266-273).

    Per token vector, the `n_cap` entries of largest |z| and the `n_cap` of smallest |z| (z normalised by
    the percentile thresholds lo/hi [H, D]) and the sink tokens (`sink` mask, if given) are replaced by
    their channel's median; the channel's min/max of that trimmed data give a range (usually wider than
    the percentile one), and the values outside it are excluded. Upstream then recomputes the percentile thresholds (SQM:463-474)
    and normalises with those, so the stored thresholds are unchanged: only this mask differs, and
    k-means also sees values with |z| > 1 (those that a capped cache will round, not keep).
    """
    n, H, T, D = k.shape
    lo, hi = lo.view(1, H, 1, D), hi.view(1, H, 1, D)
    zp, dist = (hi + lo) / 2, (hi - lo) / 2
    at = _token_vectors(((k - zp) / dist).abs())
    c = min(n_cap, at.shape[-1])
    trim = torch.zeros_like(at, dtype=torch.bool)
    if c > 0:
        trim.scatter_(-1, at.topk(c, dim=-1).indices, True)
        trim.scatter_(-1, at.topk(c, dim=-1, largest=False).indices, True)
    trim = _from_token_vectors(trim, k.shape)
    if sink is not None:
        trim = trim | sink
    med = k.permute(1, 3, 0, 2).reshape(H, D, -1).median(dim=-1).values.view(1, H, 1, D)
    trimmed = torch.where(trim, med, k)
    lo2, hi2 = trimmed.amin(dim=(0, 2), keepdim=True), trimmed.amax(dim=(0, 2), keepdim=True)
    zp2, dist2 = (hi2 + lo2) / 2, (hi2 - lo2) / 2
    return ((k - zp2) / dist2).abs() > 1
