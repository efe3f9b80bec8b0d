"""Calibration as a stage above the core: capture what methods declare they need, fit, cache, return.

    m = kvlab.calibrate(lm, "kvquant-nuq2-1%")                 # a fitted copy of the method
    ms = calibrate_many(lm, ["kvquant-nuq2", "kvquant-nuq3"])   # one capture serves every config

A method that `needs_calibration` declares a `CalibrationNeeds` (which tensors: "k_pre", "k", "v" and
the post-RoPE queries "q" (PM-KVQ's alpha search); gradients or not, how the loss is taken,
positional interpolation); this module runs the model once per distinct
needs and calibration data (through `kvlab.capture`), hands the capture to `method.fit`, caches
the fitted tensors on disk (`kvlab.diskcache` kind `calibration`, keyed by the model's weights
fingerprint, the calibration token ids, the needs and `method.calibration_key()`), and returns
`method.with_state(...)`. Methods never run the model themselves.

The calibration text: `n_tokens` tokens of `data` starting after the first `skip` tokens, cut into
rows of `window` tokens (`kvlab.evaluate` skips its evaluation tokens, so they never overlap), unless
the method asks for its own length (`calibration_text_for`; KVQuant: its `calib_rows` x `calib_len`,
the authors' 16 x 2048, which then wins over `EvalSpec.calib_tokens` / `window`).
"""
from __future__ import annotations

import ctypes
from dataclasses import asdict
from typing import Iterable

import torch

from . import data as data_mod
from . import diskcache
from .errors import KVLabError
from .hooks import capture
from .models import LoadedModel
from .quant.base import CalibrationNeeds, Captured, Method
from .quant.registry import parse

DEFAULT_TOKENS = 2048      # kvlab.evaluate's calib_tokens default
DEFAULT_WINDOW = 512
TASK_TOKENS = 1024         # the tasks (multiple choice, summaries, passkey) calibrate on the corpus start


def calibration_ids(lm: LoadedModel, data: str = "wiki", n_tokens: int = DEFAULT_TOKENS,
                    window: int = DEFAULT_WINDOW, skip: int = 0) -> torch.Tensor:
    """Tokens skip .. skip + n_tokens of `data` as rows of `window`: LongTensor [n_tokens // window, window]."""
    if not isinstance(window, int) or window < 2:
        raise KVLabError(f"calibration window must be an int > 1, got {window!r}")
    ids = data_mod.tokens(lm.tokenizer, data, skip + n_tokens)[skip:]
    n = len(ids) // window
    if n == 0:
        raise KVLabError(f"calibration needs at least one window: {n_tokens} calibration tokens of '{data}' are "
                         f"fewer than window={window}; raise calib_tokens or lower the window")
    return ids[: n * window].view(n, window)


def calibrate(lm: LoadedModel, method: Method | str, data: str = "wiki", n_tokens: int = DEFAULT_TOKENS,
              window: int = DEFAULT_WINDOW, skip: int = 0, ids: torch.Tensor | None = None) -> Method:
    """`method` fitted on calibration text (the method itself when it needs no calibration).

    The text: `n_tokens` of `data` after `skip`, in rows of `window`, unless the method asks for its own
    length (`calibration_text_for`: KVQuant's `calib_rows` x `calib_len`, the authors' 16 x 2048); `ids`
    [n, T] overrides both."""
    return calibrate_many(lm, [method], data, n_tokens, window, skip, ids)[0]


def calibrate_many(lm: LoadedModel, methods: Iterable[Method | str], data: str = "wiki",
                   n_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW, skip: int = 0,
                   ids: torch.Tensor | None = None) -> list[Method]:
    """Fit every method that needs it from one capture per distinct calibration text and `CalibrationNeeds`;
    fits already on disk are read, not recomputed (and need no capture). Returns the methods in order, fitted.

    A method may ask for its own calibration text (`calibration_text`, see `calibration_text_for`); `ids`
    overrides every method's."""
    methods = [parse(m) for m in methods]
    plan = _plan(lm, methods, data, n_tokens, window, skip, ids)
    captures: dict[tuple[str, CalibrationNeeds], Captured] = {}
    out = list(methods)
    for i, (x, need, key) in plan.items():
        def compute(m=methods[i], x=x, need=need, key=key) -> dict[str, torch.Tensor]:
            cid = (key["input_ids"], need)
            if cid not in captures:
                captures[cid] = capture_for(lm.model, x, need)
            return m.fit(captures[cid])
        out[i] = methods[i].with_state(diskcache.cached("calibration", key, compute))
    return out


def missing_fits(lm: LoadedModel, methods: Iterable[Method | str], ids: torch.Tensor) -> int:
    """How many distinct fits `calibrate_many(lm, methods, ids=ids)` would compute (not on disk yet)."""
    plan = _plan(lm, [parse(m) for m in methods], ids=ids)
    keys = {diskcache.canonical_json(key) for _, _, key in plan.values()
            if not diskcache.cache_path("calibration", key).exists()}
    return len(keys)


def calibration_text_for(lm: LoadedModel, method: Method, n_tokens: int, window: int) -> tuple[int, int]:
    """(tokens, row length) of the calibration text `method` is fitted on when a caller offers `n_tokens` in
    rows of `window`: the method's own choice where it has one (`method.calibration_text(n_tokens, window)`,
    e.g. KVQuant's `calib_rows` x `calib_len`; a `select` asks its inner method), else the caller's. Rows
    longer than the model's context are cut to it."""
    m = getattr(method, "inner_method", method)
    ask = getattr(m, "calibration_text", None)
    n, w = ask(n_tokens, window) if ask is not None else (n_tokens, window)
    return n, min(w, lm.max_context)


