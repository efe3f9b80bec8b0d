"""HF QuantizedCache comparators run through `kvlab.quantize` like every method (the session supplies
their cache): checked against a hand-written loop that passes the method's cache itself."""
import math

import pytest
import torch

from kvlab import KVLabError, models
from kvlab.hooks import quantize
from kvlab.quant import parse
from kvlab.quant.methods.hf_cache import backend_available

SPECS = ["hf-fp8", "hf:backend=hqq,nbits=4,residual=8", "hf:backend=quanto,nbits=2,residual=8"]


def _ids(t, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("spec", SPECS)
def test_hf_cache_through_quantize_equals_hand_loop(spec):
    method = parse(spec)
    ok, why = backend_available(method.backend)
    if not ok:
        pytest.skip(why)
    lm = models.tiny("llama")
    m = lm.model
    windows = [_ids(40, s) for s in range(2)]
    want_logits, records = [], []
    for ids in windows:                               # the independent loop: the method's cache by hand
        cache = method.make_cache(m.config)
        out = m(ids[:, :24], past_key_values=cache, use_cache=True)
        records.append(method.accounted_bits(out.past_key_values))
        want_logits.append(m(ids[:, 24:], past_key_values=out.past_key_values, use_cache=True).logits)
    with quantize(m, method, protocol="prefill-decode") as run:
        got = []
        for ids in windows:
            out = m(ids[:, :24], use_cache=True)
            assert type(out.past_key_values).__name__ == "QuantizedCache"
            got.append(m(ids[:, 24:], past_key_values=out.past_key_values, use_cache=True).logits)
    for g, w in zip(got, want_logits):
        assert torch.equal(g, w)           # same cache class, same kernels, same inputs: bit-identical
    s = run.summary()
    want = method.average_bits(records)
    assert s["avg_bits"] == pytest.approx(want["avg_bits"], rel=1e-12)
    assert s["avg_bits_k"] == pytest.approx(want["avg_bits_k"], rel=1e-12)
    assert math.isnan(s["k_rel_err"]) and math.isnan(s["attn_rel_err"])
    rep = run.layer_report()
    assert list(rep["layer"]) == [0, 1] and (rep["k_bits"] > 0).all()


@torch.no_grad()
def test_hf_cache_generate_through_quantize():
    method = parse("hf-fp8")
    m = models.tiny("llama").model
    ids = _ids(16)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = m.generate(ids, past_key_values=method.make_cache(m.config), **kw)
    with quantize(m, method, protocol="prefill-decode"):
        got = m.generate(ids, **kw)
    assert torch.equal(got, want)


def test_hf_cache_refused_in_fake_protocol_before_any_work():
    m = models.tiny("llama").model
    with pytest.raises(KVLabError, match="protocol='prefill-decode'"):
        with quantize(m, "hf-fp8", protocol="fake"):
            pass
