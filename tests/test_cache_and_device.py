"""Unwritable / read-only caches, portable cache keys, and clear device errors.

How read-only is simulated (tests run as root, where chmod does not stop writes):
- an unwritable *missing* cache is real: KVLAB_CACHE points below a regular file, so the OS refuses
  to create it (ENOTDIR) for root too;
- a read-only *prepared* cache in-process: the `read_only` fixture makes every Python write entry
  point (os.mkdir, os.open for writing, open()/io.open in a write mode, os.replace/rename/unlink)
  raise OSError(EROFS) for paths under the cache, as a read-only mount would; it proves kvlab's
  handling of those errors, not the kernel's;
- `test_real_read_only_mount_*` checks the real thing: a read-only bind mount in a private mount
  namespace (`unshare -m`), skipped where namespaces are not allowed.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import kvlab
from kvlab import cli, data, diskcache, models, paths
from kvlab.errors import KVLabError
from kvlab.models import ByteTokenizer

BT = ByteTokenizer()
FIX_WORDS = ("KVLAB_CACHE", "writable", "kvlab prepare")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """No warnings or in-memory results carried over from another test."""
    monkeypatch.setattr(paths, "_WARNED", set(), raising=False)
    monkeypatch.setattr(diskcache, "_MEMORY", OrderedDict(), raising=False)
    monkeypatch.setattr(data, "_TOKENS_MEMORY", {}, raising=False)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVLAB_CACHE", str(root))
    return root


def _under(p, root: str) -> bool:
    try:
        a = os.path.abspath(os.fspath(p))
    except TypeError:          # file descriptors, dir_fd arguments
        return False
    return a == root or a.startswith(root + os.sep)


def _erofs(p):
    return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(root)`: from now on every write under `root` fails with EROFS (reads still work)."""
    def apply(root: Path) -> None:
        r = os.path.abspath(root)
        real_mkdir, real_open, real_bopen = os.mkdir, os.open, builtins.open
        real_replace, real_rename, real_unlink, real_remove = os.replace, os.rename, os.unlink, os.remove

        def mkdir(p, *a, **k):
            if _under(p, r):
                if os.path.exists(p):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(p))
                raise _erofs(p)
            return real_mkdir(p, *a, **k)

        def os_open(p, flags, *a, **k):
            if _under(p, r) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
                raise _erofs(p)
            return real_open(p, flags, *a, **k)

        def bopen(file, mode="r", *a, **k):
            if _under(file, r) and any(c in mode for c in "wax+"):
                raise _erofs(file)
            return real_bopen(file, mode, *a, **k)

        def two(real):
            def f(src, dst, *a, **k):
                if _under(src, r) or _under(dst, r):
                    raise _erofs(dst)
                return real(src, dst, *a, **k)
            return f

        def one(real):
            def f(p, *a, **k):
                if _under(p, r):
                    raise _erofs(p)
                return real(p, *a, **k)
            return f

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", bopen)
        monkeypatch.setattr(io, "open", bopen)
        monkeypatch.setattr(os, "replace", two(real_replace))
        monkeypatch.setattr(os, "rename", two(real_rename))
        monkeypatch.setattr(os, "unlink", one(real_unlink))
        monkeypatch.setattr(os, "remove", one(real_remove))
    return apply


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _no_corpus(*_a, **_k):
    """Stands in for `data.documents`: a tokens-cache miss reads the corpus, a hit does not."""
    raise AssertionError("the corpus was read and tokenised again: the cache was missed")


# ----------------------------------------------------------------------------- 1a: cache that cannot be created
@pytest.fixture
def uncreatable(tmp_path, monkeypatch) -> Path:
    """KVLAB_CACHE below a regular file: the OS refuses to create it (ENOTDIR), for root as well."""
    (tmp_path / "a-file").write_text("not a folder")
    root = tmp_path / "a-file" / "cache"
    monkeypatch.setenv("KVLAB_CACHE", str(root))
    return root


def test_cache_root_does_not_raise_and_reports_why_it_is_not_writable(uncreatable):
    assert paths.cache_root() == uncreatable            # before: NotADirectoryError from mkdir
    assert not uncreatable.exists()
    assert "cannot be created" in paths.cache_write_problem()
    assert paths.cache_dir("tokens") == uncreatable / "tokens"
    with pytest.raises(paths.CacheNotWritable) as ei:
        paths.require_writable("a test")
    assert isinstance(ei.value, KVLabError) and str(uncreatable) in str(ei.value)
    assert all(w in str(ei.value) for w in FIX_WORDS)


