"""KVQuant: per-channel pre-RoPE keys, non-uniform datatypes, dense-and-sparse outliers, Q-Norm.

Hooper et al. 2024, "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization" (NeurIPS 2024). Defaults follow the authors' code (SqueezeAILab/KVQuant@57a2383;
the upstream rules and their file:line are in `kvlab.quant.kvquant_rules`). By section of the paper:

* Sec. 3.1 per-channel key quantization, values per token. As in the paper (which quantizes the
  k_proj / v_proj outputs), a value "token" is the whole vector of the layer's KV heads
  (kv_heads * head_dim numbers share one range and one outlier budget); a key channel is one
  (head, dim) pair.
* Sec. 3.2 pre-RoPE keys: `key_site = "pre_rope"`, the core hands keys before the rotary embedding.
* Sec. 3.3 offline calibration of the key ranges (`k_scale="calib"`, the paper's choice): for every
  layer, KV head and channel, thresholds lo/hi = the rho/2 and 1 - rho/2 percentiles of the
  calibration keys (rho = `outliers`; min/max when rho = 0). Keys are normalised with these fixed
  numbers, z = (k - (hi + lo)/2) / ((hi - lo)/2), so a key can be quantized the moment it arrives
  (`token_group` 1). Values use online per-token ranges (their outliers vary per token).
  `k_scale="online"` instead takes per-channel min/max over groups of `group` tokens (KIVI-like,
  no calibration needed for int; `token_group = group`).
* Sec. 3.4 nuqX: a per-layer non-uniform datatype, 2^b centroids of a k-means on the normalised
  calibration activations weighted per value by `fisher` (see `kvquant_rules.fisher_weights`):
  "activation" = (dL/dA)^2, the authors' (default); "normalised" = (dL/dA * scale)^2, kvlab's former
  default; "none" = plain k-means. `nf=True`: the fixed NormalFloat levels of the authors' `--nf`
  instead (`kvquant_rules.nf_signposts`, no k-means, no stored codebook). `nuq=False`: 2^b evenly
  spaced levels in [-1, 1] (= asymmetric min-max int-b). The k-means engine, `kmeans_impl`: "sklearn"
  (the default) = the authors' call (`sklearn_codebook`): scikit-learn `KMeans(n_clusters=2^b,
  random_state=0, n_init="auto", max_iter=50).fit(z, sample_weight=fisher)` on CPU float32,
  SqueezeAILab/KVQuant@57a2383 benchmarking/kvquant/simquant_module_quantizer.py:511-528 (deployment/kvquant/
  has the same lines), i.e. k-means++ seeded with 0 (one init under n_init="auto") and sklearn's tol=1e-4
  stop; "lloyd" = kvlab's weighted 1-D Lloyd, 50 iterations from a deterministic weighted-quantile init,
  batched on the model's device (`kvlab.quant.primitives.kmeans_codebook`; kvlab's default before
  the switch, so k-means spec strings stored without `kmeans_impl` meant "lloyd"). Both see the
  points `kmeans_points` allows: None (the default) every point, as upstream (6.3M per layer at
  16 x 2048 on SmolLM2-135M: about a minute per config on one CPU core); an integer n a random
  subsample of n per layer, kept in the authors' order (2^20 was kvlab's default before, so k-means
  specs stored without `kmeans_points` meant 2^20).
* Sec. 3.5 per-vector dense-and-sparse: keys whose value falls outside their channel's calibrated
  [lo, hi] (rho of the calibration values per channel), and per value vector the ceil(rho/2 * D)
  smallest and largest entries, D = kv_heads * head_dim (online, the rho/2 and 1 - rho/2
  percentiles), are kept in fp16 with an int32 index each; the dense part's range excludes them.
  (`k_scale="online"`: per key channel group, the same smallest/largest rule.) `cap_outliers`: the
  authors' `--cap_outliers`: per key token at most ceil(rho/2 * D) outliers above and as many below
  (the most extreme), the rest are rounded; calibration then leaves out of k-means only the keys
  beyond a per-channel range trimmed of each token's extremes (`kvquant_rules.cap_*`).
* Q-Norm (App. "Q-Norm"): match the mean and std of the dequantized normalised activations to the
  pre-quantization ones. As in the authors' code this is fitted once per layer at calibration:
  values are still assigned to the nearest codebook entry c_i but reconstructed as a * c_i + b
  (2 fp16 numbers per layer; `kvlab.quant.primitives.qnorm` is the online, per-group form).
* Attention-sink awareness (App. "attention sink"): the first `sink` tokens stay fp16 (kept and
  accounted by the core) and, as upstream, are left out of the k-means and the Q-Norm statistics
  of every calibration row (`sink_in_fit=True` keeps them in, kvlab's former behaviour).
* Calibration text: `calib_rows` rows of `calib_len` tokens, the authors' 16 x 2048 by default; None
  takes the caller's (`kvlab.evaluate`: `EvalSpec.calib_tokens` in rows of its window). This field wins
  over the caller's through `calibration_text`, read by `kvlab.calibration` (explicit `ids` win over both).
  Cost, measured on the 2-core CPU box (1 torch thread, two other jobs running) with SmolLM2-135M:
  the 16 x 2048 capture with gradients took 12-18 min (35-105 s a row under load) and ~7.5 GB of RAM,
  then each config's fit about a minute (scikit-learn k-means on all 6.3M values per layer; ~15 s on a
  2^20 subsample); at the evaluator's 4 x 512 it is ~1.5 min + less than a minute. Fits are cached on disk (`kvlab.calibration`), so this is paid once per
  model, calibration text and config (and one capture serves every config of a `calibrate_many`).

Bits: b per element + outliers (16 + 32 each) + 2 fp16 (offset, scale) per value token (and per
key channel group with `k_scale="online"`) + once per layer (on the layer's first chunk, i.e.
`ctx.start <= sink`): the 2^b fp16 codebook (`nuq`, not `nf`), Q-Norm's 2 fp16 (`qnorm`) and 2 fp16
thresholds per key channel and head (`k_scale="calib"`).
LLaMA-7B Wikitext-2 ppl (paper Table 1): fp16 5.68; int4 5.98, nuq4 5.72, nuq4-1% 5.69;
int3 10.87, nuq3 5.87, nuq3-1% 5.75; int2 11779, nuq2 7.23, nuq2-1% 6.01.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import KVLabError
from ..base import CalibrationNeeds, Captured, LayerContext, Method, Quantized, check_choice, check_range
from ..kvquant_rules import (AUTHORS_CALIB_LEN, AUTHORS_CALIB_ROWS, FISHER, cap_count, cap_fit_mask,
                             cap_outlier_mask, fisher_weights, nf_signposts, sink_tokens_mask)
from ..primitives import (SCALE_BITS, ZERO_BITS, _fp16, group_minmax, kmeans_codebook, outlier_bits,
                          quantile_along, quantize_to_codebook, round_to_codebook, split_outliers,
                          uniform_codebook)
from ..registry import preset, register

K_SCALES = ("calib", "online")
KMEANS_IMPLS = ("lloyd", "sklearn")
CALIB_VERSION = 2             # 2: sink tokens out of the fit, fisher rules by name, nf, cap_outliers
MAX_KMEANS_POINTS = 1 << 20   # kvlab's former k-means subsample per layer (`kmeans_points`; fits keyed without it)


_NF_LEVELS: dict[tuple[int, torch.device], torch.Tensor] = {}


def sklearn_codebook(values: torch.Tensor, bits: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KVQuant's NUQ codebook fitted as the authors do: scikit-learn `KMeans(n_clusters=2^b, random_state=0,
    n_init="auto", max_iter=50).fit(values, sample_weight=weights)` on CPU float32 (SqueezeAILab/KVQuant@57a2383
    benchmarking/kvquant/simquant_module_quantizer.py:511-528; without weights their call :521-528 passes
    none, the same as sample_weight=None). The centroids are then sorted and fp16-rounded as
    `kvlab.quant.primitives.kmeans_codebook`'s. `values` [n] (1-D), `weights` [n] or None; returns [2^b]
    float32 on values' device. scikit-learn's OpenMP threads are limited to torch's thread count. k-means++
    uses `sample_weight` in its seeding from scikit-learn 1.3 on (earlier versions seeded unweighted), so the
    authors' own centroids also depend on their scikit-learn version (not pinned upstream)."""
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise KVLabError("kvquant: kmeans_impl=sklearn needs scikit-learn: pip install scikit-learn "
                         "(or use kmeans_impl=lloyd, kvlab's own k-means)") from None
    k = 2 ** int(bits)
    x = values.detach().reshape(-1, 1).float().cpu().numpy()
    if x.shape[0] < k:
        raise KVLabError(f"kvquant: kmeans_impl=sklearn needs at least {k} calibration values per layer, got "
                         f"{x.shape[0]}")
    sw = None if weights is None else weights.detach().reshape(-1).float().cpu().numpy()
    with threadpool_limits(limits=max(1, torch.get_num_threads())):
        km = KMeans(n_clusters=k, random_state=0, n_init="auto", max_iter=50).fit(x, sample_weight=sw)
    c = torch.from_numpy(km.cluster_centers_.reshape(-1).astype("float32"))
    return _fp16(c).sort().values.to(values.device)


