"""Calibration as a stage above the core: capture what methods declare they need, fit, cache, return.

    m = kvlab.calibrate(lm, "kvquant-nuq2-1%")                 # a fitted copy of the method
    ms = calibrate_many(lm, ["kvquant-nuq2", "kvquant-nuq3"])   # one capture serves every config

A method that `needs_calibration` declares a `CalibrationNeeds` (which tensors, gradients or not,
how the loss is taken, positional interpolation); this module runs the model once per distinct
needs and calibration data (through `kvlab.capture`), hands the capture to `method.fit`, caches
the fitted tensors on disk (`kvlab.diskcache` kind `calibration`, keyed by the model's weights
fingerprint, the calibration token ids, the needs and `method.calibration_key()`), and returns
`method.with_state(...)`. Methods never run the model themselves.

The calibration text: `n_tokens` tokens of `data` starting after the first `skip` tokens, cut into
rows of `window` tokens (`kvlab.evaluate` skips its evaluation tokens, so they never overlap).
"""
from __future__ import annotations

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

    `ids` [n, T] overrides the text selection (`data`, `n_tokens`, `window`, `skip`)."""
    return calibrate_many(lm, [method], data, n_tokens, window, skip, ids)[0]


def calibrate_many(lm: LoadedModel, methods: Iterable[Method | str], data: str = "wiki",
                   n_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW, skip: int = 0,
                   ids: torch.Tensor | None = None) -> list[Method]:
    """Fit every method that needs it from one capture per distinct `CalibrationNeeds`; fits already on
    disk are read, not recomputed (and need no capture). Returns the methods in order, fitted."""
    methods = [parse(m) for m in methods]
    ids, plan = _plan(lm, methods, data, n_tokens, window, skip, ids)
    captures: dict[CalibrationNeeds, Captured] = {}
    out = list(methods)
    for i, (need, key) in plan.items():
        def compute(m=methods[i], need=need) -> dict[str, torch.Tensor]:
            if need not in captures:
                captures[need] = capture_for(lm.model, ids, need)
            return m.fit(captures[need])
        out[i] = methods[i].with_state(diskcache.cached("calibration", key, compute))
    return out


def missing_fits(lm: LoadedModel, methods: Iterable[Method | str], ids: torch.Tensor) -> int:
    """How many distinct fits `calibrate_many(lm, methods, ids=ids)` would compute (not on disk yet)."""
    _, plan = _plan(lm, [parse(m) for m in methods], ids=ids)
    keys = {diskcache.canonical_json(key) for _, key in plan.values()
            if not diskcache.cache_path("calibration", key).exists()}
    return len(keys)


def _plan(lm: LoadedModel, methods: list[Method], data: str = "wiki", n_tokens: int = DEFAULT_TOKENS,
          window: int = DEFAULT_WINDOW, skip: int = 0, ids: torch.Tensor | None = None):
    """(calibration ids, {index: (needs, disk-cache key)}) for the methods that still need a fit."""
    todo = [i for i, m in enumerate(methods) if getattr(m, "needs_calibration", False) and m.state is None]
    if not todo:
        return ids, {}
    if ids is None:
        ids = calibration_ids(lm, data, n_tokens, window, skip)
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    base = {"model": diskcache.model_fingerprint(lm.model), "input_ids": diskcache.tensor_digest(ids)}
    plan = {}
    for i in todo:
        need = methods[i].calibration_needs(ids.shape[-1])
        plan[i] = (need, {**base, "needs": asdict(need), **methods[i].calibration_key()})
    return ids, plan


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
    if len(per_batch) == 1:
        return Captured(*per_batch[0])

    def cat(dicts: list[dict]) -> dict[str, list[torch.Tensor]]:
        return {w: [torch.cat(per_layer, 0) for per_layer in zip(*(d[w] for d in dicts))] for w in dicts[0]}
    return Captured(cat([t for t, _ in per_batch]),
                    cat([g for _, g in per_batch]) if needs.grads else None)


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
