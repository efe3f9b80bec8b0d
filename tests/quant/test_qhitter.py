"""kvlab.quant.methods.qhitter: H2O (Zhang et al. 2023; github.com/FMInference/H2O) and Q-Hitter (Zhang et al., MLSys 2024; github.com/VITA-Group/Q-Hitter)."""
from __future__ import annotations

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant.methods import qhitter as _qhitter  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.qhitter import H2O, QHitter

from quant_helpers import stats, token_ctx as ctx


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    t, d = 20, 4
    acc = torch.full((1, 2, t), 0.1)
    acc[0, 0, 3], acc[0, 0, 7], acc[0, 0, 18] = 5.0, 4.0, 9.0          # 18 is recent anyway
    acc[0, 1, 11], acc[0, 1, 0] = 3.0, 2.0
    m = H2O(heavy_ratio=0.1, recent_ratio=0.1)                           # 2 heavy + 2 recent of 20
    assert m.scope == "cache" and m.needs_attention
    k = torch.randn(1, 2, t, d)
    qk, qv = m.quantize_cache([k], [k * 2], [ctx("k", t, attention=stats(received_sum=acc, shape=(1, 2, t)))])
    qk, qv = qk[0], qv[0]
    assert qk.keep[0, 0].nonzero().flatten().tolist() == [3, 7, 18, 19]
    assert qk.keep[0, 1].nonzero().flatten().tolist() == [0, 11, 18, 19]
    assert torch.equal(qk.keep, qv.keep)
    # kept tokens are fp16, evicted ones cost nothing
    assert float(qk.bits) == 8 * d * 16
    assert torch.equal(qk.x, k)


def test_qhitter_keep_set_combines_attention_and_friendliness():
    t, d = 100, 16
    torch.manual_seed(0)
    k = torch.randn(1, 1, t, d)
    v = torch.randn(1, 1, t, d)
    friendly = list(range(10, 18))
    k[0, 0, friendly] = torch.tensor([-1.0, 1.0]).repeat(d // 2)          # two levels: exact at 4 bits
    v[0, 0, friendly] = torch.tensor([0.5, 2.0]).repeat(d // 2)
    acc = torch.linspace(1.0, 0.0, t).view(1, 1, t).clone()              # tokens 0..6 are heaviest
    st = stats(received_sum=acc, shape=(1, 1, t))
    # alpha = 0: the combined part picks by friendliness only
    # kvlab's former one-shot rule (quantize_cache), per-head normalisation, exact zero point
    m = QHitter(alpha=0.0, norm="head", zero="exact")          # 7 H2O + 8 combined + 5 recent of 100
    qk, qv = (r[0] for r in m.quantize_cache([k], [v], [ctx("k", t, attention=st)]))
    kept = qk.keep[0, 0].nonzero().flatten().tolist()
    assert kept == list(range(7)) + friendly + list(range(95, 100))
    assert torch.equal(qk.keep, qv.keep)
    # 4-bit per token: codes + fp16 scale + fp16 zero for each of the 20 kept tokens, 0 for the rest
    assert float(qk.bits) == 20 * (4 * d + 32)
    assert float(qv.bits) == 20 * (4 * d + 32)
    assert float(qk.info["friendliness"][0, 0, friendly].min()) == pytest.approx(1.0)
    # alpha = 1: attention only -> the 15 heaviest tokens plus the recent ones
    h = QHitter(alpha=1.0, norm="head", zero="exact")
    keep = h.quantize_cache([k], [v], [ctx("k", t, attention=st)])[0][0].keep[0, 0]
    assert keep.nonzero().flatten().tolist() == list(range(15)) + list(range(95, 100))
    # the keep budget counts the layer's full length (total_tokens), not only the tokens handed over
    part = m.quantize_cache([k[..., :50, :]], [v[..., :50, :]],
                            [ctx("k", 50, attention=stats(received_sum=acc[..., :50], shape=(1, 1, 50)), total=100)])
    assert int(part[0][0].keep.sum()) == 15                                 # 7 + 8, recent ones are not here


def test_token_oracles_need_statistics():
    with pytest.raises(KVLabError, match="attention statistics"):
        QHitter().quantize_cache([torch.randn(1, 1, 4, 4)], [torch.randn(1, 1, 4, 4)], [ctx("k", 4)])


def test_new_fields_are_always_in_the_spec():
    """Defaults changed (issue 14): the former behaviour is a named value, and the new fields always show, so
    results stored under the old spec strings ("h2o", "qhitter") never collide with the new defaults."""
    assert H2O().spec == "h2o:eviction=authors"
    assert H2O(eviction="once").spec == "h2o:eviction=once"
    assert H2O(simulation="global").spec == "h2o:eviction=authors,simulation=global"
    assert QHitter().spec == "qhitter:bits=4,eviction=authors"
    assert QHitter(eviction="once", norm="head", zero="exact").spec == "qhitter:bits=4,eviction=once,norm=head,zero=exact"
    assert H2O().per_step and H2O().per_query and not H2O(eviction="once").per_step
    for bad in (dict(eviction="never"), dict(simulation="x")):
        with pytest.raises(KVLabError, match=next(iter(bad))):
            H2O(**bad)
    for bad in (dict(norm="layer"), dict(zero="floor")):
        with pytest.raises(KVLabError, match=next(iter(bad))):
            QHitter(**bad)


def test_global_norm_and_rounded_zero_in_the_one_shot_rule():
    """norm="global": min-max over every head of the layer (Q-Hitter utils/modify_llama.py L84-85, L209-211);
    zero="rounded": the authors' quantizer (L55-75), whose zero point is an integer code."""
    from kvlab.quant.allocation import minmax
    from kvlab.quant.methods.qhitter import quantize_rounded_zero

    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 8)
    xh, bits = quantize_rounded_zero(x, 4, None)
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = (mx - mn).clamp(min=1e-5) / 15
    z = (-torch.round(mn / s)).clamp(0, 15)
    assert torch.equal(xh, (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s)
    assert float(bits) == 10 * (4 * 8 + 32)
    e = torch.rand(1, 2, 5)
    g = minmax(e, dim=(-2, -1))
    assert float(g.min()) == 0.0 and float(g.max()) == 1.0 and float(g[0, 0].max()) < 1.0 or float(g[0, 1].max()) < 1.0
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[..., 0] = False
    assert torch.equal(minmax(e, dim=-1, valid=valid)[..., 1:], minmax(e[..., 1:], dim=-1))