def _nf_levels(bits: int, device) -> torch.Tensor:
    """NormalFloat levels on `device`, made once per width and device (read-only)."""
    key = (int(bits), torch.device(device))
    if key not in _NF_LEVELS:
        with torch.inference_mode(False):         # an ordinary tensor, usable inside and outside inference mode
            _NF_LEVELS[key] = nf_signposts(bits).to(device)
    return _NF_LEVELS[key]


@register
@dataclass(frozen=True)
class KVQuant(Method):
    """KVQuant: pre-RoPE per-channel keys, per-token values, `bits`-bit NUQ (k-means, or NormalFloat with
    `nf`) or int datatype, `outliers` fraction kept fp16 (dense-and-sparse, optionally `cap_outliers`),
    optional Q-Norm, `sink` fp16 first tokens; calibrated on `calib_rows` x `calib_len` tokens."""

    name = "kvquant"
    key_site = "pre_rope"
    # `fisher` is always in the spec: its default changed (kvlab <= 0.x weighted k-means by
    # (dL/dA * scale)^2 and kept the sink in the fit), so results stored under the old spec strings
    # ("kvquant:bits=2,outliers=0.01") are never read as the authors' rule's. So is `kmeans_impl` for a
    # fitted codebook: its default became the authors' scikit-learn call, and k-means specs stored before
    # ("kvquant:bits=2,fisher=activation,outliers=0.01") meant kvlab's Lloyd; and `kmeans_points`, whose
    # default became every point (specs stored without it meant a 2^20 subsample)
    @property
    def spec_always(self) -> tuple[str, ...]:
        return ("bits", "fisher", "kmeans_impl", "kmeans_points") if self.kmeans else ("bits", "fisher")

    bits: int = 4
    nuq: bool = True
    fisher: str = "activation"
    outliers: float = 0.0
    qnorm: bool = False
    sink: int = 1
    k_scale: str = "calib"
    group: int | None = None          # k_scale="online" only: tokens per key channel group
    nf: bool = False
    cap_outliers: bool = False
    sink_in_fit: bool = False
    kmeans_impl: str = "sklearn"      # the authors' scikit-learn KMeans call (`sklearn_codebook`); "lloyd": kvlab's
    kmeans_points: int | None = None  # points per layer k-means sees (None: all, as upstream; n: a subsample)
    calib_rows: int | None = AUTHORS_CALIB_ROWS
    calib_len: int | None = AUTHORS_CALIB_LEN

    # ------------------------------------------------------------------ config
    def __post_init__(self) -> None:
        if self.fisher is False or (isinstance(self.fisher, str) and self.fisher.lower() == "false"):
            object.__setattr__(self, "fisher", "none")      # `fisher=false` specs (plain k-means) keep working
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "bits", self.bits, 1, 8, integer=True)
        for f in ("nuq", "qnorm", "nf", "cap_outliers", "sink_in_fit"):
            check_choice(self.name, f, getattr(self, f), (True, False))
        if self.fisher is True or self.fisher == "true":
            raise KVLabError(f"{self.name}: 'fisher' names the k-means weights since calibration v2; 'true' is "
                             "ambiguous: use fisher=activation ((dL/dA)^2, the authors', the default) or "
                             "fisher=normalised ((dL/dA * scale)^2, kvlab's former default)")
        check_choice(self.name, "fisher", self.fisher, FISHER)
        check_range(self.name, "outliers", self.outliers, 0.0, 1.0, hi_open=True)
        check_choice(self.name, "k_scale", self.k_scale, K_SCALES)
        check_choice(self.name, "kmeans_impl", self.kmeans_impl, KMEANS_IMPLS)
        if self.kmeans_points is not None:
            check_range(self.name, "kmeans_points", self.kmeans_points, 2 ** self.bits, 1 << 40, integer=True)
        for f in ("calib_rows", "calib_len"):
            if getattr(self, f) is not None:
                check_range(self.name, f, getattr(self, f), 1 if f == "calib_rows" else 2, 1 << 20, integer=True)
        if self.group is not None:
            check_range(self.name, "group", self.group, 1, 1 << 20, integer=True)
            if self.k_scale != "online":
                raise KVLabError(f"{self.name}: 'group' only applies with k_scale=online "
                                 f"(calibrated key ranges need no token groups); drop it or set k_scale=online")
        if self.nf:
            if not self.nuq:
                raise KVLabError(f"{self.name}: 'nf' (NormalFloat levels) is a non-uniform datatype; drop nuq=false")
            if self.bits < 2:
                raise KVLabError(f"{self.name}: 'nf' needs bits >= 2 (the authors' NormalFloat has 2..5)")
            if self.qnorm:
                raise KVLabError(f"{self.name}: 'qnorm' applies to the k-means datatype (the authors' NormalFloat "
                                 "path has no Q-Norm); drop qnorm=true or nf=true")
        if self.cap_outliers and (self.outliers <= 0 or self.k_scale != "calib"):
            raise KVLabError(f"{self.name}: 'cap_outliers' caps the calibrated key outliers; it needs outliers > 0 "
                             "and k_scale=calib")

    @property
    def kmeans(self) -> bool:
        """Whether the datatype is a fitted k-means codebook (nuq without nf)."""
        return self.nuq and not self.nf

    @property
    def uses_fisher(self) -> bool:
        return self.kmeans and self.fisher != "none"

    @property
    def needs_calibration(self) -> bool:
        return self.kmeans or self.qnorm or self.k_scale == "calib"

    @property
    def token_group(self) -> int:
        return (self.group or 1) if self.k_scale == "online" else 1

    def _codebook(self, cal: dict, kind: str, layer: int, device) -> torch.Tensor:
        if self.nf:
            return _nf_levels(self.bits, device)
        name = f"{kind}_cb"
        return cal[name][layer] if name in cal else uniform_codebook(self.bits, device)

    # ------------------------------------------------------------------ normalisation
    def _normalise(self, x: torch.Tensor, kind: str, lo=None, hi=None):
        """Returns (offset, scale, outlier mask or None, online metadata bits) for x (KVQuant Sec. 3.3/3.5).

        offset/scale broadcast to x; (x - offset) / scale lies in [-1, 1] except at outliers
        (which dense-and-sparse keeps exact) or, without outliers, at calibrated-range clipping.
        The key mask is the plain one (outside [lo, hi]); `cap_outliers` is applied by the caller.
        """
        rho = float(self.outliers)
        if kind == "k" and self.k_scale == "calib":
            lo = lo.to(device=x.device, dtype=torch.float32)
            hi = hi.to(device=x.device, dtype=torch.float32)
            off, scl = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-8)
            mask = ((x < lo) | (x > hi)) if rho > 0 else None
            return off, scl, mask, torch.zeros((), device=x.device)
        if kind == "k":       # online per-channel ranges over groups of `group` tokens
            xs, kw, back = x, dict(dim=-2, group=self.group), (lambda t: t)
        else:                 # per token over all KV heads of the layer (the v_proj output vector)
            xs, kw, back = x.transpose(1, 2), dict(level="head"), (lambda t: t.transpose(1, 2))
        if rho > 0:
            dense, mask = split_outliers(xs, rho, mode="sides", **kw)
        else:
            dense, mask = xs, None
        off, scl, n_groups = group_minmax(dense, **kw)
        meta = torch.tensor(float(n_groups * (SCALE_BITS + ZERO_BITS)), device=x.device)
        return back(off), back(scl), (None if mask is None else back(mask)), meta

    # ------------------------------------------------------------------ calibration
    def calibration_text(self, n_tokens: int, window: int) -> tuple[int, int]:
        """(tokens, row length) of the calibration text for a caller offering `n_tokens` in rows of `window`:
        `calib_rows` x `calib_len` (the authors' 16 x 2048), each None = the caller's."""
        w = self.calib_len or window
        return (self.calib_rows * w if self.calib_rows else n_tokens), w

    def calibration_needs(self, calib_tokens: int) -> CalibrationNeeds | None:
        """Pre-RoPE keys and values of every layer, row by row, with dL/dK and dL/dV (L = the row's
        summed next-token cross-entropy) when the codebook is Fisher-weighted."""
        if not self.needs_calibration:
            return None
        return CalibrationNeeds(what=("k_pre", "v"), grads=self.uses_fisher, loss="row_sum", to_cpu=True)

    def calibration_key(self) -> dict:
        """The fields that change calibration results (the calibration text is keyed by its token ids)."""
        fields = ("bits", "nuq", "fisher", "outliers", "qnorm", "sink", "k_scale", "group", "nf", "cap_outliers",
                  "sink_in_fit")
        key = {"method": self.name, "version": CALIB_VERSION, **{f: getattr(self, f) for f in fields}}
        # the k-means fields only where there is a k-means, and only away from the values fits were cached under
        # before they existed (kvlab's Lloyd on a 2^20 subsample), so those fits stay valid
        if self.kmeans and self.kmeans_impl != "lloyd":
            key["kmeans_impl"] = self.kmeans_impl
        if self.kmeans and self.kmeans_points != MAX_KMEANS_POINTS:
            key["kmeans_points"] = self.kmeans_points
        return key

    def fit(self, captured: Captured) -> dict[str, torch.Tensor]:
        """Calibration tensors from a capture (see `fit_tensors`)."""
        grads = captured.grads or {}
        return self.fit_tensors(captured.tensors["k_pre"], captured.tensors["v"], grads.get("k_pre"), grads.get("v"))

    def fit_tensors(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                    kgrads: list[torch.Tensor] | None = None, vgrads: list[torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
        """Calibration from captured tensors: per layer `keys[l]` (pre-RoPE) and `values[l]`,
        [n, kv_heads, T, head_dim] (n rows each starting at position 0), with optional gradients
        dL/dK, dL/dV of the same shapes. Returns {"k_cb", "v_cb": [L, 2^b] codebooks in the normalised
        domain (k-means only), "k_lo", "k_hi": [L, H, D] key thresholds (k_scale=calib), "k_qn", "v_qn":
        [L, 2] Q-Norm (a, b) (qnorm)}; a fitted method is `method.with_state(tensors)`."""
        if self.uses_fisher and (kgrads is None or vgrads is None):
            raise KVLabError(f"{self.spec}: fisher={self.fisher} needs the gradients dL/dK and dL/dV")
        rho = float(self.outliers)
        out: dict[str, list[torch.Tensor]] = {"k_cb": [], "v_cb": [], "k_lo": [], "k_hi": []}
        for layer, (k, v) in enumerate(zip(keys, values)):
            k, v = k.float(), v.float()
            sink = None if self.sink_in_fit or not self.sink else sink_tokens_mask(k.shape, self.sink, k.device)
            lo = hi = None
            if self.k_scale == "calib":
                # stored as fp16 (as upstream does at inference, SQM:612-613); the fit itself normalises
                # and picks outliers with the exact percentiles, as upstream's calibration (SQM:465-488)
                flat = k.permute(1, 3, 0, 2).reshape(k.shape[1], k.shape[3], -1)   # [H, D, n*T]
                lo = quantile_along(flat, rho / 2, -1)
                hi = quantile_along(flat, 1 - rho / 2, -1)
                out["k_lo"].append(_fp16(lo))
                out["k_hi"].append(_fp16(hi))
            if not (self.kmeans or self.qnorm):
                continue
            for kind, x, g in (("k", k, kgrads), ("v", v, vgrads)):
                bcast = None if lo is None else (lo[None, :, None, :], hi[None, :, None, :])
                off, scl, mask, _ = self._normalise(x, kind, *(bcast or (None, None)))
                if kind == "k" and self.cap_outliers:
                    mask = cap_fit_mask(x, lo, hi, cap_count(rho, x.shape[1] * x.shape[3]), sink)
                z = (x - off) / scl
                drop = torch.zeros_like(z, dtype=torch.bool) if mask is None else mask
                keep = ~(drop | sink) if sink is not None else ~drop
                w = fisher_weights(g[layer].to(z.device), scl, self.fisher) if self.uses_fisher else None
                cb, qn = self._layer_codebook(z, keep, w, seed=2 * layer + (kind == "v"))
                if cb is not None:
                    out[f"{kind}_cb"].append(cb)
                if qn is not None:
                    out.setdefault(f"{kind}_qn", []).append(qn)
        return {name: torch.stack(ts) for name, ts in out.items() if ts}

    def _layer_codebook(self, z: torch.Tensor, keep: torch.Tensor, w: torch.Tensor | None, seed: int):
        """(k-means codebook or None, Q-Norm (a, b) or None) from the kept normalised values of one layer,
        z / keep / w [n, kv_heads, T, head_dim]."""
        authors = self.kmeans and self.kmeans_impl == "sklearn"
        if w is not None:
            w = w.expand_as(z)
        if authors:
            # k-means++ seeding draws points by index, so the order matters: the authors flatten the
            # [rows * T, hidden] activations token-major (SQM:500-528), i.e. [n, T, kv_heads, head_dim]
            z, keep = z.transpose(1, 2), keep.transpose(1, 2)
            w = None if w is None else w.transpose(1, 2)
        zs = z[keep]
        ws = None if w is None else w[keep]
        limit = self.kmeans_points
        if limit is not None and zs.numel() > limit:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            idx = torch.randperm(zs.numel(), generator=gen)[:limit]
            if authors:
                idx = idx.sort().values      # the subsample in the authors' order
            idx = idx.to(zs.device)
            zs = zs[idx]
            ws = None if ws is None else ws[idx]
        cb = None
        if self.kmeans:
            if ws is not None and not bool((ws > 0).any()):
                ws = None     # no gradient signal (e.g. a layer the loss does not reach): plain k-means
            if self.kmeans_impl == "sklearn":
                cb = sklearn_codebook(zs, self.bits, ws)
            else:
                cb = kmeans_codebook(zs, self.bits, ws)
        qn = None
        if self.qnorm:
            # Q-Norm: reconstruct with a * c_i + b so the layer's dequantized normalised values have
            # the mean/std of the originals; decisions keep the codebook's midpoints (App. Q-Norm;
            # upstream SQM:532-548, statistics over the values k-means saw)
            zh = round_to_codebook(zs, cb if cb is not None else uniform_codebook(self.bits, zs.device))
            a = zs.std(unbiased=False) / zh.std(unbiased=False).clamp_min(1e-12)
            b = zs.mean() - a * zh.mean()
            qn = _fp16(torch.stack([a, b])).cpu()
        return (None if cb is None else cb.cpu()), qn

    # ------------------------------------------------------------------ quantization
    def encoding(self, x: torch.Tensor, ctx: LayerContext) -> dict:
        """What `quantize` stores x with (also read by `kvlab.pack`): {"codebook": [2^b] decision levels,
        "levels": reconstruction levels (Q-Norm) or None, "qnorm": (a, b) or None, "offset", "scale":
        broadcastable to x (before fp16 rounding), "mask": outliers or None, "meta_bits": online metadata
        bits, "lo", "hi": calibrated key thresholds [1, H, 1, D] or None}."""
        cal = self.fitted().on(x.device) if self.needs_calibration else {}
        layer = ctx.layer
        lo = hi = None
        if ctx.kind == "k" and self.k_scale == "calib":
            lo, hi = cal["k_lo"][layer][None, :, None, :], cal["k_hi"][layer][None, :, None, :]
            if lo.shape[1] != x.shape[1] or lo.shape[-1] != x.shape[-1]:
                raise KVLabError(f"{self.name}: calibration has {lo.shape[1]} heads x {lo.shape[-1]} dims for layer "
                                 f"{layer}, got keys of shape {tuple(x.shape)}; recalibrate on this model")
        cb = self._codebook(cal, ctx.kind, layer, x.device)
        off, scl, mask, bits = self._normalise(x, ctx.kind, lo, hi)
        if mask is not None and ctx.kind == "k" and self.cap_outliers:
            n_cap = cap_count(float(self.outliers), x.shape[1] * x.shape[3])
            mask = cap_outlier_mask((x.float() - off) / scl, mask, n_cap)
        levels = qn = None
        if self.qnorm:
            qn = cal[f"{ctx.kind}_qn"][layer]
            a, b = qn
            levels = a * cb + b
        return {"codebook": cb, "levels": levels, "qnorm": qn, "offset": off, "scale": scl, "mask": mask,
                "meta_bits": bits, "lo": lo, "hi": hi}

    def quantize(self, x: torch.Tensor, ctx: LayerContext) -> Quantized:
        e = self.encoding(x, ctx)
        cb, mask, bits, lo = e["codebook"], e["mask"], e["meta_bits"], e["lo"]
        xh, code_bits = quantize_to_codebook(x, cb, offset=e["offset"], scale=e["scale"], levels=e["levels"])
        if mask is not None:
            xh = torch.where(mask, _fp16(x).to(x.dtype), xh)
            bits = bits + outlier_bits(mask).to(x.device)
        bits = bits + code_bits
        if ctx.start <= self.sink_tokens:          # the layer's first chunk: per-layer tables, once
            per_layer = 0.0
            if self.kmeans:
                per_layer += 16.0 * cb.numel()      # the layer's fp16 codebook (LUT); NF's levels are fixed
            if self.qnorm:
                per_layer += 2 * 16.0               # Q-Norm's (a, b)
            if lo is not None:
                per_layer += 2 * 16.0 * lo.numel()
            bits = bits + per_layer
        return Quantized(xh, bits)


for _b in (4, 3, 2):
    preset(f"kvquant-nuq{_b}", f"kvquant:bits={_b}")
    preset(f"kvquant-nuq{_b}-1%", f"kvquant:bits={_b},outliers=0.01")
    preset(f"kvquant-nuq{_b}-qnorm", f"kvquant:bits={_b},qnorm=true")
    preset(f"kvquant-nuq{_b}-1%-qnorm", f"kvquant:bits={_b},outliers=0.01,qnorm=true")
    preset(f"kvquant-nf{_b}", f"kvquant:bits={_b},nf=true")
    preset(f"kvquant-nf{_b}-1%", f"kvquant:bits={_b},outliers=0.01,nf=true")
    preset(f"kvquant-int{_b}", f"kvquant:bits={_b},nuq=false")
