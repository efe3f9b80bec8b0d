"""kvlab.quant.methods.kvpress_press: NVIDIA kvpress presses as comparators.

The `kvpress`-marked tests need the optional kvpress extra and are skipped where it is not importable
(kvpress 0.5.5 pins transformers < 5.3: `make kvpress-env`, then
`.venv-kvpress/bin/python -m pytest tests/test_kvpress.py`). The unmarked ones run everywhere: without
kvpress, asking for a press is a KVLabError naming the cause and the fix.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.protocols import check_protocol
from kvlab.quant import parse
from kvlab.quant.methods import kvpress_press as kp
from kvlab.quant.registry import METHODS, UNAVAILABLE, unavailable

HAVE_KVPRESS = importlib.util.find_spec("kvpress") is not None
kvpress_installed = pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed (make kvpress-env)")


# ------------------------------------------------------------------------------ everywhere
@pytest.mark.skipif(HAVE_KVPRESS, reason="kvpress is installed here: the press is registered")
@pytest.mark.parametrize("spec", ["kvpress-snapkv-50", "kvpress:press=knorm,ratio=0.25", "kvpress"])
def test_without_kvpress_the_error_names_cause_and_fix(spec):
    assert "kvpress" not in METHODS
    with pytest.raises(KVLabError, match=r"kvpress is not installed.*make kvpress-env"):
        parse(spec)
    m = kp.KVPress(press="snapkv", ratio=0.5)          # the class itself imports without kvpress
    from kvlab.models import tiny_config
    with pytest.raises(KVLabError, match=r"make kvpress-env"):
        m.make_cache(tiny_config("llama"))


def test_unavailable_names_give_their_reason(monkeypatch):
    monkeypatch.setitem(UNAVAILABLE, "nosuchextra", "needs the nosuchextra package: pip install it")
    with pytest.raises(KVLabError, match="nosuchextra package: pip install it"):
        parse("nosuchextra:bits=2")
    unavailable(["nosuchextra-2"], "reason two")
    try:
        with pytest.raises(KVLabError, match="reason two"):
            parse("nosuchextra-2")
    finally:
        UNAVAILABLE.pop("nosuchextra-2")


def test_presses_refuse_the_fake_protocol_and_bad_fields():
    m = kp.KVPress(press="knorm", ratio=0.5)
    assert m.spec == "kvpress:press=knorm,ratio=0.5"
    check_protocol(m, "prefill-decode")
    check_protocol(m, "decode")
    with pytest.raises(KVLabError, match="prefill-decode"):
        check_protocol(m, "fake")
    with pytest.raises(KVLabError, match="press"):
        kp.KVPress(press="h2o")
    for bad in (1.0, -0.1):
        with pytest.raises(KVLabError, match="ratio"):
            kp.KVPress(ratio=bad)


def test_press_labels_without_kvpress():
    assert kp.press_label("kvpress:press=snapkv,ratio=0.5") == "kvpress-snapkv-50"
    assert kp.press_label("kvpress:press=expected,ratio=0.75") == "kvpress-expected-75"
    assert kp.press_label("kvpress:press=knorm,ratio=0.875") == "kvpress-knorm-87.5"
    assert kp.press_label("int:bits=4") == "int:bits=4"
    assert set(kp.PRESET_SPECS) == {f"kvpress-{p}-{r}" for p in kp.PRESSES for r in (25, 50, 75)}


# ------------------------------------------------------------------------------ with kvpress
def _ids(t=160, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


def _kvpress_press(press: str, ratio: float):
    """The press straight from kvpress (not through kvlab)."""
    import kvpress

    cls = {"streamingllm": kvpress.StreamingLLMPress, "snapkv": kvpress.SnapKVPress,
           "expected": kvpress.ExpectedAttentionPress, "knorm": kvpress.KnormPress}[press]
    return cls(compression_ratio=ratio)


@torch.no_grad()
def _hand_loop(model, ids, prefill: int, press):
    """kvpress as its pipeline runs it (pipeline.py: prefill under `with press(model)`, then the rest with
    position_ids continuing from the context length), on a plain model: continuation logits, kept tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        model(ids[:, :prefill], past_key_values=cache, use_cache=True)
    kept = [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
    pos = torch.arange(prefill, ids.shape[1]).unsqueeze(0)
    logits = model(ids[:, prefill:], past_key_values=cache, position_ids=pos, use_cache=True).logits
    for layer in model.model.layers:                   # kvpress leaves the rotary embedding set (base_press.py:202)
        if "rotary_emb" in layer.self_attn._modules:
            del layer.self_attn.rotary_emb
    return logits, kept


@pytest.mark.kvpress
@kvpress_installed
@pytest.mark.parametrize("press", list(kp.PRESSES))
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_kept_fraction_bits_and_continuation_match_kvpress(press, ratio):
    from kvlab.hooks import quantize
    from kvlab.models import tiny

    lm = tiny("llama")
    m, ids, P = lm.model, _ids(), 100
    n_kept = max(1, int(P * (1 - ratio)))              # kvpress utils.compute_n_kept
    with torch.no_grad(), quantize(m, parse(f"kvpress:press={press},ratio={ratio}"), protocol="prefill-decode") as run:
        past = m(ids[:, :P], use_cache=True).past_key_values
        assert [past.stored_length(i) for i in range(2)] == [n_kept, n_kept]
        assert past.get_seq_length() == P               # positions continue from the original length
        assert past.kept_fraction() == pytest.approx(n_kept / P)
        ours = m(ids[:, P:], past_key_values=past, use_cache=True).logits
    s = run.summary()
    assert s["avg_bits"] == pytest.approx(16.0 * n_kept / P, rel=1e-12)
    assert s["avg_bits_k"] == s["avg_bits_v"] == s["avg_bits"]
    assert math.isnan(s["k_rel_err"])
    ref, kept = _hand_loop(m, ids, P, _kvpress_press(press, ratio))
    assert kept == [n_kept, n_kept]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    with torch.no_grad():                                # and the press did change the continuation
        full = m(ids, use_cache=False).logits[:, P:]
    assert (ours - full).abs().max() > 1e-3


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")
    return tmp_path


@pytest.mark.kvpress
@kvpress_installed
def test_evaluate_scores_the_continuation_against_the_pressed_cache(isolated):
    """kvlab.evaluate's perplexity equals the hand loop's on the same windows (prefill-decode and decode)."""
    import kvlab
    from kvlab import data
    from kvlab.metrics import token_nll
    from kvlab.models import tiny

    lm = tiny("llama")
    window, P = 256, 128
    windows = data.windows(lm, "wiki", 512, window)
    nll, n = 0.0, 0
    for w in windows:
        logits, kept = _hand_loop(lm.model, w[None], P, _kvpress_press("snapkv", 0.5))
        assert kept == [64, 64]
        nll += float(token_nll(logits[:, :-1], w[None, P + 1:]).sum())
        nll += float(token_nll(_last_prefill_logits(lm.model, w[None], P), w[None, P:P + 1]).sum())
        n += window - P
    hand_ppl = math.exp(nll / n)
    for protocol in ("prefill-decode", "decode"):
        r = kvlab.evaluate(lm, "kvpress-snapkv-50", data="wiki", n_tokens=512, window=window, protocol=protocol,
                           progress=False)
        assert r.metrics["n_scored"] == n
        # decode feeds one token per forward: the same arithmetic up to fp32 summation order
        assert r.metrics["ppl"] == pytest.approx(hand_ppl, rel=1e-6 if protocol == "prefill-decode" else 1e-5), protocol
        assert r.metrics["kl"] > 0
    assert r.metrics["avg_bits_step_mean"] > 8.0       # decode: later tokens are stored, never pressed
    pd_bits = kvlab.evaluate(lm, "kvpress-snapkv-50", data="wiki", n_tokens=512, window=window,
                             protocol="prefill-decode", progress=False).metrics["avg_bits"]
    assert pd_bits == pytest.approx(8.0)


@torch.no_grad()
def _last_prefill_logits(model, ids, P):
    """The prefill's last logits (they predict token P; a press acts after the prefill, so they are fp)."""
    return model(ids[:, :P], use_cache=False).logits[:, -1:]


@pytest.mark.kvpress
@kvpress_installed
def test_store_row(isolated):
    from kvlab.evaluation import EvalSpec
    from kvlab.models import tiny
    from kvlab.store import Store, load
    from kvlab.tasks import Perplexity, run_task

    lm = tiny("llama")
    spec = EvalSpec(data="wiki", n_tokens=512, window=256, protocol="prefill-decode")
    store = Store(isolated / "r.sqlite")
    first = run_task(lm, Perplexity(spec), ["kvpress-knorm-75", "fp16"], store=store, progress=False)
    assert not first["cached"].any()
    got = store.get_result(lm.model_id, spec.key, "kvpress:press=knorm,ratio=0.75", "prefill-decode")
    assert got["avg_bits"] == pytest.approx(16.0 * 32 / 128)       # int(128 * 0.25) of 128 prefill tokens kept
    assert got["ppl"] == pytest.approx(float(first.set_index("label").loc["kvpress-knorm-75", "ppl"]))
    again = run_task(lm, Perplexity(spec), ["kvpress-knorm-75"], store=store, progress=False)
    assert again["cached"].all()
    rows = load({"model": lm.model_id, "protocol": "prefill-decode"}, path=store.path)
    assert {"kvpress:press=knorm,ratio=0.75", "fp16"} <= set(rows["method"])


@pytest.mark.kvpress
@kvpress_installed
def test_model_is_left_as_it_was_and_clear_errors():
    from kvlab.hooks import quantize
    from kvlab.models import tiny

    lm = tiny("llama")
    m, ids = lm.model, _ids(80)
    hooks = dict(torch.nn.modules.module._global_forward_hooks)
    with torch.no_grad():
        before = m(ids).logits
        with quantize(m, parse("kvpress-expected-50"), protocol="prefill-decode"):
            past = m(ids[:, :64]).past_key_values
            m(ids[:, 64:], past_key_values=past)
        assert dict(torch.nn.modules.module._global_forward_hooks) == hooks
        assert not any("rotary_emb" in layer.self_attn._modules for layer in m.model.layers)
        torch.testing.assert_close(m(ids).logits, before, rtol=0, atol=0)
        with pytest.raises(KVLabError, match="window_size=64"), quantize(m, parse("kvpress-snapkv-50"),
                                                                           protocol="prefill-decode"):
            m(ids[:, :64])                               # SnapKV needs more prefill tokens than its window
        assert dict(torch.nn.modules.module._global_forward_hooks) == hooks
        gemma = tiny("gemma2").model
        with pytest.raises(KVLabError, match="sliding-window layers"), \
                quantize(gemma, parse("kvpress-knorm-50"), protocol="prefill-decode"):
            gemma(ids[:, :64])
    assert parse("kvpress-snapkv-50") == kp.KVPress(press="snapkv", ratio=0.5)
