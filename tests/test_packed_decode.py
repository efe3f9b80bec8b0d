"""kvlab.quantize(..., pack=True): the cache holds the packed form between calls and rebuilds the dense K/V
per call. The logits are bit-identical to the same run unpacked; the resident bytes are the packed
tensors' bytes plus the fp parts (and kvlab's own shadows, named), below the unpacked cache's."""
from __future__ import annotations

import math

import pytest
import torch

import kvlab
from kvlab import models
from kvlab.core.cache import PackedStore, cache_resident_bytes
from kvlab.errors import KVLabError
from kvlab.hooks import quantize

SPECS = [
    "int:bits=2",
    "int:bits=4,k_axis=channel,group=8",
    "kivi:bits=2,group=16,residual=32",                      # the authors' flush: K per group, V per step
    "kvquant:bits=2,k_scale=online,group=32,nf=true,outliers=0.01",     # pre-RoPE keys, sink, outliers
    "qaq",                                                   # attention-aware, re-derives its region
    "pmkvq:allocation=uniform,budget=3.0,max_tokens=64,residual=16,reparam=none",   # rewrites_stored
    "quarot-2",
]


def _ids(t=72, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(model, spec, protocol, pack, ids, prefill=32):
    with quantize(model, spec, protocol=protocol, pack=pack) as run:
        out = model(ids[:, :prefill])
        past, logits = out.past_key_values, [out.logits]
        if protocol == "decode":
            for t in range(prefill, ids.shape[1]):
                out = model(ids[:, t:t + 1], past_key_values=past)
                past, logits = out.past_key_values, logits + [out.logits]
        else:                                    # two continuation calls: the second reads the flushed first
            mid = (prefill + ids.shape[1]) // 2
            for s, e in ((prefill, mid), (mid, ids.shape[1])):
                out = model(ids[:, s:e], past_key_values=past)
                past, logits = out.past_key_values, logits + [out.logits]
        summary = run.summary()
        resident = run.policy.resident_bytes()
        layers = list(run.cache.layers)
    return torch.cat(logits, dim=1), summary, resident, layers


@pytest.fixture(scope="module")
def tiny():
    return models.tiny("llama").model


@pytest.mark.parametrize("protocol", ["decode", "prefill-decode"])
@pytest.mark.parametrize("spec", SPECS)
def test_packed_cache_logits_are_bit_identical(tiny, spec, protocol):
    ids = _ids()
    want, plain, plain_resident, _ = _run(tiny, spec, protocol, False, ids)
    got, s, resident, layers = _run(tiny, spec, protocol, True, ids)
    assert torch.equal(got, want)
    assert "cache_resident_bytes" not in plain                   # only with pack=True
    assert s["cache_resident_bytes"] == resident["total"]
    # the packed cache holds less than the dense one of the same run (same shadows on both sides)
    assert resident["total"] < plain_resident["total"]
    assert resident["fp"] < plain_resident["fp"] and resident["aux"] <= plain_resident["aux"]
    # between calls a layer holds its store only: meta placeholders, chunks, fp head/tail
    packed = fp = 0
    for layer in layers:
        assert layer.keys.is_meta and layer.values.is_meta
        for kind in "kv":
            chunks = layer.packed.chunks[kind]
            packed += sum(c.packed.nbytes for c in chunks)
            if chunks and not chunks[0].packed.tables_counted:
                packed += sum(t.nbytes for t in chunks[0].packed.tables.values())
            packed += sum(t.nbytes for c in chunks for t in c.packed.side.values())
            fp += sum(t.nbytes for t in (layer.packed.head[kind], layer.packed.tail[kind]) if t is not None)
        # the dense K/V rebuilt on demand has the placeholder's shape
        k, v = layer.dense()
        assert k.shape == layer.keys.shape and v.shape == layer.values.shape and not k.is_meta
    assert resident["packed"] == packed and resident["fp"] == fp
    assert s["packed_bytes_measured"] > 0 and not math.isnan(s["packed_bytes_measured"])


@torch.no_grad()
def test_resident_bytes_of_int2_are_what_the_codes_and_scales_need(tiny):
    """int2 per token, no residual: after decoding, each stored token but the latest call's is packed
    (2 bits per value + fp16 scale and zero per token-head) and the latest one is fp (float32 here)."""
    ids = _ids(48)
    _, s, r, layers = _run(tiny, "int:bits=2", "decode", True, ids, prefill=16)
    b, h, T, d = layers[0].keys.shape
    n_layers = len(layers)
    per_tok_packed = h * (d * 2 // 8 + 2 + 2)               # codes, fp16 scale, fp16 zero
    assert r["packed"] == n_layers * 2 * (T - 1) * per_tok_packed
    assert r["fp"] == n_layers * 2 * 1 * h * d * 4             # the latest token: fp32 model
    assert r["aux"] == 0
    assert s["packed_bytes_measured"] == pytest.approx(s["packed_bytes"])


def test_store_rejects_a_gap_and_shares_equal_tables():
    from kvlab.pack import pack
    from kvlab.quant.base import LayerContext

    st = PackedStore()
    x = torch.randn(1, 2, 4, 16)
    p = pack("int:bits=2", x, LayerContext(layer=0, num_layers=1, kind="k", start=0))
    st.add("k", p, 0, 4)
    with pytest.raises(KVLabError, match="does not follow"):
        st.add("k", pack("int:bits=2", x, LayerContext(layer=0, num_layers=1, kind="k", start=8)), 8, 12)
    assert st.covered("k") == (0, 4) and st.covered("v") == (0, 0)


@pytest.mark.parametrize("spec,protocol,match", [
    ("int:bits=2", "fake", "protocol 'fake'"),
    ("h2o", "decode", "whole cache|scope"),
    ("qaq-code", "decode", "whole cache|scope"),
    ("fp16", "decode", "method 'fp16'.*no packed storage.*Drop pack=True"),
    ("hf-fp8", "decode", "brings its own cache"),
])
def test_unsupported_configurations_are_named(tiny, spec, protocol, match):
    with pytest.raises(KVLabError, match=match):
        with quantize(tiny, spec, protocol=protocol, pack=True):
            pass
    assert getattr(tiny, "_kvlab_session", None) is None          # nothing left installed


def test_sliding_window_models_are_refused():
    m = models.tiny("gemma2", sliding_window=16).model
    with pytest.raises(KVLabError, match="sliding-window"):
        with quantize(m, "int:bits=2", protocol="decode", pack=True):
            pass


@torch.no_grad()
def test_evaluate_pack_gives_the_same_metrics_and_resident_bytes(monkeypatch):
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")
    lm = kvlab.tiny("llama")
    kw = dict(data="wiki", n_tokens=128, window=64, prefill=24, progress=False, attn_error=False, protocol="decode")
    plain = kvlab.evaluate(lm, "kivi:bits=2,group=16,residual=16", **kw).metrics
    packed = kvlab.evaluate(lm, "kivi:bits=2,group=16,residual=16", pack=True, **kw).metrics
    for k in ("ppl", "kl", "top1", "avg_bits", "avg_bits_end"):
        assert packed[k] == plain[k], k
    assert 0 < packed["cache_resident_packed_bytes"] < packed["cache_resident_bytes"]


@torch.no_grad()
def test_unpacked_resident_bytes_count_the_dense_cache(tiny):
    ids = _ids(24)
    with quantize(tiny, "int:bits=2", protocol="decode") as run:
        past = tiny(ids[:, :16]).past_key_values
        tiny(ids[:, 16:17], past_key_values=past)
        r = cache_resident_bytes(run.cache)
        dense = sum(l.keys.nbytes + l.values.nbytes for l in run.cache.layers)
    assert r["fp"] == dense and r["packed"] == 0 and r["total"] == dense


@torch.no_grad()
def test_calibrated_kvquant_packed_is_bit_identical_and_books_its_tables_once():
    """kvquant calibrated (pre-RoPE keys, per-channel thresholds and codebooks: per-layer tables, a sink):
    the same logits, and each layer's tables held once however many chunks share them."""
    lm = kvlab.tiny("llama")
    m = kvlab.calibrate(lm, "kvquant:bits=2,outliers=0.01,calib_rows=1,calib_len=64")
    ids = _ids(56)
    want, _, _, _ = _run(lm.model, m, "decode", False, ids, prefill=24)
    got, s, r, layers = _run(lm.model, m, "decode", True, ids, prefill=24)
    assert torch.equal(got, want)
    for layer in layers:
        chunks = layer.packed.chunks["k"]
        assert len(chunks) > 1 and chunks[0].rope
        for name, t in chunks[0].packed.tables.items():
            assert all(c.packed.tables[name] is t for c in chunks), name
    # aux: the shared cos/sin table and the pending pre-RoPE keys only
    cos = layers[0].rope[0]
    assert all(l.rope[0] is cos for l in layers)


@torch.no_grad()
def test_hf_cache_resident_bytes_are_its_measured_state(tiny):
    """An HF QuantizedCache packs itself: its resident bytes are the backend's quantized storage plus the
    fp residual, the same bytes its accounting measures (`accounted_layers`' measured_bytes)."""
    pytest.importorskip("optimum.quanto")
    m = tiny.model
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with quantize(m, "hf:nbits=2,residual=4", protocol="decode") as run:
        past = m(ids[:, :24], use_cache=True).past_key_values
        for t in range(24, 38):                  # 14 steps: the residual holds tokens at the end
            past = m(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
        r = run.external.resident_bytes()
        measured = sum(row["measured_bytes"] for row in run.method.accounted_layers(run.cache))
    assert r["packed"] > 0 and r["fp"] > 0 and r["aux"] == 0
    assert r["total"] == r["packed"] + r["fp"] == measured


def test_eval_cli_pack_and_measure_bytes_print_measured_bits(tmp_path, capsys):
    """`kvlab eval --pack` / `--measure-bytes` run the packed forms and print avg_bits_measured (and, packed,
    the resident bytes); the quality rows they store are the plain run's, and a stored result does not
    stand in for a measurement."""
    from kvlab.cli import main
    from kvlab.store import Store
    store = str(tmp_path / "r.sqlite")
    base = ["eval", "--model", "tiny-llama", "--n-tokens", "128", "--window", "64", "--prefill", "24",
            "--no-attn-error", "--method", "int:bits=2", "--store", store]
    assert main(base + ["--protocol", "decode"]) == 0
    plain = Store(store).load("metric=='ppl'")["value"].tolist()
    capsys.readouterr()
    assert main(base + ["--protocol", "decode", "--pack"]) == 0
    out = capsys.readouterr().out
    assert "avg_bits_measured" in out and "cache_resident_bytes" in out and "True" not in out   # not cached
    assert Store(store).load("metric=='ppl'")["value"].tolist() == plain
    assert main(base + ["--measure-bytes"]) == 0
    assert "avg_bits_measured" in capsys.readouterr().out
    assert main(base + ["--pack"]) == 2                     # fake keeps no cache
    assert "pack=True keeps a cache packed" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--task", "cloze-wiki", "--n", "2", "--method", "fp16",
                 "--no-store", "--pack"]) == 2
    assert "--task ppl only" in capsys.readouterr().err


def test_measured_bits_equal_the_accounted_bits_for_a_packed_method(monkeypatch):
    """avg_bits_measured = packed bytes x 8 per element; for uniform int it is the accounted avg_bits."""
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")
    lm = kvlab.tiny("llama")
    m = kvlab.evaluate(lm, "int:bits=4", data="wiki", n_tokens=128, window=64, progress=False, attn_error=False,
                       measure_bytes=True).metrics
    assert m["avg_bits_measured"] == pytest.approx(m["avg_bits"], rel=1e-9)
    assert m["avg_bits_measured"] == pytest.approx(8 * m["packed_bytes_measured"] / (m["packed_bytes"] * 8 / m["avg_bits"]))
