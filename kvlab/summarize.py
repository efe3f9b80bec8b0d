"""Summarization ROUGE under a quantized KV cache: the XSum protocol of H2O and Q-Hitter.

H2O (Zhang et al., NeurIPS 2023, section 5) and Q-Hitter (Zhang et al., MLSys 2024) report ROUGE on
XSum (Narayan et al., EMNLP 2018: BBC articles whose reference summary is the article's own first,
introductory sentence) through HELM's summarization prompt (Liang et al. 2022, 5 in-context
examples, 64 new tokens, documents cut to 512 words):

    ###
    Article: {document}

    Summarize the above article in 1 sentence.
    {summary}

    from kvlab.summarize import evaluate_summaries
    df = kvlab.run_task(lm, "lead-wiki", ["fp16", "int4", "kivi-2"], n=50)     # several methods
    df[["label", "rouge1", "rouge2", "rougeL", "rougeL_fp", "seconds"]]

    res = evaluate_summaries(lm, "kivi-2", n=50)
    res.metrics["rougeL_fp"]; res.examples          # per-example DataFrame (also res.info[0]["examples"])

Tasks (`TASKS`):
* `xsum`: EdinburghNLP/xsum's test split through HF `datasets` (online; `pip install datasets`).
* `lead-wiki` (offline): built from the packaged `wiki` corpus (Wikipedia lead sections) the way XSum
  was built from BBC articles: the reference summary is the lead's first sentence and the document
  the sentences after it (white space collapsed to single spaces, as HELM cleans XSum articles).
  Articles come from corpus index >= 2000 (calibration and perplexity read the corpus start) with
  >= 60 words after the first sentence and a first sentence of >= 6 words (3,307 of the 10,033
  leads); a seeded permutation of them gives the evaluated examples and, from its end, the few-shot
  examples, so the two never overlap. Its documents are short (median 82 words, ~110 tokens).

Prompt (`TEMPLATES`): `template="helm"` is HELM's, exactly; the default `"kvlab"` is
`Article: {document}\n\nSummarize the article in one sentence.\nSummary:` (HELM's wording without
the `###` separators, with an output prefix) and `n_shot=0`. Measured on SmolLM2-135M-Instruct
(lead-wiki, first 20 examples, 48 new tokens, summary cut at the first line break): HELM 0-shot
ROUGE-1 0.191 (the model often re-emits "Article: ..." first), HELM 1-shot 0.144 (8 of 20 summaries
empty: the model opens a new `###` article), kvlab 0-shot 0.225, kvlab 1-shot 0.221 (it copies the
shot's summary for unrelated articles); with the first-sentence cut below 0.205 / 0.151 / 0.269 /
0.223. A 1-shot prompt also doubles the prefill. Larger models may prefer HELM's few-shot prompt.

Protocol: every document (shots' included) is cut to its first `max_context_tokens` tokens; the
prompt is greedy-continued by `max_new_tokens` tokens under the method with
`kvlab.retrieval.generate` (in `prefill-decode`: prefilled at full precision, stored quantized,
decoded token by token against the quantized cache), and the summary is `summary_text` of the
generated text: the first sentence of its first non-empty line. Greedy, where HELM samples at
temperature 0.3: methods are compared on one deterministic output each. Prompts of identical token
length run as one batch; others one at a time (padding would enter per-channel statistics).

Metrics (F1, mean over examples; `kvlab.rouge` calls Google's `rouge_score`, no stemmer, and needs
`pip install rouge-score`): `rouge1`, `rouge2`, `rougeL` against the reference, and `rougeL_fp`,
ROUGE-L of the method's summary against the fp model's summary of the same prompt (1.0 for an
identical string, also one without any word token, which ROUGE itself scores 0). For a 135M model
the reference scores are low and noisy, while `rougeL_fp` measures only what the cache did to the
output. The fp summaries are generated once per (model, prompts, generation settings) and cached
on disk (`kvlab.diskcache`, kind "reference").
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import data as data_mod
from .diskcache import cached, model_fingerprint
from .errors import KVLabError
from .evaluation import EvalResult
from .protocols import PROTOCOLS, check_protocol
from .models import LoadedModel
from .quant.base import Method
from .quant.registry import parse
from .calibration import TASK_TOKENS, calibrate
from .retrieval import generate
from .rouge import require_rouge_score, rouge


__all__ = ["TASKS", "TEMPLATES", "examples", "shot_examples", "first_sentence", "build_prompts", "summary_text",
           "reference_summaries", "data_key", "evaluate_summaries"]

TASKS = {
    "lead-wiki": "offline: packaged Wikipedia leads, summary = first sentence, document = the rest",
    "xsum": "online: EdinburghNLP/xsum test split via HF datasets (pip install datasets)",
}
LEAD_WIKI_START = 2000          # corpus index of the first article used
LEAD_WIKI_MIN_WORDS = 60        # words after the first sentence
LEAD_WIKI_MIN_SUMMARY = 6       # words in the first sentence
SHOT_POOL = 16                  # examples at the end of the permutation reserved for few-shot prompts
XSUM = ("EdinburghNLP/xsum", None, "test")


# ----------------------------------------------------------------------------- examples
_ABBREV = frozenset(
    "mr mrs ms dr prof st mt ft jr sr sen rep gov gen col lt capt sgt rev hon no nos vs etc ca c b d fl approx "
    "inc ltd co corp bros jan feb mar apr jun jul aug sep sept oct nov dec vol pp ed est op cf al ave blvd".split())
_BOUNDARY = re.compile(r"([.!?][\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def first_sentence(text: str) -> tuple[str, str]:
    """Split `text` into (first sentence, the rest), both stripped; (text, "") without a boundary.

    A boundary is ., ! or ? (optionally closing quotes/brackets), whitespace, then a capital or digit,
    outside parentheses and brackets, and not after an abbreviation (St., Dr., c., ...), an initial
    (J. R. R. Tolkien) or a dotted acronym (U.S., i.e.).
    """
    for m in _BOUNDARY.finditer(text):
        head = text[:m.start()]
        if head.count("(") > head.count(")") or head.count("[") > head.count("]"):
            continue
        word = head.rsplit(None, 1)[-1].lstrip("(\"'\u201c") if head.strip() else ""
        if text[m.start()] == "." and (word.lower() in _ABBREV or len(word) == 1 or "." in word):
            continue
        return text[:m.end(1)].strip(), text[m.end():].strip()
    return text.strip(), ""


@functools.lru_cache(maxsize=4)
def _lead_wiki() -> tuple[dict, ...]:
    out = []
    for i, doc in enumerate(data_mod.documents("wiki")):
        if i < LEAD_WIKI_START:
            continue
        summary, rest = first_sentence(" ".join(doc.split()))
        if len(rest.split()) >= LEAD_WIKI_MIN_WORDS and len(summary.split()) >= LEAD_WIKI_MIN_SUMMARY:
            out.append({"id": f"wiki-{i}", "document": rest, "summary": summary})
    return tuple(out)


def _load_hf(path: str, config: str | None, split: str):
    """`kvlab.data.load_hf_dataset` for a summarization task (its errors name the cause and the offline task)."""
    return data_mod.load_hf_dataset(path, config, split, "summarization task 'xsum'",
                                    "Offline, use the packaged task 'lead-wiki' (Wikipedia leads, summary = first sentence).")


@functools.lru_cache(maxsize=2)
def _xsum() -> tuple[dict, ...]:
    ds = _load_hf(*XSUM)
    missing = [c for c in ("document", "summary") if c not in ds.column_names]
    if missing:
        raise KVLabError(f"xsum rows lack {', '.join(missing)} (columns: {', '.join(ds.column_names)})")
    ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
    return tuple({"id": f"xsum-{i}", "document": " ".join(str(d).split()), "summary": " ".join(str(s).split())}
                 for i, d, s in zip(ids, ds["document"], ds["summary"]) if str(d).strip() and str(s).strip())


def _rows(task: str) -> tuple[dict, ...]:
    if task == "lead-wiki":
        return _lead_wiki()
    if task == "xsum":
        return _xsum()
    raise KVLabError(f"unknown summarization task {task!r}; tasks: " + "; ".join(f"{k} ({v})" for k, v in TASKS.items()))


def _order(task: str, seed: int) -> tuple[tuple[dict, ...], list[int]]:
    rows = _rows(task)
    if len(rows) <= SHOT_POOL:
        raise KVLabError(f"task {task!r} has only {len(rows)} usable examples; it needs more than {SHOT_POOL}")
    perm = list(range(len(rows)))
    random.Random(seed).shuffle(perm)
    return rows, perm


def examples(task: str = "lead-wiki", n: int | None = 50, seed: int = 0) -> list[dict]:
    """`n` evaluation examples of `task` (all when None), each {"id", "document", "summary"}.

    Deterministic in (task, n, seed); the first `n` of a seeded permutation, so a smaller `n` is a
    prefix of a larger one. The last `SHOT_POOL` of the permutation are reserved for `shot_examples`.
    """
    rows, perm = _order(task, seed)
    avail = len(perm) - SHOT_POOL
    if n is None:
        n = avail
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= avail:
        raise KVLabError(f"n must be an int in [1, {avail}] for task {task!r} (or None for all), got {n!r}")
    return [dict(rows[i]) for i in perm[:n]]


def shot_examples(task: str = "lead-wiki", k: int = 1, seed: int = 0) -> list[dict]:
    """`k` few-shot examples, disjoint from every `examples(task, n, seed)`, the same for all prompts
    (HELM draws its in-context examples once per seed)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= SHOT_POOL:
        raise KVLabError(f"n_shot must be an int in [0, {SHOT_POOL}], got {k!r}")
    rows, perm = _order(task, seed)
    return [dict(rows[i]) for i in perm[len(perm) - k:]][::-1] if k else []


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Template:
    """A summarization prompt: `{article} {document}{instruction}` continued by the model; a few-shot
    example adds `{answer}{summary}{separator}`."""

    article: str
    instruction: str
    answer: str
    separator: str


