"""Retrieval under a quantized KV cache: passkey / needle accuracy and greedy generation agreement.

The protocol is the deployed one (docs/design.md section 3, "prefill then decode"): the prompt is
prefilled at full precision, its cache is stored by the method (quantized, evicted), and the answer
is greedy-generated token by token against that cache; a passkey counts as retrieved when the
digits generated first are exactly the key. (The first answer token comes from the prefill's
logits, which attend to the full-precision prompt; every later token reads the quantized cache.)

    from kvlab.retrieval import passkey_accuracy
    df = passkey_accuracy(lm, "kivi-2", context_lengths=[512, 1024], depths=[0, 0.5, 1], n_per_cell=2)
    df.pivot_table(index="depth", columns="context", values="exact")

Examples of one context length are built to exactly that many tokens where the tokenizer allows
(the passkey generator is asked for a slightly longer or shorter haystack until the prompt length
matches), so each (length) cell group runs as one batch of equal-length prompts: no padding, which
per-channel or attention-based methods would otherwise see. Generation stays on the model's device;
the only host transfer is the generated tokens at the end of each batch.
"""
from __future__ import annotations

import re
import time
from typing import Iterable, Sequence

import torch

from . import data as data_mod
from .errors import KVLabError
from .calibration import calibrate
from .hooks import quantize
from .protocols import check_protocol
from .models import LoadedModel
from .quant.base import Method
from .quant.registry import parse

__all__ = ["exact_length_passkey", "generate", "passkey_accuracy", "compare_retrieval", "generation_agreement",
           "write_accuracy", "example_seed"]


# ----------------------------------------------------------------------------- examples
def exact_length_passkey(tokenizer, context_tokens: int, depth: float, seed: int = 0,
                         haystack: str = "paulgraham", tries: int = 10) -> data_mod.Passkey:
    """`kvlab.data.passkey` whose prompt has exactly `context_tokens` tokens when the tokenizer allows:
    the requested haystack length is corrected by the miss, then nearby lengths are tried (at most
    `tries` prompts built); otherwise the closest prompt found."""
    best, seen, ask = None, set(), context_tokens
    queue = []
    for _ in range(tries):
        if ask in seen:
            ask = queue.pop(0) if queue else None
            if ask is None:
                break
            continue
        seen.add(ask)
        ex = data_mod.passkey(tokenizer, ask, depth, seed=seed, haystack=haystack)
        n = ex.input_ids.shape[-1]
        if best is None or abs(n - context_tokens) < abs(best.input_ids.shape[-1] - context_tokens):
            best = ex
        if n == context_tokens:
            break
        queue += [a for a in (ask + 1, ask - 1, ask + 2, ask - 2) if a not in seen]
        ask = ask + (context_tokens - n)
    return best


