"""kvlab.quant.methods.hf_cache: transformers' QuantizedCache as a comparator (quanto / HQQ / fp8 backends)."""
from __future__ import annotations

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant.methods import hf_cache as _hf  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.hf_cache import HFQuantizedCache, backend_available

from quant_helpers import token_ctx as ctx


@pytest.mark.parametrize("backend", ["quanto", "hqq", "fp8"])
def test_hf_cache_builds_and_accounts(backend):
    ok, why = backend_available(backend)
    if not ok:
        pytest.skip(why)
    from kvlab.models import tiny

    lm = tiny("llama")                              # 2 layers, 2 KV heads, head_dim 16
    m = HFQuantizedCache(backend=backend, nbits=None if backend == "fp8" else 2, group=16, residual=8)
    assert m.replaces_cache
    cache = m.make_cache(lm.model.config)
    ids = torch.randint(3, 300, (1, 35), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lm.model(ids[:, :32], past_key_values=cache, use_cache=True)
        for i in range(32, 35):                     # 3 decode steps stay in the fp residual (< 8)
            out = lm.model(ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
    assert torch.isfinite(out.logits).all()
    a = m.accounted_bits(cache)
    per_layer_q = 32 * 2 * 16                       # quantized prefill elements per layer, K (or V)
    if backend == "fp8":
        assert a["k_elems"] == 2 * 35 * 2 * 16      # fp8 appends: no residual window
        assert a["k_bits"] == 2 * (8 * 35 * 2 * 16 + 32)
    else:
        # 2-bit codes + fp16 scale + fp16 zero per group of 16 + 3 residual tokens at fp16, two layers
        assert a["k_elems"] == a["v_elems"] == 2 * (per_layer_q + 3 * 2 * 16)
        assert a["k_bits"] == 2 * (2 * per_layer_q + (per_layer_q // 16) * 32 + 16 * 3 * 2 * 16)
    assert a["packed_bytes"] == (a["k_bits"] + a["v_bits"]) / 8
    assert a["measured_bytes"] > 0
    with pytest.raises(KVLabError, match="replaces the whole cache"):
        m.quantize(torch.randn(1, 1, 2, 4), ctx("k", 2))