def _plan(lm: LoadedModel, methods: list[Method], data: str = "wiki", n_tokens: int = DEFAULT_TOKENS,
          window: int = DEFAULT_WINDOW, skip: int = 0, ids: torch.Tensor | None = None):
    """{index: (calibration ids, needs, disk-cache key)} for the methods that still need a fit."""
    todo = [i for i, m in enumerate(methods) if getattr(m, "needs_calibration", False) and m.state is None]
    if not todo:
        return {}
    if ids is not None:
        ids = torch.as_tensor(ids)
        ids = ids[None] if ids.dim() == 1 else ids
    texts: dict[tuple[int, int], tuple[torch.Tensor, str]] = {}
    fingerprint = diskcache.model_fingerprint(lm.model)
    plan = {}
    for i in todo:
        text = (0, 0) if ids is not None else calibration_text_for(lm, methods[i], n_tokens, window)
        if text not in texts:
            x = ids
            if x is None:
                try:
                    x = calibration_ids(lm, data, text[0], text[1], skip)
                except KVLabError as e:
                    if text == (n_tokens, window):
                        raise
                    raise KVLabError(f"{methods[i].spec}: its calibration text is {text[0]} tokens in rows of "
                                     f"{text[1]} (its own choice, see its calibration_text): {e}") from None
            texts[text] = (x, diskcache.tensor_digest(x))
        x, digest = texts[text]
        need = methods[i].calibration_needs(x.shape[-1])
        plan[i] = (x, need, {"model": fingerprint, "input_ids": digest, "needs": asdict(need),
                             **methods[i].calibration_key()})
    return plan


def capture_for(model: torch.nn.Module, ids: torch.Tensor, needs: CalibrationNeeds) -> Captured:
    """Run `model` on `ids` [n, T] and capture what `needs` asks for (see `CalibrationNeeds`).

    Gradients are taken with `torch.autograd.grad` on the captured tensors with the input embeddings
    as the only leaf, so no parameter gets a `.grad` and no `requires_grad` flag is touched."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    batches = [ids[i:i + 1] for i in range(len(ids))] if needs.loss == "row_sum" else [ids]
    per_batch: list[tuple[dict, dict | None]] = []
    for x in batches:
        b, T = x.shape
        kwargs = {}
        if needs.position_stride > 1:
            kwargs["position_ids"] = (torch.arange(T, device=device) * needs.position_stride)[None].expand(b, T)
        if needs.grads:
            tensors, grads = _capture_with_grads(model, x, needs, kwargs)
        else:
            with torch.no_grad(), capture(model, what=needs.what) as cap:
                model(x, **kwargs)
                tensors, grads = {w: cap[w] for w in needs.what}, None
        if needs.to_cpu:
            tensors = {w: [t.detach().float().cpu() for t in ts] for w, ts in tensors.items()}
            grads = None if grads is None else {w: [g.float().cpu() for g in gs] for w, gs in grads.items()}
        per_batch.append((tensors, grads))
        if device.type == "cpu" and len(batches) > 1:
            _release_freed_memory()
    if len(per_batch) == 1:
        return Captured(*per_batch[0])

    def cat(dicts: list[dict]) -> dict[str, list[torch.Tensor]]:
        return {w: [torch.cat(per_layer, 0) for per_layer in zip(*(d[w] for d in dicts))] for w in dicts[0]}
    return Captured(cat([t for t, _ in per_batch]),
                    cat([g for _, g in per_batch]) if needs.grads else None)


def _release_freed_memory() -> None:
    """Hand the heap memory a row's forward / backward freed back to the OS (glibc `malloc_trim`).

    glibc keeps it in its arenas, and row after row the resident size grows by about the size of the
    autograd graph: KVQuant's 16 x 2,048-token Fisher pass on SmolLM2-135M had reached 14 GB at row 12
    (and was OOM-killed); with the trim it peaks at 7.5 GB (one row's graph, and the 3 GB captured held
    twice while the rows are concatenated). A no-op where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _capture_with_grads(model, x, needs: CalibrationNeeds, kwargs: dict):
    """Captured tensors and dL/dX for one batch (L: summed or mean next-token cross-entropy)."""
    with torch.enable_grad():
        emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
        with capture(model, what=needs.what, retain_grad=True) as cap:
            logits = model(inputs_embeds=emb, **kwargs).logits
            tensors = {w: cap[w] for w in needs.what}
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 x[:, 1:].reshape(-1),
                                                 reduction="sum" if needs.loss == "row_sum" else "mean")
        flat = [t for w in needs.what for t in tensors[w]]
        gs = torch.autograd.grad(loss, flat, allow_unused=True)
    if any(g is None for g in gs):
        raise KVLabError(f"calibration: no gradient reached the captured {needs.what}; this model family does not "
                         "route them through the cache")
    grads, i = {}, 0
    for w in needs.what:
        n = len(tensors[w])
        grads[w] = [g.detach() for g in gs[i:i + n]]
        i += n
    return {w: [t.detach() for t in ts] for w, ts in tensors.items()}, grads
