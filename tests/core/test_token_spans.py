"""Token spans (sink / quantized / full precision) of the live cache, re-derived from KIVI's flush rule."""
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
    method = parse("kivi:bits=2,group=4,residual=8")
    G, R, S = method.token_group, method.residual_tokens, method.sink_tokens
    with quantize(m, method, protocol="prefill-decode") as run:
        out = m(_ids(prefill))
        m(_ids(cont, 1), past_key_values=out.past_key_values)
        spans = [run.token_spans(i) for i in range(2)]
    # the rule: before the second call, the prefill's tokens beyond the sink that left the residual
    # window are quantized in whole groups; the second call's tokens are still pending (fp)
    quantized = ((prefill - R - S) // G) * G if prefill - R - S > 0 else 0
    for sp in spans:
        assert (sp.sink_end, sp.quantized_end, sp.length) == (S, S + quantized, prefill + cont)
        assert sp.n_quantized == quantized and sp.n_fp == prefill + cont - quantized


@torch.no_grad()
def test_fake_spans_and_capture_sessions():
    m = models.tiny("llama").model
    with quantize(m, "int4") as run:
        m(_ids(12))
    sp = run.token_spans(0)
    assert (sp.sink_end, sp.quantized_end, sp.length) == (0, 12, 12)
    with capture(m, what=("k",)) as cap:
        m(_ids(12))
        assert cap.cache.layers[0].token_spans().n_quantized == 0
    with pytest.raises(KVLabError, match="token_spans"):
        cap.token_spans(0)
