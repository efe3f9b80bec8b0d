"""kvlab.diskcache: tensors cached on disk (calibration fits, fp references) and model fingerprints."""
from __future__ import annotations

import pytest
import torch

from kvlab import diskcache
from kvlab.errors import KVLabError


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    return tmp_path


def test_cached_computes_once_and_keys_on_parts(cache_root):
    calls = []

    def compute():
        calls.append(1)
        return {"a": torch.arange(3.)}

    key = {"model": "m", "data": "wiki:2048", "method": "kvquant:bits=3"}
    r1 = diskcache.cached("calibration/test", key, compute)
    r2 = diskcache.cached("calibration/test", dict(reversed(list(key.items()))), compute)   # same parts, other order
    assert len(calls) == 1 and torch.equal(r1["a"], r2["a"])
    diskcache.cached("calibration/test", {**key, "method": "kvquant:bits=2"}, compute)
    assert len(calls) == 2
    files = list((cache_root / "calibration" / "test").iterdir())
    assert len(files) == 2 and not any(f.name.endswith(".tmp") for f in files)


def test_cached_recomputes_corrupt_file(cache_root):
    key = {"model": "m"}
    diskcache.cached("calibration/test", key, lambda: {"a": torch.ones(2)})
    path = diskcache.cache_path("calibration/test", key)
    path.write_bytes(b"not a torch file")
    out = diskcache.cached("calibration/test", key, lambda: {"a": torch.zeros(2)})
    assert torch.equal(out["a"], torch.zeros(2))
    assert torch.equal(diskcache.cached("calibration/test", key, lambda: {"a": torch.ones(5)})["a"], torch.zeros(2))


def test_cached_rejects_bad_results(cache_root):
    with pytest.raises(KVLabError, match="dict"):
        diskcache.cached("calibration/test", {"x": 1}, lambda: {"a": 1})
    with pytest.raises(KVLabError, match="kind"):
        diskcache.cached("../x", {"x": 1}, lambda: {})


def test_model_fingerprint_separates_seeds():
    import kvlab

    a, b = kvlab.tiny("llama", seed=0), kvlab.tiny("llama", seed=1)
    fa, fb = diskcache.model_fingerprint(a), diskcache.model_fingerprint(b.model)
    assert fa["config"] == fb["config"] and fa["weights"] != fb["weights"]
    assert diskcache.model_fingerprint(a) == fa


def test_model_fingerprint_is_memoised_and_follows_in_place_edits(monkeypatch):
    import kvlab
    from kvlab import diskcache

    lm = kvlab.tiny("llama", seed=0)
    before = diskcache.model_fingerprint(lm)
    reads = []
    monkeypatch.setattr(diskcache, "tensor_digest", lambda t: reads.append(1) or "x")
    assert diskcache.model_fingerprint(lm) == before and not reads        # memo: no weight is read
    with torch.no_grad():
        next(lm.model.parameters()).add_(1.0)                             # in-place edit bumps _version
    assert diskcache.model_fingerprint(lm)["weights"] == "x" and reads == [1]
