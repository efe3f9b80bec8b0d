"""Your own data in one flag: `file:PATH` corpora (plain text, .jsonl) through kvlab.data, kvlab.evaluate,
calibration and `kvlab eval`, each error they give, and `kvlab.load` of a local model folder."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import kvlab
from kvlab import data
from kvlab.calibration import calibration_ids
from kvlab.cli import main
from kvlab.errors import KVLabError
from kvlab.models import ByteTokenizer

BT = ByteTokenizer()
WORDS = ("the quick brown fox jumps over the lazy dog while a cat sleeps on the warm mat and "
         "nobody minds the noise of the rain on the roof ").split()


def _prose(n_chars: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g).tolist()) + "."
        out.append(sentence.capitalize())
        size += len(sentence) + 1
    return " ".join(out)


def _byte_ids(s: str) -> list[int]:
    return [b + 3 for b in s.encode("utf-8")]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVLAB_STORE", str(tmp_path / "results.sqlite"))
    data.clear_caches()
    yield
    data.clear_caches()


@pytest.fixture(scope="module")
def tiny():
    return kvlab.tiny("llama")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "own.txt"
    p.write_text(_prose(700) + "\n\n" + _prose(700, seed=1) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def jsonl_file(tmp_path):
    p = tmp_path / "own.jsonl"
    rows = [{"text": _prose(300, seed=i), "id": i} for i in range(5)]
    p.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    return p, [r["text"] for r in rows]


# ----------------------------------------------------------------------------- reading
def test_text_file_is_its_text(text_file):
    name = f"file:{text_file}"
    assert data.text(name) == text_file.read_text()
    assert len(data.documents(name)) == 2                     # split at the blank line, rejoined losslessly
    ids = data.tokens(BT, name, 300)
    assert ids.tolist() == _byte_ids(text_file.read_text())[:300]


def test_jsonl_documents_are_its_text_fields(jsonl_file):
    path, texts = jsonl_file
    name = f"file:{path}"
    assert data.documents(name) == texts                      # blank lines skipped, other fields ignored
    assert data.tokens(BT, name, 500).tolist() == _byte_ids("\n\n".join(texts))[:500]
    w = data.windows(BT, name, n_tokens=512, window=128)
    assert w.shape == (4, 128) and w.reshape(-1).tolist() == _byte_ids("\n\n".join(texts))[:512]


def test_relative_path_bom_and_crlf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "crlf.txt").write_bytes("\ufeffline one\r\n\r\nline two\r\n".encode("utf-8"))
    assert data.documents("file:crlf.txt") == ["line one", "line two\n"]


def test_edited_file_is_tokenised_again(text_file, tmp_path, monkeypatch):
    name = f"file:{text_file}"
    first = data.tokens(BT, name, 200)
    cache = tmp_path / "cache" / "tokens"
    assert len(list(cache.glob("*.pt"))) == 1
    data.clear_caches()
    parse = data._parse_file
    monkeypatch.setattr(data, "_parse_file", lambda *a: pytest.fail("re-parsed although the token cache holds it"))
    assert torch.equal(data.tokens(BT, name, 200), first)     # unchanged content: a cache hit
    monkeypatch.setattr(data, "_parse_file", parse)
    text_file.write_text("Edited. " + text_file.read_text())  # same path, new content
    second = data.tokens(BT, name, 200)
    assert second.tolist() == _byte_ids("Edited. ")[:8] + first.tolist()[:192]
    assert len(list(cache.glob("*.pt"))) == 2
    assert data.corpus_id(name) == "file:text:sha256:" + hashlib.sha256(text_file.read_bytes()).hexdigest()


def test_cache_is_keyed_by_content_not_path(text_file, tmp_path, monkeypatch):
    first = data.tokens(BT, f"file:{text_file}", 200)
    moved = tmp_path / "sub" / "renamed.txt"
    moved.parent.mkdir()
    moved.write_bytes(text_file.read_bytes())
    parse = data._parse_file
    monkeypatch.setattr(data, "_parse_file", lambda *a: pytest.fail("a copy of the same text was tokenised again"))
    assert torch.equal(data.tokens(BT, f"file:{moved}", 200), first)
    monkeypatch.setattr(data, "_parse_file", parse)
    as_jsonl = tmp_path / "same-bytes.jsonl"                  # the same bytes read as .jsonl: another corpus
    as_jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
    as_text = tmp_path / "same-bytes.txt"
    as_text.write_bytes(as_jsonl.read_bytes())
    assert data.tokens(BT, f"file:{as_jsonl}", 4).tolist() == _byte_ids("a\n\nb")[:4]
    assert data.tokens(BT, f"file:{as_text}", 4).tolist() == _byte_ids('{"te')


def test_calibration_reads_file_corpora(tiny, text_file):
    ids = calibration_ids(tiny, f"file:{text_file}", n_tokens=256, window=64, skip=128)
    assert ids.shape == (4, 64) and ids.reshape(-1).tolist() == _byte_ids(text_file.read_text())[128:384]


# ----------------------------------------------------------------------------- kvlab.evaluate and kvlab eval
def test_evaluate_on_a_text_file(tiny, text_file):
    name = f"file:{text_file}"
    res = kvlab.evaluate(tiny, "int4", data=name, n_tokens=256, window=64, progress=False)
    m = res.metrics
    assert m["data"].startswith(f"{name}@sha256:") and m["data"].endswith(":n=256,w=64") and m["n_scored"] == 4 * 63
    assert torch.isfinite(torch.tensor(m["ppl"])) and m["kl"] > 0
    fp = kvlab.evaluate(tiny, "fp16", data=name, n_tokens=256, window=64, progress=False).metrics
    assert fp["kl"] == pytest.approx(0, abs=1e-6) and fp["top1"] == 1.0


def test_evaluate_on_jsonl_with_a_calibrated_method(tiny, jsonl_file):
    path, _ = jsonl_file
    method = "kvquant:bits=2,calib_rows=none,calib_len=none"       # calibrates on the tokens after the eval range
    res = kvlab.evaluate(tiny, method, data=f"file:{path}", n_tokens=128, window=64, calib_tokens=128,
                         progress=False)
    assert res.metrics["n_scored"] == 2 * 63 and res.metrics["kl"] > 0
    with pytest.raises(KVLabError, match=r"has \d+ tokens with this tokenizer, but 2128 are needed"):
        kvlab.evaluate(tiny, method, data=f"file:{path}", n_tokens=128, window=64, calib_tokens=2000,
                       progress=False)


def test_cli_eval_on_own_file(text_file, jsonl_file, capsys):
    for name in (f"file:{text_file}", f"file:{jsonl_file[0]}"):
        assert main(["eval", "--model", "tiny-llama", "--device", "cpu", "--data", name, "--method", "fp16",
                     "--method", "int4", "--n-tokens", "128", "--window", "64", "--no-store"]) == 0
        out = capsys.readouterr().out
        assert f"data: {name}@sha256:" in out and ":n=128,w=64" in out and "int4" in out


def test_cli_eval_checks_the_file_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kvlab.models, "load", lambda *a, **k: pytest.fail("model loaded before the data check"))
    missing = tmp_path / "nope.txt"
    assert main(["eval", "--model", "tiny-llama", "--data", f"file:{missing}", "--method", "fp16", "--no-store"]) == 2
    err = capsys.readouterr().err
    assert f"corpus file '{missing}' does not exist" in err
    assert main(["eval", "--model", "tiny-llama", "--data", "wikipedia", "--method", "fp16", "--no-store"]) == 2
    assert "file:PATH" in capsys.readouterr().err
    assert main(["eval", "--task", "lead-wiki", "--data", f"file:{missing}", "--method", "fp16", "--no-store"]) == 2
    assert "--data applies to --task ppl only" in capsys.readouterr().err


def test_cli_help_names_file_corpora(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "file:PATH" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, r"corpus file '.*missing\.txt' does not exist"),
    ("empty.txt", b"", r"corpus file '.*empty\.txt' is empty"),
    ("blank.txt", b" \n\n\t\n", r"corpus file '.*blank\.txt' is empty \(only white space\)"),
    ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), r"'.*latin1\.txt' is not UTF-8 text: byte 3 \(line 1\) is 0xe9"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "unterminated\n', r"'.*bad\.jsonl', line 2: not JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x", "id": 1}\n', r"'.*notext\.jsonl', line 2: an object without a 'text' field \(keys: body, id\)"),
    ("list.jsonl", b'["a", "b"]\n', r"line 1: a JSON list, not an object with a 'text' field"),
    ("number.jsonl", b'{"text": 3}\n', r"line 1: 'text' is a JSON int, not a string"),
    ("blanks.jsonl", b'{"text": ""}\n{"text": "  "}\n', r"'.*blanks\.jsonl' has no text: every 'text' field is empty"),
])
def test_file_errors_name_the_file_and_the_problem(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KVLabError, match=match):
        data.documents(f"file:{path}")
    with pytest.raises(KVLabError, match=match):                 # the same through tokens (the cache key reads it)
        data.tokens(BT, f"file:{path}", 10)


def test_other_name_errors(tmp_path, monkeypatch):
    with pytest.raises(KVLabError, match="is a folder"):
        data.documents(f"file:{tmp_path}")
    with pytest.raises(KVLabError, match="names no file"):
        data.documents("file:")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("some text")
    with pytest.raises(KVLabError, match="write data='file:mine.txt'"):   # a bare path: the fix is named
        data.documents("mine.txt")
    with pytest.raises(KVLabError, match=r"'gone\.txt' \(= .*gone\.txt\) does not exist"):
        data.check_corpus("file:gone.txt")


def test_too_few_tokens_says_how_many_there_are_and_are_needed(tmp_path, tiny):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300)
    with pytest.raises(KVLabError, match=r"'.*short\.txt' has 300 tokens with this tokenizer, but 512 are needed "
                                          r"\(n_tokens=512 for 4 windows of 128\)"):
        data.windows(BT, f"file:{path}", n_tokens=512, window=128)
    with pytest.raises(KVLabError, match="has 300 tokens .* but 2048 are needed"):
        kvlab.evaluate(tiny, "fp16", data=f"file:{path}", progress=False)


# ----------------------------------------------------------------------------- kvlab.load of a local folder
def _save_tiny_model(folder):
    """A tiny llama saved as save_pretrained writes it, with a byte-level BPE tokenizer (no merges) that
    `tokenizers` builds locally: the ByteTokenizer of kvlab.tiny cannot be saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kvlab.tiny("llama").model.save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}   # 259 < 320
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-local")


