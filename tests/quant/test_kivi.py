"""kvlab.quant.methods.kivi: KIVI (Liu et al., ICML 2024; authors' code github.com/jy-yuan/KIVI)."""
from __future__ import annotations

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant import parse
from kvlab.quant.methods import kivi as _kivi  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.kivi import KIVI

from quant_helpers import layer_ctx as ctx, rel_err


def test_kivi_keys_per_channel_values_per_token():
    T, D = 8, 8
    offsets = torch.tensor([0., 7., 100., 1000., 13., 500., 42., 3.])     # uneven: no shared grid
    tok = torch.arange(T, dtype=torch.float32).view(T, 1)
    ch = torch.arange(D, dtype=torch.float32).view(1, D)
    m = KIVI(bits=2, group=4, residual=0)
    # keys: channel c holds offsets[c] + {0,1,2,3} within each group of 4 tokens -> exact per channel
    k = (offsets.view(1, D) + tok % 4).expand(1, 2, T, D).contiguous()
    # exact: small integers (fp16-representable min, step 1), elementwise ops only
    assert torch.equal(m.quantize(k, ctx("k")).x, k)
    # the same tensor quantized per token (as values are) is not exact
    assert not torch.equal(m.quantize(k, ctx("v")).x, k)
    # values: token t holds offsets[t] + {0,1,2,3} within each group of 4 channels -> exact per token
    v = (offsets.view(T, 1) + ch % 4).expand(1, 2, T, D).contiguous()
    assert torch.equal(m.quantize(v, ctx("v")).x, v)
    assert not torch.equal(m.quantize(v, ctx("k")).x, v)


def test_kivi_bits_by_hand():
    # KIVI-2, x [1, 2 heads, 64 tokens, 32 dims], group 32:
    # keys:   codes 2 * 4096 = 8192; groups 2 heads * 32 channels * (64/32) = 128 -> 128 * 32 = 4096
    # values: codes 8192; groups 2 heads * 64 tokens * (32/32) = 128 -> 4096
    m = parse("kivi-2")
    x = torch.randn(1, 2, 64, 32)
    assert m.quantize(x, ctx("k")).bits.item() == 8192 + 4096
    assert m.quantize(x, ctx("v")).bits.item() == 8192 + 4096
    # a ragged key window (fake-quant): 40 tokens -> 2 groups per channel, codes only for real tokens
    # codes 4 * 2*40*32 = 10240, groups 2*32*2 = 128 -> 4096
    x = torch.randn(1, 2, 40, 32)
    assert parse("kivi-4").quantize(x, ctx("k")).bits.item() == 10240 + 4096


def test_kivi_token_group_presets_and_spec_roundtrip():
    m = parse("kivi-2")
    assert (m.bits, m.group, m.residual) == (2, 32, 128)
    assert m.token_group == 32 and m.residual_tokens == 128 and m.sink_tokens == 0
    assert parse("kivi-4").bits == 4
    for spec in ("kivi-2", "kivi-4", "kivi:bits=3,group=16,residual=64", "kivi:bits=2,v_bits=4",
                 "kivi:bits=2,flush=sliding"):
        m = parse(spec)
        assert parse(m.spec) == m
    assert parse("kivi:bits=3,group=16,residual=64").token_group == 16


def test_kivi_spec_always_names_the_flush_rule():
    # the default is the authors' rule; the spec names it, so results stored under the earlier spec
    # "kivi:bits=2" (kvlab's sliding window then) never share a key with the new default
    assert parse("kivi-2").flush == "authors"
    assert parse("kivi-2").spec == "kivi:bits=2,flush=authors"
    assert parse("kivi:bits=2,flush=sliding").spec == "kivi:bits=2,flush=sliding"
    assert parse("kivi:bits=2").spec != "kivi:bits=2"
    assert parse("kivi:bits=2,flush=sliding") != parse("kivi:bits=2")


@pytest.mark.parametrize("pending", range(0, 70))
def test_kivi_flush_count_rules(pending):
    """authors (`models/llama_kivi.py` of jy-yuan/KIVI, lines 131-144 and 193-202 for keys, 174-187 and
    210-220 for values): keys floor(pending / R) * R, values max(0, pending - R); sliding: whole groups
    of `group` beyond R, K and V alike (kvlab's earlier rule, `Method.flush_count`)."""
    authors = KIVI(bits=2, group=4, residual=16)
    sliding = KIVI(bits=2, group=4, residual=16, flush="sliding")
    assert authors.flush_count("k", pending, 100) == (pending // 16) * 16
    assert authors.flush_count("v", pending, 100) == max(0, pending - 16)
    old = max(0, ((pending - 16) // 4) * 4)
    assert sliding.flush_count("k", pending, 100) == old == sliding.flush_count("v", pending, 100)
    left_k, left_v = pending - authors.flush_count("k", pending, 100), pending - authors.flush_count("v", pending, 100)
    assert 0 <= left_k < 16 and left_v == min(pending, 16)      # 0..R-1 fp keys, R fp values
    # residual 0 (the authors' code divides by R): keys in whole groups, values at once
    r0 = KIVI(bits=2, group=4, residual=0)
    assert r0.flush_count("k", pending, 100) == (pending // 4) * 4 and r0.flush_count("v", pending, 100) == pending


@pytest.mark.parametrize("spec,field", [
    ("kivi:bits=0", "bits"), ("kivi:bits=9", "bits"), ("kivi:group=0", "group"),
    ("kivi:residual=100", "residual"), ("kivi:v_bits=12", "v_bits"), ("kivi:residual=-1", "residual"),
    ("kivi:flush=window", "flush"), ("kivi:residual=100,flush=sliding", "residual"),
])
def test_kivi_invalid_configs_name_the_field(spec, field):
    with pytest.raises(KVLabError, match=f"'{field}'"):
        parse(spec)


def test_kivi_value_group_must_divide_head_dim():
    m = KIVI(bits=2, group=32, residual=0)
    with pytest.raises(KVLabError, match="head_dim"):
        m.quantize(torch.randn(1, 1, 4, 48), ctx("v"))
    # a group at least as long as head_dim is one group per token vector: 2 * 64 codes + 4 * 32
    assert m.quantize(torch.randn(1, 1, 4, 16), ctx("v")).bits.item() == 2 * 64 + 4 * 32


def test_kivi_error_decreases_with_bits():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 64)
    errs = [rel_err(KIVI(bits=b).quantize(x, ctx(kind)).x, x) for b in (2, 4, 8) for kind in "k"]
    assert errs[0] > errs[1] > errs[2]