def test_cli_info_reports_an_unwritable_cache(uncreatable, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {uncreatable} (NOT WRITABLE" in out
    assert "model smollm2-135m: not prepared (set KVLAB_CACHE to a writable folder" in out
    assert "corpus wiki:" in out and "methods:" in out          # the rest is still printed


@pytest.mark.parametrize("argv", [["prepare"], ["eval", "--method", "int4", "--no-store"]])
def test_cli_prepare_and_eval_fail_clearly_on_an_unwritable_empty_cache(uncreatable, capsys, monkeypatch, argv):
    monkeypatch.setattr(models, "_convert", lambda *a, **k: pytest.fail("conversion started"), raising=False)
    assert cli.main(argv) == 2                          # before: a raw NotADirectoryError traceback
    err = capsys.readouterr().err
    assert err.startswith("kvlab: error: the kvlab cache folder") and str(uncreatable) in err
    assert "not writable" in err and all(w in err for w in FIX_WORDS)


def test_load_embedded_in_an_empty_read_only_cache_is_a_clear_error(cache, read_only, monkeypatch):
    cache.mkdir()
    read_only(cache)
    monkeypatch.setattr(models, "_convert", lambda *a, **k: pytest.fail("conversion started"), raising=False)
    with pytest.raises(paths.CacheNotWritable, match="Read-only file system") as ei:
        kvlab.load("smollm2-135m", device="cpu")
    assert str(cache) in str(ei.value) and "converting the embedded model" in str(ei.value)


def test_cli_turns_a_stray_cache_write_error_into_a_clear_message(cache, capsys, monkeypatch):
    def boom(args):
        raise OSError(errno.EROFS, "Read-only file system", str(cache / "tokens" / "x.pt"))
    monkeypatch.setattr(cli, "cmd_prepare", boom)
    assert cli.main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(cache) in err and "KVLAB_CACHE" in err


# ----------------------------------------------------------------------------- 1b: prepared cache, read-only
def test_read_only_fixture_really_blocks_writes(cache, read_only):
    cache.mkdir()
    read_only(cache)
    with pytest.raises(OSError) as ei:
        (cache / "x").write_text("x")
    assert ei.value.errno == errno.EROFS
    assert paths.cache_write_problem() == "Read-only file system"


def test_tokens_read_only_cache_hits_and_new_tokenisation_is_kept_in_memory(cache, read_only, monkeypatch, capsys):
    prepared = data.tokens(BT, "wiki", 300)
    before = _files(cache)
    read_only(cache)
    documents = data.documents
    monkeypatch.setattr(data, "documents", _no_corpus)
    assert torch.equal(data.tokens(BT, "wiki", 300), prepared)        # a hit: read, not recomputed
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(data, "documents", documents)
    new = data.tokens(BT, "wiki", 200)                                 # a miss: computed in memory
    assert torch.equal(new, prepared[:200])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and str(cache) in err and "Read-only file system" in err
    monkeypatch.setattr(data, "documents", _no_corpus)
    again = data.tokens(BT, "wiki", 200)                               # kept: not tokenised twice
    assert torch.equal(again, new) and capsys.readouterr().err == ""   # warned once
    again[0] = -1
    assert data.tokens(BT, "wiki", 200)[0] == new[0]                   # callers get their own copy
    assert _files(cache) == before                                     # nothing written


def test_diskcache_and_calibration_read_only_compute_once_keep_in_memory(cache, read_only, capsys):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(4.0) * len(calls)}
    prepared = diskcache.cached("calibration", {"a": 1}, compute)    # kvlab.calibration's cache kind
    read_only(cache)
    assert torch.equal(diskcache.cached("calibration", {"a": 1}, compute)["x"], prepared["x"]) and len(calls) == 1
    r1 = diskcache.cached("calibration", {"a": 2}, compute)
    r2 = diskcache.cached("calibration", {"a": 2}, compute)
    assert len(calls) == 2 and torch.equal(r1["x"], r2["x"])          # computed once, then kept
    ref = diskcache.cached("reference", {"b": 1}, lambda: {"y": torch.ones(2)})
    assert torch.equal(ref["y"], torch.ones(2))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("warning" in line and "kept in memory" in line for line in err)
    assert len(list((cache / "calibration").iterdir())) == 1          # only the prepared file
    assert not (cache / "reference").exists()


def test_evaluate_on_a_read_only_cache(cache, read_only, capsys):
    from kvlab.evaluation import evaluate
    lm = models.tiny("llama")
    read_only(cache)
    res = evaluate(lm, "int4", data="wiki", n_tokens=128, window=64, progress=False)
    assert res.metrics["ppl"] > 1 and 0 <= res.metrics["top1"] <= 1
    assert "kept in memory" in capsys.readouterr().err
    assert _files(cache) == set()


def test_atomic_write_leaves_nothing_when_the_rename_fails(cache, monkeypatch):
    target = cache / "k" / "f.pt"
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(_erofs(d)))
    with pytest.raises(paths.CacheNotWritable, match="Read-only file system"):
        paths.atomic_write(target, lambda fh: fh.write(b"x"), "a test")
    assert list((cache / "k").iterdir()) == []


