"""ROUGE-1, ROUGE-2 and ROUGE-L (Lin 2004), computed by Google's `rouge_score` package.

Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL Workshop on Text Summarization
Branches Out, 2004. The scores are `rouge_score.rouge_scorer.RougeScorer(types, use_stemmer=False)`
(the implementation HELM, lm-eval and HF `evaluate` call): tokens are lowercased runs of [a-z0-9]
(accented letters and punctuation split words and vanish), ROUGE-N counts clipped n-gram matches,
ROUGE-L uses the longest common subsequence, F1 = 2 P R / (P + R), and an empty candidate or
reference scores 0. No stemmer, which is `rouge_score`'s default; HELM passes `use_stemmer=True`
(Porter), so its numbers are slightly higher than unstemmed ones on the same text.

    >>> rouge("The cat sat on the mat.", "the cat is on the mat")["rougeL"]
    Score(precision=0.8333333333333334, recall=0.8333333333333334, fmeasure=0.8333333333333334)

What this adapter adds to `rouge_score`, and nothing else:

* kvlab's argument order, `rouge(candidate, reference)` (`RougeScorer.score` takes the target first);
* `corpus_rouge`: the mean of per-example F1 (what HELM and lm-eval report), not Lin's pooled counts;
* one scorer per set of types, built once; `Score` as a plain NamedTuple of floats;
* a `KVLabError` naming `pip install rouge-score` when the package is missing, and a ValueError that
  lists the valid types for an unknown one.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, NamedTuple, Sequence

from .errors import KVLabError

__all__ = ["Score", "tokenize", "rouge", "corpus_rouge", "require_rouge_score", "ROUGE_TYPES"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_VALID_TYPE = re.compile(r"rouge[1-9][0-9]*|rougeL|rougeLsum")


class Score(NamedTuple):
    """Precision, recall and F1 of one candidate against one reference (fields as in `rouge_score`)."""

    precision: float
    recall: float
    fmeasure: float


def _rouge_score():
    try:
        from rouge_score import rouge_scorer, tokenize as rs_tokenize
    except ImportError as exc:
        raise KVLabError("ROUGE scores (the summarization tasks lead-wiki and xsum) need Google's `rouge_score` "
                         f"package: pip install rouge-score (import failed: {exc})") from None
    return rouge_scorer, rs_tokenize


def require_rouge_score() -> None:
    """A KVLabError naming `pip install rouge-score` unless the package imports (checked before generating)."""
    _rouge_score()


@functools.lru_cache(maxsize=8)
def _scorer(types: tuple[str, ...]):
    bad = [t for t in types if not _VALID_TYPE.fullmatch(t)]
    if bad:
        raise ValueError(f"unknown ROUGE type {bad[0]!r}; use rouge1 .. rouge9, rougeL or rougeLsum")
    if not types:
        raise ValueError("no ROUGE types asked for; use e.g. ('rouge1', 'rouge2', 'rougeL')")
    return _rouge_score()[0].RougeScorer(list(types), use_stemmer=False)


def tokenize(text: str) -> list[str]:
    """The tokens `rouge_score` scores (no stemmer): lowercase, non-[a-z0-9] runs split words and vanish."""
    return _rouge_score()[1].tokenize(text, None)


def rouge(candidate: str, reference: str, types: Iterable[str] = ROUGE_TYPES) -> dict[str, Score]:
    """{"rouge1", "rouge2", "rougeL"} -> Score of `candidate` against `reference` (strings)."""
    types = tuple(types)
    got = _scorer(types).score(reference, candidate)     # rouge_score: score(target, prediction)
    return {t: Score(*map(float, got[t])) for t in types}


def corpus_rouge(candidates: Sequence[str], references: Sequence[str],
                 types: Iterable[str] = ROUGE_TYPES) -> dict[str, float]:
    """Mean per-example F1 of each ROUGE type (HELM's and lm-eval's corpus score); NaN for no examples."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
    types = tuple(types)
    _scorer(types)                                      # an unknown type fails even without examples
    if not candidates:
        return {t: float("nan") for t in types}
    scores = [rouge(c, r, types) for c, r in zip(candidates, references)]
    return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}