def example_seed(seed: int, context: int, depth: float, i: int) -> int:
    """A deterministic example seed per (grid seed, cell, index); independent of the method."""
    return (seed * 1_000_003 + context * 7_919 + round(depth * 1000) * 104_729 + i * 15_485_863) % (2**31 - 1)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(lm: LoadedModel, method: Method | str, input_ids: torch.Tensor, max_new_tokens: int,
             protocol: str = "prefill-decode") -> torch.Tensor:
    """Greedy continuation [b, max_new_tokens] of equal-length prompts `input_ids` [b, T] under `method`.

    Runs inside `kvlab.quantize(..., protocol)` (HF QuantizedCache comparators too: the session
    supplies their cache). `fp16` gives exactly the tokens of plain greedy `model.generate`.
    """
    method = parse(method)
    check_protocol(method, protocol)
    ids = input_ids.to(lm.device)
    if ids.dim() == 1:
        ids = ids[None]
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), num_beams=1)
    pad = getattr(lm.model.generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(lm.model.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    kwargs["pad_token_id"] = pad
    with quantize(lm.model, method, protocol=protocol):
        out = lm.model.generate(ids, **kwargs)
    return out[:, ids.shape[-1]:]


def _digits(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


# ----------------------------------------------------------------------------- passkey grid
def passkey_accuracy(lm: LoadedModel, method: Method | str = "fp16", context_lengths: Sequence[int] = (512, 1024),
                     depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), n_per_cell: int = 1, seed: int = 0,
                     protocol: str = "prefill-decode", haystack: str = "paulgraham", batch_size: int = 16,
                     extra_tokens: int = 0, label: str | None = None, progress: bool = False,
                     calib_data: str = "wiki", calib_tokens: int = 1024):
    """Passkey retrieval accuracy of `method` on a (context length x needle depth) grid.

    Returns one row per example: method, label, protocol, context (requested), tokens (actual), depth,
    example, key, generated (decoded text), exact (the first digits generated == the key), digits
    (fraction of the key's digits right, position-wise), needle_position, example_seed (rebuild it with
    `exact_length_passkey(tok, context, depth, example_seed)`), seconds (of its batch, per example).
    Aggregate with `df.pivot_table(index="depth", columns="context", values="exact")`.

    `extra_tokens` generates that many tokens beyond the answer's length (0: exactly the answer's).
    A method that needs calibration and has none yet is calibrated on `calib_tokens` of `calib_data`.
    """
    if not isinstance(n_per_cell, int) or n_per_cell < 1:
        raise KVLabError(f"n_per_cell must be a positive int, got {n_per_cell!r}")
    if lm.tokenizer is None:
        raise KVLabError("passkey_accuracy needs a model with a tokenizer")
    spec_label = label or (method if isinstance(method, str) else parse(method).spec)
    m = parse(method)
    m = calibrate(lm, m, calib_data, calib_tokens, min(512, calib_tokens))
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    for ctx_len in context_lengths:
        if ctx_len > lm.max_context:
            raise KVLabError(f"context length {ctx_len} exceeds the model's {lm.max_context} positions")
        examples = [(d, i, exact_length_passkey(lm.tokenizer, int(ctx_len), float(d),
                                                example_seed(seed, int(ctx_len), float(d), i), haystack))
                    for d in depths for i in range(n_per_cell)]
        by_len: dict[tuple[int, int], list] = {}
        for e in examples:      # equal prompt and answer length -> one batch
            by_len.setdefault((e[2].input_ids.shape[-1], e[2].answer_ids.numel()), []).append(e)
        for (n_tok, n_ans), group in tqdm(sorted(by_len.items()), desc=f"{spec_label} @ {ctx_len}",
                                          disable=not progress, leave=False):
            for s in range(0, len(group), batch_size):
                chunk = group[s:s + batch_size]
                ids = torch.cat([e[2].input_ids for e in chunk], dim=0)
                t0 = time.perf_counter()
                gen = generate(lm, m, ids, n_ans + extra_tokens, protocol=protocol).cpu()
                secs = (time.perf_counter() - t0) / len(chunk)
                for (d, i, ex), g in zip(chunk, gen):
                    text = lm.tokenizer.decode(g.tolist(), skip_special_tokens=True)
                    got = _digits(text)
                    right = sum(a == b for a, b in zip(got, ex.answer)) / len(ex.answer)
                    rows.append(dict(method=m.spec, label=spec_label, protocol=protocol, context=int(ctx_len),
                                     tokens=int(n_tok), depth=float(d), example=i, key=ex.answer,
                                     generated=text, exact=got[:len(ex.answer)] == ex.answer,
                                     digits=right, needle_position=ex.needle_position, example_seed=ex.seed,
                                     seconds=secs))
    return pd.DataFrame(rows)


def compare_retrieval(lm: LoadedModel, methods: Iterable[str], **kwargs):
    """`passkey_accuracy` for several methods (same examples), concatenated."""
    import pandas as pd

    return pd.concat([passkey_accuracy(lm, m, label=m if isinstance(m, str) else None, **kwargs) for m in methods],
                     ignore_index=True)


# ----------------------------------------------------------------------------- agreement
@torch.no_grad()
def generation_agreement(lm: LoadedModel, method: Method | str, input_ids: torch.Tensor, max_new_tokens: int = 32,
                         protocol: str = "prefill-decode", reference: torch.Tensor | None = None) -> dict:
    """How long greedy generation under `method` follows the fp model's greedy generation.

    Returns {"agreement": fraction of positions where the tokens match, "prefix": mean length of the
    matching prefix (tokens before the first divergence), "tokens": the method's tokens [b, n],
    "reference": the fp tokens}. Pass `reference` (fp tokens) to reuse them across methods.
    """
    if reference is None:
        reference = generate(lm, "fp16", input_ids, max_new_tokens, protocol=protocol)
    got = generate(lm, method, input_ids, max_new_tokens, protocol=protocol)
    same = got == reference.to(got.device)
    prefix = same.long().cumprod(dim=-1).sum(dim=-1).float()
    stats = torch.stack([same.float().mean(), prefix.mean()]).cpu().tolist()
    return {"agreement": stats[0], "prefix": stats[1], "tokens": got, "reference": reference}


# ----------------------------------------------------------------------------- helpers
def write_accuracy(store, lm: LoadedModel, df, haystack: str = "paulgraham") -> None:
    """Write per-cell passkey accuracy (metrics `passkey_exact`, `passkey_digits`) to a results store;
    data = `passkey:<haystack>:ctx=<context>,depth=<depth>,n=<examples>`."""
    rows = []
    for (method, protocol, ctx, depth), g in df.groupby(["method", "protocol", "context", "depth"]):
        data = f"passkey:{haystack}:ctx={ctx},depth={depth:g},n={len(g)}"
        cfg = {"context": int(ctx), "depth": float(depth), "n_examples": int(len(g)), "corpus": haystack}
        for metric, col in (("passkey_exact", "exact"), ("passkey_digits", "digits")):
            rows.append(dict(model=lm.model_id, data=data, method=method, protocol=protocol, metric=metric,
                             value=float(g[col].mean()), config=cfg))
    store.put_many(rows)
