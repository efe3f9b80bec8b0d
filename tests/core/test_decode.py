"""The deployed decode protocol: one token per forward against the cache the method maintains.

Checked against independent loops written here: a bare DynamicCache loop (identity), a loop that
quantizes the stored cache itself after every step (uniform int4, no residual), and prefill-decode
(one chunk covering the continuation is prefill-decode).
"""
import pytest
import torch
from transformers.cache_utils import DynamicCache

import kvlab
from kvlab import KVLabError, models
from kvlab.evaluation import EvalSpec, evaluate
from kvlab.hooks import quantize
from kvlab.quant import parse
from kvlab.quant.base import LayerContext

FAMILIES = models.TINY_FAMILIES


def _ids(t=40, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


def _token_loop(model, ids, p, cache=None, after_step=None):
    """Prefill p tokens, then one token per forward; the logits of every call, concatenated."""
    out = model(ids[:, :p], past_key_values=cache, use_cache=True)
    past, logits = out.past_key_values, [out.logits]
    if after_step:
        after_step(past)
    for t in range(p, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
        if after_step:
            after_step(past)
    return torch.cat(logits, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_decode_is_bit_identical_to_a_bare_loop(family):
    m = models.tiny(family).model       # gemma2/3 and mistral have sliding-window layers
    ids = _ids()
    want = _token_loop(m, ids, 16, DynamicCache(config=m.config))
    with quantize(m, "fp16", protocol="decode") as run:
        got = _token_loop(m, ids, 16)
    assert torch.equal(got, want)        # the same kernels on the same inputs
    s = run.summary()
    assert s["decode_steps"] == 40 - 16 and s["avg_bits_step_mean"] == 16.0 == s["avg_bits_end"]


@torch.no_grad()
def test_uniform_int4_decode_equals_a_loop_that_quantizes_after_each_step():
    """int4 per token, no sink, no residual: after every call each stored token holds Q(x); the reference
    quantizes the DynamicCache's new tokens itself after each step (the rule re-derived here)."""
    m = models.tiny("llama").model
    method = parse("int:bits=4")
    assert method.sink_tokens == 0 and method.residual_tokens == 0
    ids = _ids(32)
    done = [0]

    def quantize_new(cache):
        T = cache.layers[0].keys.shape[-2]
        for i, layer in enumerate(cache.layers):
            for name, kind in (("keys", "k"), ("values", "v")):
                x = getattr(layer, name)
                ctx = LayerContext(layer=i, num_layers=len(cache.layers), kind=kind, start=done[0])
                q = method.quantize(x[..., done[0]:, :], ctx).x      # per token: a chunk = its tokens alone
                setattr(layer, name, torch.cat([x[..., :done[0], :], q], dim=-2))
        done[0] = T

    want = _token_loop(m, ids, 8, DynamicCache(config=m.config), after_step=quantize_new)
    with quantize(m, method, protocol="decode") as run:
        got = _token_loop(m, ids, 8)
    # the prefill attends to its own fp K/V in both; every later token reads quantized K/V
    assert torch.equal(got[:, :8], want[:, :8])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    s = run.summary()
    assert s["decode_steps"] == 32 - 8
    # bits of the cache each step read: per token 4 bits per value + fp16 scale and zero per group
    per_token = method.quantize(torch.randn(1, 2, 1, 16), LayerContext(0, 2, "k")).bits.item() / 32
    assert s["avg_bits_end"] == pytest.approx(per_token) and s["avg_bits_step_mean"] == pytest.approx(per_token)


@pytest.mark.parametrize("method", ["fp16", "int:bits=2", "kivi:bits=2,residual=8,group=4"])
def test_one_chunk_over_the_continuation_is_prefill_decode(method, monkeypatch):
    monkeypatch.setenv("KVLAB_REFERENCE_CACHE", "0")
    lm = kvlab.tiny("llama")
    kw = dict(data="wiki", n_tokens=128, window=64, prefill=24, progress=False, attn_error=False)
    pd = evaluate(lm, method, protocol="prefill-decode", **kw).metrics
    one = evaluate(lm, method, protocol="decode", decode_chunk=64, **kw).metrics
    for k in ("ppl", "kl", "top1"):
        assert one[k] == pd[k], k        # the same calls on the same tokens
    step = evaluate(lm, method, protocol="decode", **kw).metrics
    if method == "fp16":
        assert step["avg_bits_step_mean"] == 16.0
    else:                                # token by token, later tokens are read quantized too
        assert step["kl"] > pd["kl"] and step["avg_bits_end"] < 16.0


def test_decode_key_names_the_protocol_and_an_approximate_chunk():
    assert EvalSpec(protocol="decode", window=64).key == "wiki:n=2048,w=64,prefill=32"
    assert EvalSpec(protocol="decode", window=64, decode_chunk=4).key.endswith(",chunk=4")
    with pytest.raises(KVLabError, match="decode_chunk applies"):
        EvalSpec(protocol="prefill-decode", decode_chunk=4)
    with pytest.raises(KVLabError, match="decode_chunk must be"):
        EvalSpec(protocol="decode", decode_chunk=0)


@torch.no_grad()
def test_hf_cache_decode_reports_bits_per_step():
    m = models.tiny("llama").model
    with quantize(m, "hf-fp8", protocol="decode") as run:
        _token_loop(m, _ids(24), 8)
    s = run.summary()
    assert s["decode_steps"] == 16 and 8 <= s["avg_bits_end"] < 9


@torch.no_grad()
def test_choice_loglik_in_decode_equals_a_token_loop():
    """Multiple choice in decode: the choice's log-likelihood from one token per forward, as a hand loop."""
    from kvlab.choice import _loglik

    lm = kvlab.tiny("llama")
    m = lm.model
    ctx, cont = _ids(20), _ids(6, 3)
    out = m(ctx, past_key_values=DynamicCache(config=m.config), use_cache=True, logits_to_keep=1)
    past, logits = out.past_key_values, [out.logits]
    for t in range(5):                                            # the choice's tokens but its last, one by one
        out = m(cont[:, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
    want = torch.cat(logits, 1).float().log_softmax(-1).gather(-1, cont[..., None]).sum()
    with quantize(m, "fp16", protocol="decode"):
        got = _loglik(lm, ctx, cont, "decode")
    assert torch.equal(got, want)
    with quantize(m, "fp16", protocol="prefill-decode"):          # one-token choices take no second call
        assert torch.isfinite(_loglik(lm, ctx, cont[:, :1], "prefill-decode"))


# -- sliding-window layers past their window ---------------------------------------------------------
# transformers' sliding layers report the tokens ever seen from get_seq_length() but store only the
# last `sliding_window - 1`; every span kvlab computes must use what is stored.

def _slide(family="gemma2"):
    return models.tiny(family, sliding_window=16)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_identity_decode_past_the_sliding_window_is_bit_identical(family):
    m = _slide(family).model
    ids = _ids(56)
    want = _token_loop(m, ids, 24, DynamicCache(config=m.config))
    with quantize(m, "fp16", protocol="decode") as run:
        got = _token_loop(m, ids, 24)
    assert torch.equal(got, want)
    assert run.summary()["avg_bits_end"] == 16.0


@torch.no_grad()
def test_uniform_int4_decode_past_the_sliding_window_equals_a_hand_loop():
    """Per-token int4 on gemma2 with a 16-token window, prefill 24 (already past it) + 32 decoded: the
    reference quantizes the tokens each call added to every layer after that call, whatever the layer
    still stores (a sliding layer keeps its last 15)."""
    m = _slide().model
    method = parse("int:bits=4")
    ids = _ids(56)
    added = [24]

    def quantize_new(cache):
        n = added[0]
        for i, layer in enumerate(cache.layers):
            for name, kind in (("keys", "k"), ("values", "v")):
                x = getattr(layer, name)
                t = x.shape[-2]
                k = min(n, t)
                q = method.quantize(x[..., t - k:, :], LayerContext(layer=i, num_layers=len(cache.layers), kind=kind)).x
                setattr(layer, name, torch.cat([x[..., :t - k, :], q], dim=-2))
        added[0] = 1

    want = _token_loop(m, ids, 24, DynamicCache(config=m.config), after_step=quantize_new)
    with quantize(m, method, protocol="decode") as run:
        got = _token_loop(m, ids, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    per_token = method.quantize(torch.randn(1, 2, 1, 16), LayerContext(0, 2, "k")).bits.item() / 32
    assert run.summary()["avg_bits_end"] == pytest.approx(per_token)


@torch.no_grad()
@pytest.mark.parametrize("spec", ["int:bits=4,sink=4", "kivi:bits=2,residual=8,group=4", "h2o", "qhitter",
                                  "qaq-low", "pmkvq:budget=3.0,max_tokens=64", "quarot-4", "kvquant-nuq3-1%"])
def test_methods_decode_past_the_sliding_window(spec):
    """Every per-step policy keeps working once a sliding layer drops tokens, and its bits stay bits."""
    from kvlab.calibration import calibrate

    lm = _slide()
    method = calibrate(lm, parse(spec), ids=_ids(64))
    with quantize(lm.model, method, protocol="decode") as run:
        logits = _token_loop(lm.model, _ids(56), 24)
    assert torch.isfinite(logits).all()
    rec = run.step_bits()
    assert len(rec["avg_bits"]) == 32
    assert ((rec["avg_bits"] > 0) & (rec["avg_bits"] <= 16.0)).all(), rec["avg_bits"]
    spans = run.token_spans(0)                  # layer 0 of gemma2 slides
    assert spans.length == 15 and 0 <= spans.sink_end <= spans.quantized_end <= spans.length