TEMPLATES: dict[str, Template] = {
    # default: HELM's wording without its "###" separators, with an output prefix (measured best for
    # SmolLM2-135M-Instruct, see the module docstring)
    "kvlab": Template("Article:", "\n\nSummarize the article in one sentence.\nSummary:", " ", "\n\n"),
    # HELM's get_summarization_adapter_spec(num_sents=1), exactly (H2O's and Q-Hitter's XSum prompt)
    "helm": Template("###\nArticle:", "\n\nSummarize the above article in 1 sentence.\n", "", "\n"),
}


def _template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KVLabError(f"unknown prompt template {name!r}; use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def build_prompts(tokenizer: Any, items: Sequence[dict], shots: Sequence[dict] = (), max_context_tokens: int = 512,
                  template: str = "kvlab") -> list[list[int]]:
    """Token ids of the summarization prompt of each item, after the few-shot `shots`.

    The ids concatenate separately encoded pieces (the same ids as encoding the whole text for
    byte-level BPE tokenizers such as SmolLM2's, whose pre-tokenizer splits at these spaces and line
    breaks); every document, shots' included, is cut to its first `max_context_tokens` tokens, so all
    long documents give prompts of one length (one batch).
    """
    tok = data_mod._tokenizer(tokenizer)
    t = _template(template)
    head, tail = data_mod._encode(tok, t.article), data_mod._encode(tok, t.instruction)

    def article(doc: str) -> list[int]:
        return head + data_mod._encode(tok, " " + doc)[:max_context_tokens] + tail

    prefix = [i for s in shots
              for i in article(s["document"]) + data_mod._encode(tok, t.answer + s["summary"] + t.separator)]
    return [prefix + article(it["document"]) for it in items]