# ----------------------------------------------------------------------------- 2: portable cache keys
def _embedded_tokenizer_files(dst: Path) -> Path:
    src = models.embedded_cache_path()
    if not models.embedded_cache_ready():
        pytest.skip("the embedded model is not prepared (kvlab prepare)")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


def test_token_cache_is_hit_after_moving_the_model_and_the_cache(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    # the first location: a tokenizer folder and a cache
    model_a = _embedded_tokenizer_files(tmp_path / "a" / "smollm2")
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "a" / "cache"))
    ids = data.tokens(AutoTokenizer.from_pretrained(str(model_a)), "wiki", 256)
    # moved: both folders copied elsewhere, the originals gone
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "b" / "cache"))
    tok_b = AutoTokenizer.from_pretrained(str(tmp_path / "b" / "smollm2"))
    monkeypatch.setattr(data, "documents", _no_corpus)
    assert torch.equal(data.tokens(tok_b, "wiki", 256), ids)           # before: a miss (the key held the path)


def test_tokenizer_fingerprint_tells_tokenizers_apart():
    class Shifted(ByteTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [i + 1 for i in super().encode(text)]
    assert data.tokenizer_fingerprint(BT) == data.tokenizer_fingerprint(ByteTokenizer())
    assert data.tokenizer_fingerprint(Shifted()) != data.tokenizer_fingerprint(BT)


def test_model_fingerprint_and_calibration_cache_survive_a_move(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    models.tiny("llama").model.save_pretrained(tmp_path / "a" / "m")
    m_a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "m"))
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "a" / "cache"))
    diskcache.cached("calibration", {"model": diskcache.model_fingerprint(m_a)}, lambda: {"x": torch.ones(3)})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    m_b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b" / "m"))
    fp = diskcache.model_fingerprint(m_b)
    assert fp == diskcache.model_fingerprint(m_a)                      # before: name and config held the path
    assert str(tmp_path) not in diskcache.canonical_json(fp)
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "b" / "cache"))
    hit = diskcache.cached("calibration", {"model": fp}, lambda: pytest.fail("recomputed after the move"))
    assert torch.equal(hit["x"], torch.ones(3))
    # still tells different weights apart
    assert diskcache.model_fingerprint(models.tiny("llama", seed=1).model) != diskcache.model_fingerprint(
        models.tiny("llama").model)


