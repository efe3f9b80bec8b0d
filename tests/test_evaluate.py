"""kvlab.evaluate on tiny random models: the fp reference cache, attention-output error, store rows."""
import math

import pytest
import torch

import kvlab
from kvlab import evaluation as E
from kvlab.store import Store


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(E, "_FP_LOGITS", {})
    return tmp_path


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs.get("use_cache")),
                                             with_kwargs=True)
    return calls, handle


SPEC = dict(data="wiki", n_tokens=192, window=64)


def test_reference_logits_computed_once_per_model_and_data_across_processes(cache_root):
    lm = kvlab.tiny("llama", seed=0)
    calls, h = _count_forwards(lm.model)
    try:
        first = E.evaluate(lm, "fp16", progress=False, **SPEC)
        assert calls.count(False) == 3                     # the fp reference: one plain forward per window
        assert len(list((cache_root / "reference").iterdir())) == 1
        E._FP_LOGITS.clear()                               # a new process: nothing in memory
        calls.clear()
        again = E.evaluate(lm, "fp16", progress=False, **SPEC)
        assert calls.count(False) == 0                     # read from disk
        # exact: fp16 runs the bare model's kernels and the reference on disk was written by this process
        # (cache_root isolates the cache; one written elsewhere could be a few ulp off)
        assert again.metrics["kl"] == 0.0 and again.metrics["top1"] == 1.0
        assert again.metrics["ppl"] == first.metrics["ppl"]
        E.evaluate(lm, "fp16", progress=False, **{**SPEC, "window": 96})    # other data: computed
        assert calls.count(False) == 2
    finally:
        h.remove()
    other = kvlab.tiny("llama", seed=1)                    # same config, other weights: its own entry
    E.evaluate(other, "fp16", progress=False, **SPEC)
    assert len(list((cache_root / "reference").iterdir())) == 3


def test_reference_cache_can_be_turned_off_and_strided_windows_work(cache_root, monkeypatch):
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")
    lm = kvlab.tiny("llama")
    res = E.evaluate(lm, "fp16", progress=False, data="wiki", n_tokens=192, window=64, stride=32)
    assert res.metrics["kl"] == 0.0 and not (cache_root / "reference").exists()
    ref = E._FP_LOGITS[next(iter(E._FP_LOGITS))]
    assert isinstance(ref, list) and ref[0].shape[0] == 63 and ref[1].shape[0] == 31


def test_attention_output_error_in_evaluate(cache_root):
    lm = kvlab.tiny("llama")
    fp = E.evaluate(lm, "fp16", progress=False, **SPEC).metrics
    assert fp["attn_rel_err"] == 0.0
    rows = {}
    for spec in ("int:bits=8", "int:bits=4", "int:bits=2"):
        for protocol in ("fake", "prefill-decode"):
            res = E.evaluate(lm, spec, progress=False, protocol=protocol, **SPEC)
            rows[(spec, protocol)] = res.metrics["attn_rel_err"]
            assert res.layers["attn_rel_err"].notna().all()
    for protocol in ("fake", "prefill-decode"):
        # measured 0.0032 < 0.051 < 0.26 (fake), 0.0022 < 0.034 < 0.19 (prefill-decode): >= 5x steps
        assert 0 < rows[("int:bits=8", protocol)] < rows[("int:bits=4", protocol)] < rows[("int:bits=2", protocol)]
    off = E.evaluate(lm, "int:bits=2", progress=False, attn_error=False, **SPEC).metrics
    assert math.isnan(off["attn_rel_err"])


def test_hf_comparator_has_no_attention_error(cache_root):
    pytest.importorskip("optimum.quanto")
    lm = kvlab.tiny("llama")
    m = E.evaluate(lm, "hf-quanto-int4", progress=False, protocol="prefill-decode", **SPEC).metrics
    assert math.isnan(m["attn_rel_err"]) and 4 < m["avg_bits"] < 16


def test_put_result_writes_every_number(cache_root, tmp_path):
    from kvlab.tasks import Perplexity

    lm = kvlab.tiny("llama")
    store = Store(tmp_path / "r.sqlite")
    res = E.evaluate(lm, "int4", progress=False, **SPEC)
    task = Perplexity(E.EvalSpec(**SPEC))
    store.put_result(lm.model_id, task.key, res.metrics["method"], task.protocol, res.metrics, task.config,
                     names=task.stored)
    got = store.load()
    assert set(got["metric"]) == set(E.METRICS) - {"avg_bits_step_mean", "avg_bits_end"}   # those: decode only
    assert got.loc[got.metric == "attn_rel_err", "value"].iloc[0] == pytest.approx(res.metrics["attn_rel_err"])
    store.put_result("m", "d", "x", "fake", {"model": "m", "data": "d", "method": "x", "protocol": "fake",
                                             "label": "L", "acc": 0.5, "n": 3, "flag": True, "text": "no",
                                             "inf": float("inf"), "nan": float("nan")}, {"task": "t"})
    extra = store.load().query("model == 'm'")
    assert sorted(extra["metric"]) == ["acc", "n", "nan"] and (extra["task"] == "t").all()
    # the one "already computed" rule: every required metric stored
    assert store.get_result("m", "d", "x", "fake", required=("acc",))["acc"] == 0.5
    assert store.get_result("m", "d", "x", "fake", required=("acc", "ppl")) is None
    assert store.get_result("m", "other", "x", "fake") is None

def test_calibration_window_is_capped_at_the_calibration_tokens(cache_root):
    """A window longer than calib_tokens (long-context decode) calibrates on one calib_tokens-long window."""
    lm = kvlab.tiny("llama", seed=0)
    spec = E.EvalSpec(data="wiki", n_tokens=128, window=128, protocol="decode", prefill=96, calib_tokens=64)
    fitted = E.calibrate_for(lm, "kvquant:bits=2,calib_rows=none,calib_len=none", spec)
    assert fitted.state is not None
    direct = kvlab.calibrate(lm, "kvquant:bits=2,calib_rows=none,calib_len=none", data="wiki", n_tokens=64, window=64, skip=128)
    for a, b in zip(fitted.state.tensors.values(), direct.state.tensors.values()):
        assert torch.equal(a, b)