def summary_text(text: str) -> str:
    """The summary in generated text: the first sentence (`first_sentence`) of its first non-empty line,
    before any `###`, stripped.

    Cutting at the line break follows HELM (its output suffix is a newline). Cutting at the sentence
    end stands in for the end-of-sequence token: `kvlab.retrieval.generate` always generates
    `max_new_tokens` tokens (equal lengths in a batch), so an instruct model that would stop after its
    sentence writes on instead.
    """
    return first_sentence(text.lstrip().split("\n", 1)[0].split("###", 1)[0].strip())[0]


# ----------------------------------------------------------------------------- generation
def _batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of prompts grouped by exact token length (no padding), at most `batch_size` per group."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    return [idx[s:s + batch_size] for idx in by_len.values() for s in range(0, len(idx), batch_size)]


def _generate_all(lm: LoadedModel, method: Method | str, prompts: Sequence[Sequence[int]], plan: list[list[int]],
                  max_new_tokens: int, protocol: str, desc: str, progress: bool) -> torch.Tensor:
    """Greedy continuations [N, max_new_tokens] (CPU) of every prompt, batch by batch of `plan`."""
    from tqdm.auto import tqdm

    out = torch.empty(len(prompts), max_new_tokens, dtype=torch.long)
    with tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for idx in plan:
            ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long)
            out[idx] = generate(lm, method, ids, max_new_tokens, protocol=protocol).cpu()
            bar.update(len(idx))
    return out


