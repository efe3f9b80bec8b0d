"""Per-position and per-step traces of `kvlab.evaluate` (`result.trace`), and their place in the store.

Checked against what is written here: the NLL of every position from the bare model's own logits,
the bits of every decode step re-derived from a sink + residual rule, and a store round trip.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kvlab
from kvlab import data as data_mod
from kvlab.evaluation import EvalSpec, evaluate
from kvlab.quant import parse
from kvlab.quant.base import LayerContext
from kvlab.store import Store
from kvlab.tasks import run_task

SPEC = dict(data="wiki", n_tokens=128, window=64, prefill=24, protocol="decode")


@pytest.fixture(autouse=True)
def _no_reference_cache(monkeypatch):
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")


@torch.no_grad()
def test_decode_trace_nll_is_each_positions_nll_averaged_over_windows():
    lm = kvlab.tiny("llama")
    spec = EvalSpec(**SPEC)
    r = evaluate(lm, "fp16", spec, progress=False)
    windows = data_mod.windows(lm, spec.data, spec.n_tokens, spec.window, None)
    want = torch.stack([F.cross_entropy(lm.model(w[None]).logits[0, :-1], w[1:], reduction="none")
                        for w in windows]).mean(0)                  # want[j]: NLL of token j + 1
    t = r.trace
    assert t["position"] == list(range(24, 64))                    # the continuation's tokens
    torch.testing.assert_close(torch.tensor(t["nll"]), want[23:], rtol=1e-4, atol=1e-4)
    assert t["kl"] == pytest.approx([0.0] * 40, abs=1e-5) and set(t["top1"]) == {1.0}
    assert math.exp(sum(t["nll"]) / len(t["nll"])) == pytest.approx(r.metrics["ppl"], rel=1e-6)
    assert all(b == 16.0 for b in t["bits"])


@torch.no_grad()
def test_decode_step_bits_follow_the_sink_and_residual_rule_per_layer():
    """int4 with 2 sink and 6 residual tokens, one token per forward: a call that reads S stored tokens
    reads max(0, S - 8) quantized tokens (sink and residual at 16 bits), in every layer."""
    lm = kvlab.tiny("llama")
    method = parse("int:bits=4,sink=2,residual=6")
    r = evaluate(lm, method, EvalSpec(**SPEC), progress=False)
    d = lm.head_dim
    q_bits = method.quantize(torch.randn(1, 1, 1, d), LayerContext(0, 2, "k")).bits.item() / d   # per element
    t = r.trace
    assert t["bits_tokens"] == list(range(24, 64))                 # every step, by the tokens it read
    for S, bits, in zip(t["bits_tokens"], t["bits"]):
        q = max(0, S - 8)
        assert bits == pytest.approx((q * q_bits + (S - q) * 16.0) / S)
    layer_bits = torch.tensor(t["layer_bits"])                      # [steps, layers]: all layers alike here
    assert layer_bits.shape == (40, lm.model.config.num_hidden_layers)
    torch.testing.assert_close(layer_bits, torch.tensor(t["bits"], dtype=layer_bits.dtype)[:, None].expand_as(layer_bits))
    assert r.metrics["avg_bits_end"] == pytest.approx(t["bits"][-1])
    assert r.metrics["avg_bits_step_mean"] == pytest.approx(sum(t["bits"]) / len(t["bits"]))


@torch.no_grad()
def test_hf_comparator_step_record_per_layer():
    lm = kvlab.tiny("llama")
    with kvlab.quantize(lm.model, "hf-fp8", protocol="decode") as run:
        ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
        out = lm.model(ids[:, :8], use_cache=True)
        for t in range(8, 20):
            out = lm.model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    rec = run.step_bits()
    assert list(rec["tokens"]) == list(range(8, 20)) and list(rec["step"]) == list(range(12))
    torch.testing.assert_close(torch.tensor(rec["layer_bits"]).mean(1), torch.tensor(rec["avg_bits"]))


def test_traces_exist_outside_decode_without_bits():
    lm = kvlab.tiny("llama")
    r = evaluate(lm, "int4", data="wiki", n_tokens=128, window=64, stride=32, progress=False)
    assert r.trace["position"] == list(range(1, 64)) and "bits" not in r.trace   # the strided pass scores all
    with kvlab.quantize(lm.model, "int4", protocol="fake") as run:
        lm.model(torch.randint(3, 300, (1, 16)))
    assert run.step_bits() is None


def test_trace_stored_beside_the_metrics_and_read_back(tmp_path):
    lm = kvlab.tiny("llama")
    store = Store(tmp_path / "s.sqlite")
    first = run_task(lm, "ppl", ["int:bits=4,residual=6"], store=store, progress=False, **SPEC)
    again = run_task(lm, "ppl", ["int:bits=4,residual=6"], store=store, progress=False, **SPEC)
    assert bool(again["cached"][0]) and not bool(first["cached"][0])
    a, b = first["trace"][0], again["trace"][0]
    assert set(a) == set(b) and b["position"] == a["position"]
    for k in ("nll", "kl", "bits"):
        assert b[k] == pytest.approx(a[k], rel=1e-5)
    assert "trace" not in store.get_result(lm.model_id, first["data"][0], first["method"][0], "decode")
    row = store.load({"metric": "trace"})
    assert len(row) == 1 and row["value"].iloc[0] == len(a["position"])