def test_portable_name_keeps_hub_ids_and_drops_local_folders(tmp_path):
    assert diskcache.portable_name("HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1"
    assert diskcache.portable_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert diskcache.portable_name(str(tmp_path / "x" / "smollm2-135m")) == "smollm2-135m"
    assert diskcache.portable_name("./models/m/") == "m"


# ----------------------------------------------------------------------------- 3: device errors
def _no_weights(monkeypatch):
    monkeypatch.setattr(models, "tiny", lambda *a, **k: pytest.fail("weights loaded before the device check"))
    monkeypatch.setattr(models, "_embedded_cache", lambda *a, **k: pytest.fail("weights loaded before the device check"))


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m"])
def test_cuda_on_a_cpu_only_torch_is_a_clear_error(monkeypatch, name):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    _no_weights(monkeypatch)
    with pytest.raises(KVLabError) as ei:                              # before: AssertionError
        kvlab.load(name, device="cuda")
    msg = str(ei.value)
    assert "'cuda'" in msg and "no CUDA" in msg and models.GPU_SETUP in msg and "--device cpu" in msg


def test_cuda_without_a_visible_gpu_and_out_of_range_index(monkeypatch):
    _no_weights(monkeypatch)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KVLabError, match="no CUDA GPU is visible.*--device cpu"):
        kvlab.load("tiny-llama", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KVLabError, match=r"'cuda:3' is out of range: 2 CUDA GPU\(s\) visible \(cuda:0 .. cuda:1\)"):
        kvlab.load("tiny-llama", device="cuda:3")
    with pytest.raises(KVLabError, match="'cuda:5' is out of range"):
        kvlab.load("tiny-llama", device_map={"": 5})


def test_mps_and_unknown_devices(monkeypatch):
    _no_weights(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    with pytest.raises(KVLabError, match="'mps'.*no MPS.*--device cpu"):
        kvlab.load("tiny-llama", device="mps")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(KVLabError, match="MPS is not available"):
        kvlab.load("tiny-llama", device="mps")
    with pytest.raises(KVLabError, match="unknown device 'gpu'"):
        kvlab.load("tiny-llama", device="gpu")
    assert models.check_device("cpu") == torch.device("cpu")
    assert models.check_device(None).type == models.default_device()


def test_cli_eval_device_error_comes_before_the_store_and_the_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    _no_weights(monkeypatch)
    store = tmp_path / "results.sqlite"
    rc = cli.main(["eval", "--model", "tiny-llama", "--method", "int4", "--device", "cuda", "--store", str(store)])
    assert rc == 2 and not store.exists()
    err = capsys.readouterr().err
    assert "device 'cuda'" in err and models.GPU_SETUP in err and "--device cpu" in err


# ----------------------------------------------------------------------------- the real thing: a read-only mount
def _can_unshare() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    import tempfile
    with tempfile.TemporaryDirectory() as d:   # a private namespace: the mount vanishes with it
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"],
                               capture_output=True)
    return probe.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` and mount (root in a Linux namespace)")
def test_real_read_only_mount_of_a_prepared_cache(tmp_path):
    """A prepared cache (model + tokens) on a real read-only bind mount: info and eval work, nothing is written."""
    from transformers import AutoTokenizer
    if not models.embedded_cache_ready():
        pytest.skip("the embedded model is not prepared (kvlab prepare)")
    src_model = models.embedded_cache_path()
    root = tmp_path / "cache"
    env = {**os.environ, "KVLAB_CACHE": str(root), "OMP_NUM_THREADS": "1"}
    old = os.environ.get("KVLAB_CACHE")
    os.environ["KVLAB_CACHE"] = str(root)
    try:  # prepare the tokens with the tokenizer at its usual place (the run reads it through the mount)
        data.tokens(AutoTokenizer.from_pretrained(str(src_model)), "wiki", 512)
    finally:
        os.environ.pop("KVLAB_CACHE") if old is None else os.environ.__setitem__("KVLAB_CACHE", old)
    (root / "models" / src_model.name).mkdir(parents=True)
    before = _files(root)
    kvlab_bin = str(Path(sys.executable).with_name("kvlab"))
    script = (f"set -e; mount --bind {root} {root}; mount -o remount,bind,ro {root}; "
              f"mount --bind {src_model} {root}/models/{src_model.name}; "
              f"mount -o remount,bind,ro {root}/models/{src_model.name}; "
              f"{kvlab_bin} info; {kvlab_bin} eval --method int4 --n-tokens 512 --window 512 --no-store")
    run = subprocess.run(["unshare", "-m", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"cache: {root} (NOT WRITABLE: Read-only file system)" in run.stdout
    assert "model smollm2-135m: ready" in run.stdout and "int:bits=4" in run.stdout
    assert "tokenised corpora are kept in memory" not in run.stderr                  # tokens: a hit
    assert "'reference' results are computed and kept in memory" in run.stderr       # reference: in memory
    assert _files(root) == before