def _summary_lengths(tok: Any, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the fewest leading tokens whose text already gives the row's summary (`summary_text`)."""
    lengths = []
    for row in ids.tolist():
        final = summary_text(tok.decode(row, skip_special_tokens=True))
        lengths.append(next(j for j in range(len(row) + 1)
                            if summary_text(tok.decode(row[:j], skip_special_tokens=True)) == final))
    return torch.tensor(lengths, dtype=torch.long)


def _digest(prompts: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(torch.tensor(list(p), dtype=torch.int64).numpy().tobytes() + b"|")
    return h.hexdigest()


def reference_summaries(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
                        progress: bool = False, data_key: str = "") -> dict[str, torch.Tensor]:
    """The fp model's greedy continuations of `prompts`, generated once and cached on disk.

    Returns CPU tensors {"ids": [N, max_new_tokens] every generated token, "lengths": [N] how many
    leading tokens make up the summary (`ids[i, :lengths[i]]` decodes to it; the rest is the
    continuation after it)}. Keyed by the model's fingerprint (name, config and weight hashes), device
    type, dtype, a hash of the prompt ids, the batching and `max_new_tokens` (kind "reference").
    """
    plan = _batches(prompts, batch_size)
    key = {"what": "summarize-fp-generation", "model": model_fingerprint(lm), "device": lm.device.type,
           "dtype": str(next(lm.model.parameters()).dtype), "prompts": _digest(prompts), "n_prompts": len(prompts),
           "batches": plan, "max_new_tokens": max_new_tokens, "data": data_key}

    def compute() -> dict[str, torch.Tensor]:
        ids = _generate_all(lm, "fp16", prompts, plan, max_new_tokens, "prefill-decode", "fp reference", progress)
        return {"ids": ids, "lengths": _summary_lengths(lm.tokenizer, ids)}

    return cached("reference", key, compute)


# ----------------------------------------------------------------------------- evaluation
def _check_int(name: str, value: Any, lo: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise KVLabError(f"{name} must be an int >= {lo}, got {value!r}; {fix}")


def data_key(task: str, n: int, seed: int, n_shot: int, max_context_tokens: int, max_new_tokens: int,
             template: str = "kvlab") -> str:
    """The results-store `data` of a summarization evaluation, e.g. `summ:lead-wiki:n=50,seed=0,shot=0,ctx=512,new=64`."""
    key = f"summ:{task}:n={n},seed={seed},shot={n_shot},ctx={max_context_tokens},new={max_new_tokens}"
    return key if template == "kvlab" else f"{key},tpl={template}"


def evaluate_summaries(lm: LoadedModel, method: Method | str = "fp16", task: str = "lead-wiki", n: int | None = 50,
                       seed: int = 0, n_shot: int = 0, max_new_tokens: int = 64, protocol: str = "prefill-decode",
                       progress: bool = True, label: str | None = None, max_context_tokens: int = 512,
                       template: str = "kvlab", batch_size: int = 8) -> EvalResult:
    """ROUGE of `method`'s greedy one-sentence summaries on `n` examples of `task` (module docstring).

    Returns an `EvalResult` whose `metrics` hold model, data (`data_key(...)`), label, method,
    protocol, `rouge1`, `rouge2`, `rougeL` (F1 against the reference, mean over examples),
    `rougeL_fp` (ROUGE-L F1 against the fp model's summary), `exact_fp` (fraction of summaries
    identical to the fp model's), `n_examples` and `seconds` (the method's generation only). The
    per-example DataFrame (id, reference, generated, fp_generated, rouge1, rouge2, rougeL, rougeL_fp,
    same_as_fp, prompt_tokens, summary_tokens, fp_summary_tokens) is `result.examples`, also
    `result.info[0]["examples"]`.

    `n_shot` few-shot examples (the same for every prompt, never evaluated) precede each article;
    0 by default: SmolLM2-135M copies the shot's summary or starts a new article instead. A method
    that needs calibration is calibrated with `kvlab.calibrate` on the corpus start.
    """
    require_rouge_score()         # before any generation: a missing `rouge_score` fails at once
    if lm.tokenizer is None:
        raise KVLabError(f"evaluate_summaries needs a model with a tokenizer; '{lm.name}' has none")
    if protocol not in PROTOCOLS:
        raise KVLabError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    _check_int("max_new_tokens", max_new_tokens, 1, "64 is HELM's XSum setting")
    _check_int("max_context_tokens", max_context_tokens, 1, "the document token budget, e.g. 512")
    _check_int("batch_size", batch_size, 1, "prompts of equal token length are batched up to it")
    _check_int("seed", seed, 0, "any non-negative int")
    _template(template)
    m = parse(method)
    check_protocol(m, protocol)
    spec_label = label or (method if isinstance(method, str) else m.spec)
    items = examples(task, n, seed)
    shots = shot_examples(task, n_shot, seed)
    prompts = build_prompts(lm.tokenizer, items, shots, max_context_tokens, template)
    longest = max(map(len, prompts))
    if longest + max_new_tokens > lm.max_context:
        raise KVLabError(f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's {lm.max_context} positions; lower max_context_tokens or n_shot")
    key = data_key(task, len(items), seed, n_shot, max_context_tokens, max_new_tokens, template)
    ref = reference_summaries(lm, prompts, max_new_tokens, batch_size, progress, key)
    m = calibrate(lm, m, n_tokens=TASK_TOKENS)
    plan = _batches(prompts, batch_size)
    t0 = time.perf_counter()
    got = _generate_all(lm, m, prompts, plan, max_new_tokens, protocol, str(spec_label), progress)
    seconds = time.perf_counter() - t0
    df = _score(lm.tokenizer, items, prompts, got, ref)
    metrics = {"model": lm.model_id, "data": key, "label": spec_label, "method": m.spec, "protocol": protocol,
               **{c: float(df[c].mean()) for c in ("rouge1", "rouge2", "rougeL", "rougeL_fp")},
               "exact_fp": float(df["same_as_fp"].mean()), "n_examples": len(df), "seconds": seconds}
    info = [{"examples": df, "shots": [s["id"] for s in shots], "batches": len(plan), "template": template}]
    result = EvalResult(metrics, None, info)
    result.examples = df
    return result


def _score(tok: Any, items: Sequence[dict], prompts: Sequence[Sequence[int]], got: torch.Tensor,
           ref: dict[str, torch.Tensor]):
    import pandas as pd

    lengths = _summary_lengths(tok, got).tolist()
    rows = []
    for it, p, g, f, n_g, n_f in zip(items, prompts, got.tolist(), ref["ids"].tolist(), lengths, ref["lengths"].tolist()):
        gen = summary_text(tok.decode(g, skip_special_tokens=True))
        fp = summary_text(tok.decode(f, skip_special_tokens=True))
        s = rouge(gen, it["summary"])
        rows.append({"id": it["id"], "reference": it["summary"], "generated": gen, "fp_generated": fp,
                     "rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure, "rougeL": s["rougeL"].fmeasure,
                     "rougeL_fp": 1.0 if gen == fp else rouge(gen, fp, ("rougeL",))["rougeL"].fmeasure,
                     "same_as_fp": gen == fp,
                     "prompt_tokens": len(p), "summary_tokens": n_g, "fp_summary_tokens": n_f})
    return pd.DataFrame(rows)
