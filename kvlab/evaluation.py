"""Evaluation protocols (docs/design.md section 3): run a model under a method and return metrics.

* `protocol="fake"` (teacher forced): one forward per window; every position attends to quantized
  K/V of every position, itself included (KVQuant's and KIVI's perplexity protocol).
* `protocol="prefill-decode"`: each window's first `prefill` tokens are prefilled at full
  precision and stored quantized; the rest are scored against that cache (QAQ's evaluator, and
  how a deployed cache behaves). HF QuantizedCache comparators run here.
* `protocol="decode"`: the prefill as in prefill-decode, then the continuation fed `decode_chunk`
  tokens per forward (1: a deployed decode; every per-step rule of the method runs at every step),
  each token scored against the cache as the method maintains it at that step; the summary adds
  `avg_bits_step_mean` and `avg_bits_end` (bits of the cache each step read).

KL divergence and top-1 agreement compare with the same model's fp logits on the same tokens;
those are computed once per (model, data) and cached on disk (`kvlab.diskcache`, folder
`reference/`, keyed by the model's name/config/weights fingerprint, the token ids, the scored
positions, dtype and device type), so every process of a sweep reuses them; in memory the last few
are kept too. The logits are stored as the model produced them (fp32 on CPU: 0.2 GB per 1,000 scored
tokens of a 49k vocabulary); `KVLAB_REFERENCE_CACHE=0` keeps them in memory only.

`attn_rel_err` (with `EvalSpec(attn_error=True)`, the default) is the per-layer attention-output
error at the same queries, ||A(q, K^, V^) - A(q, K, V)|| / ||A(q, K, V)||, averaged over layers:
see `kvlab.quantize(..., attn_error=True)`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from . import data as data_mod
from . import diskcache
from .calibration import calibrate
from .errors import KVLabError
from .hooks import quantize
from .protocols import PROTOCOLS, check_protocol
from .metrics import kl_to_reference, perplexity, token_nll, top1_agreement
from .models import LoadedModel
from .quant.base import Method
from .quant.registry import parse
from .traces import build_trace

_FP_LOGITS: dict[tuple, torch.Tensor] = {}
_FP_LOGITS_MAX = 4


@dataclass
class EvalSpec:
    """What to evaluate on: corpus, token budget, window, stride, protocol and prefill split."""

    data: str = "wiki"
    n_tokens: int = 2048
    window: int = 512
    stride: int | None = None
    protocol: str = "fake"
    prefill: int | None = None          # prefill-decode / decode: tokens prefilled per window (default window // 2)
    calib_tokens: int = 2048            # calibration tokens for methods that need them (taken after the eval range)
    attn_error: bool = True             # also measure the per-layer attention-output error (attn_rel_err)
    decode_chunk: int = 1               # decode: continuation tokens per forward (> 1 is an approximation)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise KVLabError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not isinstance(self.decode_chunk, int) or isinstance(self.decode_chunk, bool) or self.decode_chunk < 1:
            raise KVLabError(f"decode_chunk must be an int >= 1 (tokens per forward), got {self.decode_chunk!r}")
        if self.decode_chunk != 1 and self.protocol != "decode":
            raise KVLabError("decode_chunk applies to protocol='decode' only; leave it at 1")
        if self.protocol in ("prefill-decode", "decode"):
            p = self.prefill_tokens
            if not 1 <= p < self.window:
                raise KVLabError(f"prefill must be in [1, window={self.window}), got {p}")
            if self.stride not in (None, self.window):
                raise KVLabError(f"stride applies to the fake protocol only; leave it None for {self.protocol}")

    @classmethod
    def from_args(cls, spec: "EvalSpec | None", fields: dict) -> "EvalSpec":
        """`spec`, or an EvalSpec built from `fields` (functions that take either; never both)."""
        if spec is not None and fields:
            raise KVLabError(f"pass either spec=EvalSpec(...) or its fields ({', '.join(fields)}), not both")
        return spec or cls(**fields)

    @property
    def prefill_tokens(self) -> int:
        """Tokens prefilled per window in prefill-decode / decode (default window // 2)."""
        return self.prefill if self.prefill is not None else self.window // 2

    @property
    def key(self) -> str:
        """The data part of a result's identity. A `file:PATH` corpus carries the sha256 of its content
        (first 16 hex digits), so a result stored before the file was edited is not read back for it."""
        data = self.data
        if data.startswith(data_mod.FILE_PREFIX):
            data = f"{data}@sha256:{data_mod.corpus_id(data).rsplit(':', 1)[-1][:16]}"
        s = f"{data}:n={self.n_tokens},w={self.window}"
        if self.stride not in (None, self.window):
            s += f",s={self.stride}"
        if self.protocol in ("prefill-decode", "decode"):
            s += f",prefill={self.prefill_tokens}"
        if self.protocol == "decode" and self.decode_chunk != 1:
            s += f",chunk={self.decode_chunk}"        # an approximation of token-by-token decoding, named
        return s


@dataclass
class EvalResult:
    metrics: dict
    layers: object = None            # pandas DataFrame: per-layer bits and relative errors
    info: list = field(default_factory=list)
    trace: dict = field(default_factory=dict)   # per position / per decode step (see `evaluate`)


def _scored_slice(spec: EvalSpec, i: int) -> slice:
    """Positions (of logits[:, :-1] in the fake protocol) whose next-token prediction is scored."""
    if spec.protocol in ("prefill-decode", "decode"):
        return slice(spec.prefill_tokens - 1, spec.window - 1)
    stride = spec.stride or spec.window
    first = 0 if i == 0 else spec.window - stride
    return slice(first, spec.window - 1)


@torch.no_grad()
def reference_logits(lm: LoadedModel, windows: torch.Tensor, spec: EvalSpec) -> torch.Tensor | list[torch.Tensor]:
    """fp logits on the scored positions of every window: computed once per (model, data), cached on disk.

    A tensor [windows, scored, vocab], or a list of per-window tensors when their scored lengths differ
    (the first window of a strided pass scores every position).
    """
    key = {"model": diskcache.model_fingerprint(lm), "ids": diskcache.tensor_digest(windows), "data": spec.key,
           "protocol": spec.protocol, "dtype": str(lm.model.dtype), "device": lm.device.type}
    mem_key = diskcache.canonical_json(key)
    if mem_key not in _FP_LOGITS:
        def compute() -> dict[str, torch.Tensor]:
            return {str(i): lm.model(w[None].to(lm.device), use_cache=False).logits[0, :-1][_scored_slice(spec, i)]
                    for i, w in enumerate(windows)}
        if os.environ.get("KVLAB_REFERENCE_CACHE", "1").lower() in ("0", "off", "false", "no"):
            per_window = compute()
        else:
            per_window = diskcache.cached("reference", {"kind": "logits", **key}, compute)
        outs = [per_window[str(i)].to(lm.device) for i in range(len(windows))]
        if len(_FP_LOGITS) >= _FP_LOGITS_MAX:
            _FP_LOGITS.pop(next(iter(_FP_LOGITS)))
        _FP_LOGITS[mem_key] = torch.stack(outs) if len({o.shape for o in outs}) == 1 else outs
    return _FP_LOGITS[mem_key]


def calibrate_for(lm: LoadedModel, method: Method | str, spec: EvalSpec) -> Method:
    """`method` fitted on the `calib_tokens` tokens of `spec.data` that follow the evaluation tokens, in
    windows of the evaluation's length or, when that is longer, one window of `calib_tokens`."""
    return calibrate(lm, method, data=spec.data, n_tokens=spec.calib_tokens, window=min(spec.window, spec.calib_tokens),
                     skip=spec.n_tokens)


@torch.no_grad()
def _window_logits(lm: LoadedModel, w: torch.Tensor, spec: EvalSpec) -> torch.Tensor:
    """Logits of one window's scored positions under the installed session: fake, every position
    predicting tokens 1..window-1 (the caller slices them); prefill-decode / decode, the positions
    predicting tokens p..window-1 only (the prefill's own logits are dropped as soon as its last one is
    read, so a long window holds the continuation's logits and nothing more)."""
    ids = w[None].to(lm.device)
    if spec.protocol == "fake":
        return lm.model(ids).logits[:, :-1]
    p = spec.prefill_tokens
    out = lm.model(ids[:, :p], use_cache=True)
    # prefill-decode: the continuation in one call; decode: `decode_chunk` tokens per call. The last token
    # is fed too (its prediction is dropped), so a chunk covering the continuation IS prefill-decode.
    chunk = spec.window - p if spec.protocol == "prefill-decode" else spec.decode_chunk
    pieces, past = [out.logits[:, -1:].clone()], out.past_key_values
    del out                                                                 # the prefill's [p, vocab] logits
    for s in range(p, spec.window, chunk):
        step = lm.model(ids[:, s:s + chunk], past_key_values=past, use_cache=True)
        pieces.append(step.logits)
        past = step.past_key_values
        del step
    return torch.cat(pieces, dim=1)[:, :-1]                                 # predicts tokens p .. window-1


def evaluate(lm: LoadedModel, method: Method | str = "fp16", spec: EvalSpec | None = None,
             progress: bool = True, measure_bytes: bool = False, pack: bool = False, **spec_kwargs) -> EvalResult:
    """Perplexity, KL to fp, top-1 agreement and accounted bits of `method` on `spec`'s windows.

    `evaluate(lm, "kivi-2", data="wiki", n_tokens=2048, window=512, protocol="fake")`

    `result.trace` holds the same quantities per position, averaged over windows: `position` (the
    index in the window of the predicted token), `nll`, `kl`, `top1`; in decode also `bits_tokens` /
    `bits` (bits per element of the cache each step read, by the number of stored tokens it held)
    and `layer_bits_tokens` / `layer_bits` (per layer, at most `kvlab.traces.TRACE_STEPS` steps).

    `measure_bytes=True` also packs every stored span into real tensors (`kvlab.pack`) and adds
    `packed_bytes` (accounted), `packed_bytes_measured` and `avg_bits_measured` (the measured bytes x 8 per
    element, fp16 sink and window included: `avg_bits` from real tensors) to the metrics (not stored in the
    results store: they describe the run, not the method's quality).

    `pack=True` (prefill-decode / decode) runs the cache in its packed form (`kvlab.quantize(..., pack=True)`:
    the same logits, bit for bit) and adds `cache_resident_bytes` (what the last window's cache held
    between calls) and `packed_bytes_measured` to the metrics (not stored either).
    """
    from tqdm.auto import tqdm

    spec = spec or EvalSpec(**spec_kwargs)
    label = method if isinstance(method, str) else method.spec
    method = parse(method)
    check_protocol(method, spec.protocol)
    windows = data_mod.windows(lm, spec.data, spec.n_tokens, spec.window, spec.stride)
    ref = reference_logits(lm, windows, spec)
    method = calibrate_for(lm, method, spec)
    t0 = time.perf_counter()
    nll_sum = kl_sum = agree_sum = None
    n_scored = 0
    pos_sums = torch.zeros(3, spec.window - 1, dtype=torch.float64, device=lm.device)   # nll, kl, top1 per position
    pos_count = torch.zeros(spec.window - 1, dtype=torch.float64)
    with quantize(lm.model, method, protocol=spec.protocol, attn_error=spec.attn_error,
                  measure_bytes=measure_bytes, pack=pack) as run:
        for i, w in enumerate(tqdm(windows, desc=method.spec, disable=not progress, leave=False)):
            sl = _scored_slice(spec, i)
            logits = _window_logits(lm, w, spec)
            if spec.protocol == "fake":
                logits = logits[:, sl]
            targets = w[None, 1:].to(lm.device)[:, sl]
            r = ref[i:i + 1] if torch.is_tensor(ref) else ref[i]
            per_token = (token_nll(logits, targets), kl_to_reference(logits, r), top1_agreement(logits, r))
            pos_sums[:, sl] += torch.stack([t[0] for t in per_token])
            pos_count[sl] += 1
            parts = tuple(t.sum() for t in per_token)
            nll_sum, kl_sum, agree_sum = parts if nll_sum is None else (
                nll_sum + parts[0], kl_sum + parts[1], agree_sum + parts[2])
            n_scored += targets.numel()
    seconds = time.perf_counter() - t0
    nll_v, kl_v, agree_v = torch.stack([nll_sum, kl_sum, agree_sum]).double().cpu().tolist()
    metrics = {"ppl": perplexity(nll_v, n_scored), "kl": kl_v / n_scored, "top1": agree_v / n_scored,
               "n_scored": n_scored, "seconds": seconds}
    s = run.summary()
    metrics.update({k: s[k] for k in ("avg_bits_k", "avg_bits_v", "avg_bits", "k_rel_err", "v_rel_err",
                                      "attn_rel_err", "avg_bits_step_mean", "avg_bits_end") if k in s})
    if measure_bytes or pack:
        metrics.update(packed_bytes=s["packed_bytes"], packed_bytes_measured=s["packed_bytes_measured"],
                       avg_bits_measured=s["avg_bits_measured"])
    if pack:
        metrics.update({k: s[k] for k in s if k.startswith("cache_resident")})
    layers, info = run.layer_report(), run.info
    metrics = {"model": lm.model_id, "data": spec.key, "label": label, "method": method.spec,
               "protocol": spec.protocol, **metrics}
    return EvalResult(metrics, layers, info, build_trace(pos_sums, pos_count, run.step_bits()))


METRICS = ("ppl", "kl", "top1", "avg_bits", "avg_bits_k", "avg_bits_v", "k_rel_err", "v_rel_err", "attn_rel_err",
           "avg_bits_step_mean", "avg_bits_end")
