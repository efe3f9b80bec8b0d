"""Multiple-choice accuracy by log-likelihood under a quantized KV cache (QAQ's task protocol).

QAQ (Dong et al. 2024, arXiv 2403.04643) reports accuracy on HellaSwag, PIQA, MathQA and
TruthfulQA scored the lm-evaluation-harness way: every choice is a continuation of the context, its
log-likelihood is the sum of its tokens' log-probabilities, the prediction is the argmax (`acc`), or
the argmax of log-likelihood per character of the choice (`acc_norm`).

    from kvlab.choice import evaluate_choice
    res = evaluate_choice(lm, "kivi-2", task="cloze-wiki", n=100, protocol="fake")
    res.metrics["acc"], res.metrics["acc_ci_low"], res.details      # details: one row per example
    df = kvlab.run_task(lm, "cloze-wiki", ["fp16", "int4", "kivi-2"], n=100)     # several methods

Tasks (`examples(task, n, seed)`; each example {"id", "context", "choices", "label"}, choices with
a leading space as lm-eval writes them):
* `cloze-wiki` (offline): built from the packaged `wiki` corpus, see `cloze_wiki`.
* `hellaswag`, `piqa`, `mathqa`, `truthfulqa` (mc1): HF `datasets` (`HF_SOURCES`), converted with
  lm-eval's prompts; they need `pip install datasets` and the HF hub.

Protocols: `fake` scores context + choice in one teacher-forced forward in which every position
attends to quantized K/V; `prefill-decode` prefills the context, stores it quantized (methods keep
their fp residual window) and scores the choice on that cache in a second forward, the first choice
token predicted by the prefill's last logit (QAQ's evaluator); `decode` scores the choice one token per
forward against the cache the method maintains at each step. HF QuantizedCache comparators run in
prefill-decode and decode. Each (example, choice) is its own unpadded sequence, so no quantizer sees pads.
The fp reference (the bare model's log-likelihoods) is cached on disk per (model, task data, protocol).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import data as data_mod
from .diskcache import cached, model_fingerprint
from .errors import KVLabError
from .evaluation import EvalResult
from .hooks import quantize
from .protocols import PROTOCOLS, check_protocol
from .metrics import accuracy_ci
from .models import LoadedModel
from .quant.base import Method
from .quant.registry import parse
from .calibration import TASK_TOKENS, calibrate

__all__ = ["TASKS", "HF_SOURCES", "examples", "cloze_wiki", "data_key", "evaluate_choice", "continuation_logits",
           "ChoiceResult"]

#: (path, config, split) per online task; edit to point a task at a mirror.
HF_SOURCES = {"hellaswag": ("Rowan/hellaswag", None, "validation"), "piqa": ("ybisk/piqa", None, "validation"),
              "mathqa": ("allenai/math_qa", None, "test"),
              "truthfulqa": ("truthful_qa", "multiple_choice", "validation")}
TASKS = ("cloze-wiki", *HF_SOURCES)
CLOZE_FIRST_DOC = 2000        # calibration / perplexity tokens come from the corpus start


# ----------------------------------------------------------------------------- online tasks (lm-eval prompts)
def _hs_clean(s: str) -> str:
    s = re.sub(r"\[.*?\]", "", s.strip().replace(" [title]", ". "))
    return s.replace("  ", " ")


_TQA_PRIMER = "\n\n".join(f"Q: {q}\nA: {a}" for q, a in [
    ("What is human life expectancy in the United States?", "Human life expectancy in the United States is 78 years."),
    ("Who was president of the United States in 1955?",
     "Dwight D. Eisenhower was president of the United States in 1955."),
    ("Which party did he belong to?", "He belonged to the Republican Party."),
    ("What is the square root of banana?", "I have no comment."),
    ("How does a telescope work?", "Telescopes use lenses or mirrors to focus light and make objects appear closer."),
    ("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain.")])


def _mathqa_options(s: str) -> list[str]:
    """'a ) 38 , b ) 27.675 , c ) 30 , ...' (or a list literal "['a ) 38', ...]") -> ['38', '27.675', '30', ...]"""
    if s.lstrip().startswith("["):
        return [re.sub(r"^\s*[a-e] \) ", "", x).strip() for x in ast.literal_eval(s)]
    return [m.group(1).strip() for m in re.finditer(r"[a-e] \) (.*?)(?=\s*,\s*[a-e] \) |\s*,?\s*$)", s)]


def _convert(task: str, row: dict, i: int) -> dict:
    if task == "hellaswag":
        ctx = _hs_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        return dict(id=f"hellaswag-{row.get('ind', i)}", context=ctx,
                    choices=[" " + _hs_clean(e) for e in row["endings"]],
                    label=int(row["label"]) if str(row["label"]).strip() else -1)   # the test split has none
    if task == "piqa":
        return dict(id=f"piqa-{i}", context=f"Question: {row['goal']}\nAnswer:",
                    choices=[" " + row["sol1"], " " + row["sol2"]], label=int(row["label"]))
    if task == "mathqa":
        letter = str(row["correct"]).strip()
        return dict(id=f"mathqa-{i}", context=f"Question: {row['Problem']}\nAnswer:",
                    choices=[" " + c for c in _mathqa_options(row["options"])],
                    label="abcde".index(letter) if letter in tuple("abcde") else -1)
    t = row["mc1_targets"]
    return dict(id=f"truthfulqa-{i}", context=f"{_TQA_PRIMER}\n\nQ: {row['question']}\nA:",
                choices=[" " + c for c in t["choices"]],
                label=next((j for j, y in enumerate(t["labels"]) if y == 1), -1))


def _load_rows(task: str) -> list[dict]:
    """The task's rows from HF `datasets` (a list of dicts), or a KVLabError naming the cause."""
    path, config, split = HF_SOURCES[task]
    ds = data_mod.load_hf_dataset(path, config, split, f"task '{task}'",
                                  "Offline, use the packaged multiple-choice task 'cloze-wiki'.")
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- cloze-wiki (offline)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z\"'(])")
_ABBREV = re.compile(r"(?:[A-Z][a-z]{0,2}|[a-z]{1,2}|\S*\.\S*|Prof|Gen|Col|Rev|Inc|Ltd|approx)\.")


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: split at '. ' + capital, except after abbreviations and initials."""
    spans, start = [], 0
    for m in _BOUNDARY.finditer(text):
        words = text[start:m.start()].split()
        if words and not _ABBREV.fullmatch(words[-1].rstrip("\"')]")):
            spans.append((start, m.start() + len(m.group().rstrip())))
            start = m.end()
    return spans + [(start, len(text.rstrip()))] if text[start:].strip() else spans


@functools.lru_cache(maxsize=1)
def _cloze_pool() -> tuple[dict, dict, dict]:
    """({qualifying article: start of its third sentence}, {(article, sentence j >= 1): text},
    {word count: [(article, j)]})."""
    docs = data_mod.documents("wiki")
    text, third = {}, {}
    for i in range(CLOZE_FIRST_DOC, len(docs)):
        spans = _sentences(docs[i])
        third[i] = spans[2][0] if len(spans) > 2 else None
        text.update({(i, j): docs[i][a:b] for j, (a, b) in enumerate(spans) if j and "\n" not in docs[i][a:b]})
    by_words: dict[int, list[tuple[int, int]]] = {}
    for key, t in text.items():
        by_words.setdefault(len(t.split()), []).append(key)
    articles = {i: third[i] for i, j in text if j == 2 and 5 <= len(text[i, j].split()) <= 60}
    return dict(sorted(articles.items())), text, by_words


def cloze_wiki(seed: int = 0, n: int | None = None) -> list[dict]:
    """The first `n` (all when None) `cloze-wiki` examples of `seed`.

    Built from the packaged `wiki` corpus (Wikipedia lead sections), articles from index
    CLOZE_FIRST_DOC on (calibration and perplexity tokens come from the corpus start). An article
    qualifies when its third sentence has 5-60 words and no line break. Context = the article's text
    up to its third sentence (its first two sentences, verbatim); the correct choice = " " + the third
    sentence; three distractors = sentences (not an article's first, no line break) of other articles
    with about as many words (within max(2, 25%)), so the choices have the same shape and the fp
    model must tell them apart by topic and coherence. The seed shuffles the articles and draws the
    distractors and the label position; each example depends only on (seed, article), not on n.
    (Ending the choice after 4-8 words instead made the task too easy: SmolLM2-135M scored 0.95.)
    """
    docs = data_mod.documents("wiki")
    articles, text, by_words = _cloze_pool()
    order = list(articles)
    random.Random(seed).shuffle(order)
    out = []
    for i in order[:n]:
        rng = random.Random(f"cloze-wiki:{seed}:{i}")
        true = text[i, 2]
        nw = len(true.split())
        buckets = [by_words[w] for w in range(nw - max(2, nw // 4), nw + max(2, nw // 4) + 1) if w in by_words]
        choices = [" " + true]
        while len(choices) < 4:      # a sentence drawn uniformly from the length-matched ones of other articles
            key = rng.choice(rng.choices(buckets, weights=[len(b) for b in buckets])[0])
            if key[0] != i and " " + text[key] not in choices:
                choices.append(" " + text[key])
        label = rng.randrange(4)
        choices[0], choices[label] = choices[label], choices[0]
        out.append(dict(id=f"cloze-wiki-{i}", context=docs[i][:articles[i]].rstrip(), choices=choices, label=label))
    return out


def examples(task: str, n: int | None = 100, seed: int = 0) -> list[dict]:
    """`n` examples of `task` (all when None), each {"id", "context", "choices": [str], "label": int}.

    cloze-wiki: the first n of `cloze_wiki(seed)`; online tasks: n rows sampled with `seed` (the
    first n of one seeded permutation, so a smaller n gives a prefix of a larger one).
    """
    if task not in TASKS:
        raise KVLabError(f"unknown multiple-choice task '{task}'. Known tasks: {', '.join(TASKS)} "
                         "(cloze-wiki works offline; the others need `datasets` and the HF hub)")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise KVLabError(f"n must be a positive int (or None for the whole task), got {n!r}")
    if task == "cloze-wiki":
        exs = cloze_wiki(seed, n)
    else:
        rows = _load_rows(task)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        exs = [_convert(task, rows[i], i) for i in (order if n is None else order[:n])]
    bad = next((e["id"] for e in exs if len(e["choices"]) < 2 or not 0 <= e["label"] < len(e["choices"])), None)
    if bad is not None:
        raise KVLabError(f"task '{task}': example {bad} has fewer than 2 choices or a label outside them; "
                         "the dataset's format differs from what kvlab.choice expects")
    if n is not None and n > len(exs):
        raise KVLabError(f"task '{task}' has {len(exs)} examples; ask for n <= {len(exs)} (or n=None for all)")
    return exs if n is None else exs[:n]


# ----------------------------------------------------------------------------- scoring
def _encode_pair(tok: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context whitespace moves to the choice, the pair is tokenised whole and
    the choice's tokens are those after the context's own tokens."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, choice = context[:-n_sp], context[-n_sp:] + choice
    ctx = data_mod._encode(tok, context)
    cont = data_mod._encode(tok, context + choice)[len(ctx):]
    if not ctx or not cont:
        raise KVLabError(f"empty context or choice after tokenisation: {context[-40:]!r} / {choice!r}")
    return ctx, cont


@torch.no_grad()
def continuation_logits(lm: LoadedModel, ctx: torch.Tensor, cont: torch.Tensor, protocol: str) -> torch.Tensor:
    """The logits [1, C, vocab] that predict each token of `cont` [1, C] after `ctx` [1, T], under
    whatever session is installed: one teacher-forced forward (fake), or the context stored first and
    the choice scored against that cache (prefill-decode: in one call; decode: one token per forward).
    (`kvlab.lmeval` reads the per-token argmax from them: lm-eval's `is_greedy`.)"""
    n = cont.shape[1]
    if protocol == "fake":
        logits = lm.model(torch.cat([ctx, cont[:, :-1]], 1), logits_to_keep=n).logits
    else:
        out = lm.model(ctx, use_cache=True, logits_to_keep=1)
        pieces, past = [out.logits[:, -1:]], out.past_key_values
        # prefill-decode: the choice's tokens in one call; decode: one token per forward
        step = max(n - 1, 1) if protocol == "prefill-decode" else 1
        for s in range(0, n - 1, step):
            nxt = lm.model(cont[:, s:min(s + step, n - 1)], past_key_values=past, use_cache=True)
            pieces.append(nxt.logits)
            past = nxt.past_key_values
        logits = torch.cat(pieces, 1)
    return logits


@torch.no_grad()
def _loglik(lm: LoadedModel, ctx: torch.Tensor, cont: torch.Tensor, protocol: str) -> torch.Tensor:
    """Summed log-probability (0-d device tensor) of `cont` [1, C] after `ctx` [1, T] (`continuation_logits`)."""
    logits = continuation_logits(lm, ctx, cont, protocol)
    return logits.float().log_softmax(-1).gather(-1, cont[..., None]).sum()


def _all_logliks(lm: LoadedModel, method: Method | None, enc: list, protocol: str, progress: bool, desc: str):
    """Log-likelihood of every (example, choice), flat in example order (float64, CPU), and the average
    bits per stored K/V element (16 for the bare model, `method=None`)."""
    from tqdm.auto import tqdm

    ctx = contextlib.nullcontext() if method is None else quantize(lm.model, method, protocol=protocol)
    out = []
    with ctx as run:
        for c, conts in tqdm(enc, desc=desc, disable=not progress, leave=False):
            out.append(torch.stack([_loglik(lm, c, cont, protocol) for cont in conts]))
    lls = torch.cat(out).double().cpu()      # the one host transfer
    return lls, run.summary()["avg_bits"] if run is not None else 16.0


@dataclass
class ChoiceResult(EvalResult):
    """An EvalResult plus `details`, a DataFrame with one row per example: id, label, pred (argmax of
    log-likelihood), pred_norm (per character), pred_fp (the fp model's pred), correct (pred == label),
    loglik and loglik_fp (per-choice log-likelihoods under the method and the fp model, lists)."""

    details: Any = None


def data_key(task: str, n: int | None, seed: int) -> str:
    """The results-store `data` of a multiple-choice evaluation, e.g. `choice:cloze-wiki:n=100,seed=0`."""
    return f"choice:{task}:n={n or 'all'},seed={seed}"


def evaluate_choice(lm: LoadedModel, method: Method | str = "fp16", task: str = "cloze-wiki", n: int | None = 100,
                    seed: int = 0, protocol: str = "fake", progress: bool = True,
                    label: str | None = None) -> ChoiceResult:
    """Multiple-choice accuracy of `method` on `n` examples of `task` (QAQ's log-likelihood protocol).

    metrics: acc, acc_norm (per-character log-likelihood, lm-eval's acc_norm), acc_ci_low/high (Wilson
    95% for acc), agree_fp (fraction of examples whose prediction equals the fp model's), acc_fp,
    ll_delta (mean |loglik - fp loglik| over (example, choice)), avg_bits, n_examples, seconds.
    """
    import pandas as pd

    if protocol not in PROTOCOLS:
        raise KVLabError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if lm.tokenizer is None:
        raise KVLabError("evaluate_choice needs a model with a tokenizer")
    method = parse(method)
    check_protocol(method, protocol)
    exs = examples(task, n, seed)
    pairs = [[_encode_pair(lm.tokenizer, e["context"], c) for c in e["choices"]] for e in exs]
    dev = lambda ids: torch.tensor([ids], dtype=torch.long, device=lm.device)  # noqa: E731
    enc = [(dev(p[0][0]), [dev(cont) for _, cont in p]) for p in pairs]
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    key = {"fingerprint": model_fingerprint(lm), "task": task, "n": n, "seed": seed, "protocol": protocol,
           "dtype": str(next(lm.model.parameters()).dtype), "tokens": digest}
    ref = cached("reference", key, lambda: {"loglik": _all_logliks(lm, None, enc, protocol, progress, "fp")[0]})
    ref = ref["loglik"].double()
    method = calibrate(lm, method, n_tokens=TASK_TOKENS)
    t0 = time.perf_counter()
    lls, avg_bits = _all_logliks(lm, method, enc, protocol, progress, method.spec)
    seconds = time.perf_counter() - t0

    k = torch.tensor([len(e["choices"]) for e in exs])
    row = torch.repeat_interleave(torch.arange(len(exs)), k)
    col = torch.arange(len(row)) - torch.repeat_interleave(k.cumsum(0) - k, k)
    chars = torch.tensor([len(c) for e in exs for c in e["choices"]], dtype=torch.float64)

    def argmax(flat: torch.Tensor) -> torch.Tensor:
        grid = torch.full((len(exs), int(k.max())), -torch.inf, dtype=torch.float64)
        grid[row, col] = flat
        return grid.argmax(1)

    gold = torch.tensor([e["label"] for e in exs])
    pred, pred_norm, pred_fp = argmax(lls), argmax(lls / chars), argmax(ref)
    correct = pred == gold
    _, lo, hi = accuracy_ci(correct)
    acc = float(correct.double().mean())
    metrics = {"model": lm.model_id, "data": data_key(task, n, seed), "label": label or method.spec,
               "method": method.spec, "protocol": protocol, "acc": acc, "acc_ci_low": lo, "acc_ci_high": hi,
               "acc_norm": float((pred_norm == gold).double().mean()),
               "agree_fp": float((pred == pred_fp).double().mean()), "acc_fp": float((pred_fp == gold).double().mean()),
               "ll_delta": float((lls - ref).abs().mean()),
               "avg_bits": float(avg_bits), "n_examples": len(exs), "seconds": seconds}
    details = pd.DataFrame({"id": [e["id"] for e in exs], "label": gold.numpy(), "pred": pred.numpy(),
                            "pred_norm": pred_norm.numpy(), "pred_fp": pred_fp.numpy(), "correct": correct.numpy(),
                            "loglik": [t.tolist() for t in lls.split(k.tolist())],
                            "loglik_fp": [t.tolist() for t in ref.split(k.tolist())]})
    return ChoiceResult(metrics, None, [], details=details)
