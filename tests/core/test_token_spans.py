"""Token spans (sink / quantized / full precision) of the live cache, re-derived from KIVI's flush rules."""
import pytest
import torch

from kvlab import KVLabError, models
from kvlab.hooks import capture, quantize
from kvlab.quant import parse


def _ids(t, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("prefill,cont", [(40, 1), (40, 5), (19, 3)])
def test_prefill_decode_spans_follow_the_group_flush(prefill, cont):
    m = models.tiny("llama").model
    method = parse("kivi:bits=2,group=4,residual=8,flush=sliding")
    G, R, S = method.token_group, method.residual_tokens, method.sink_tokens
    with quantize(m, method, protocol="prefill-decode") as run:
        out = m(_ids(prefill))
        m(_ids(cont, 1), past_key_values=out.past_key_values)
        spans = [run.token_spans(i) for i in range(2)]
        per_kind = [run.token_spans(i, kind) for i in range(2) for kind in "kv"]
    # the rule: before the second call, the prefill's tokens beyond the sink that left the residual
    # window are quantized in whole groups; the second call's tokens are still pending (fp)
    quantized = ((prefill - R - S) // G) * G if prefill - R - S > 0 else 0
    for sp in spans:
        assert (sp.sink_end, sp.quantized_end, sp.length) == (S, S + quantized, prefill + cont)
        assert sp.n_quantized == quantized and sp.n_fp == prefill + cont - quantized
    assert all(sp == spans[0] for sp in per_kind)        # the sliding rule flushes K and V together


@torch.no_grad()
@pytest.mark.parametrize("prefill,cont", [(40, 1), (40, 5), (19, 3), (44, 2), (5, 1)])
def test_prefill_decode_spans_follow_the_authors_flush(prefill, cont):
    """KIVI's default (authors' code, `models/llama_kivi.py` lines 193-220 for the prefill): the keys
    quantized are the prefill's first T - T % R, the values all but the last R; the spans per kind say so,
    and the kind-less spans are the tokens quantized in both (the smaller end)."""
    m = models.tiny("llama").model
    method = parse("kivi:bits=2,group=4,residual=8")
    assert method.flush == "authors"
    R = method.residual_tokens
    with quantize(m, method, protocol="prefill-decode") as run:
        out = m(_ids(prefill))
        m(_ids(cont, 1), past_key_values=out.past_key_values)
        got = {kind: [run.token_spans(i, kind) for i in range(2)] for kind in ("k", "v", None)}
    n_k = prefill - prefill % R
    n_v = max(0, prefill - R)
    T = prefill + cont
    for i in range(2):
        assert (got["k"][i].sink_end, got["k"][i].quantized_end, got["k"][i].length) == (0, n_k, T)
        assert (got["v"][i].sink_end, got["v"][i].quantized_end, got["v"][i].length) == (0, n_v, T)
        assert got[None][i].quantized_end == min(n_k, n_v) and got[None][i] == run.token_spans(i)
    with pytest.raises(KVLabError, match="kind"):
        run.token_spans(0, "q")


@torch.no_grad()
def test_fake_spans_and_capture_sessions():
    m = models.tiny("llama").model
    with quantize(m, "int4") as run:
        m(_ids(12))
    sp = run.token_spans(0)
    assert (sp.sink_end, sp.quantized_end, sp.length) == (0, 12, 12)
    assert run.token_spans(0, "k") == sp == run.token_spans(0, "v")     # fake: K and V alike
    with capture(m, what=("k",)) as cap:
        m(_ids(12))
        assert cap.cache.layers[0].token_spans().n_quantized == 0
    with pytest.raises(KVLabError, match="token_spans"):
        cap.token_spans(0)