def test_load_local_folder_offline(model_folder, text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = kvlab.load(str(model_folder), device="cpu")
    ref = kvlab.tiny("llama")
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), ref.model.state_dict().values()))
    s = "héllo wörld"
    assert lm.tokenizer.decode(lm.tokenizer.encode(s, add_special_tokens=False)) == s
    m = kvlab.evaluate(lm, "int4", data=f"file:{text_file}", n_tokens=128, window=64, progress=False).metrics
    assert m["model"] == str(model_folder) and m["kl"] > 0
    monkeypatch.chdir(model_folder.parent)                          # a relative folder name works too
    assert kvlab.load(f"./{model_folder.name}", device="cpu").tokenizer is not None


def test_load_local_folder_errors(model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVLabError, match=r"model folder '.*nope' does not exist"):
        kvlab.load(str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KVLabError, match=r"model folder './nope' \(= .*nope\) does not exist"):
        kvlab.load("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KVLabError, match=r"'empty' .* has no config.json \(it is empty\)"):
        kvlab.load("empty")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    with pytest.raises(KVLabError, match=r"has config.json but no weights: no \*.safetensors"):
        kvlab.load(str(no_weights))
    (no_weights / "model.safetensors").write_bytes((model_folder / "model.safetensors").read_bytes())
    with pytest.raises(KVLabError, match="has no tokenizer files .*tokenizer.save_pretrained"):
        kvlab.load(str(no_weights))
    with pytest.raises(KVLabError, match="is a file, not a folder"):
        kvlab.load(str(model_folder / "config.json"))


def test_the_results_key_of_a_file_corpus_follows_its_content(tmp_path):
    """A stored result is keyed by EvalSpec.key: an edited file must not read back the old result."""
    from kvlab.evaluation import EvalSpec

    f = tmp_path / "notes.txt"
    f.write_text("first version of the notes\n\nsecond paragraph\n", encoding="utf-8")
    before = EvalSpec(data=f"file:{f}", n_tokens=64, window=32).key
    f.write_text("an edited version of the notes\n\nsecond paragraph\n", encoding="utf-8")
    after = EvalSpec(data=f"file:{f}", n_tokens=64, window=32).key
    assert before != after and before.startswith(f"file:{f}@sha256:") and after.endswith(":n=64,w=32")
    assert EvalSpec(data="wiki", n_tokens=64, window=32).key == "wiki:n=64,w=32"
