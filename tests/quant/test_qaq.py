"""kvlab.quant.methods.qaq: QAQ (Dong et al. 2024, arXiv 2403.04643; github.com/ClubieDong/QAQ-KVCacheQuantization)."""
from __future__ import annotations

import math

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant import AttentionStats
from kvlab.quant.allocation import qaq_bits, qaq_key_emax, qaq_value_emax
from kvlab.quant.methods import qaq as _qaq  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.qaq import QAQ

from quant_helpers import stats, token_ctx as ctx


def ramp_tokens(ranges, d=8):
    """x [1, 1, t, d]: token i holds d evenly spaced values spanning [0, ranges[i]]."""
    r = torch.tensor(ranges, dtype=torch.float32).view(-1, 1)
    return (torch.linspace(0, 1, d).view(1, d) * r).view(1, 1, len(ranges), d)


def test_qaq_key_bits_by_hand():
    # L = 10 tokens, eps_k = 1, q_norm (= ||q||^2) = 3:
    #   ln(L^3/(L-1) * eps^2 + 1) = ln(1000/9 + 1) = ln(112.111) = 4.71949
    #   e_max = sqrt(12 / 3 * 4.71949) = sqrt(18.8780) = 4.34488
    e = math.sqrt(12 / 3 * math.log(1000 / 9 + 1))
    assert e == pytest.approx(4.34488, abs=1e-4)
    assert float(qaq_key_emax(10, 1.0, 3.0)) == pytest.approx(e, rel=1e-6)   # fp32 closed form: ~2e-8 off
    # token ranges R and their bits (n_min = 1, n_max = 8):
    #   paper ceil(log2(R / e)):      R=100: log2(23.015)=4.52 -> 5;  R=30: log2(6.905)=2.79 -> 3;
    #                                 R=1e4 -> 12 -> clamp 8;         R=0.5: negative -> n_min 1
    #   code  ceil(log2(R/(2e) + 1)): R=100: log2(12.508)=3.64 -> 4;  R=30: log2(4.452)=2.15 -> 3;
    #                                 R=1e4 -> clamp 8;               R=0.5: log2(1.058)=0.08 -> 1
    x = ramp_tokens([100.0, 30.0, 1e4, 0.5])
    for variant, want in (("paper", [5, 3, 8, 1]), ("code", [4, 3, 8, 1])):
        m = QAQ(eps_k=1.0, q_norm=3.0, n_min=1, n_max=8, outliers=0.0, n_recent=1, variant=variant,
                level="head", attention_aware=False)
        assert not m.needs_attention                   # constant q_norm, no a_max: no statistics needed
        # the code variant quantizes once on the whole cache; both entry points agree
        q = m.quantize(x, ctx("k", 4, total=10)) if variant == "paper" else \
            m.quantize_cache([x], [x], [ctx("k", 4, total=10)])[0][0]
        assert q.info["bits_k"][0, 0].tolist() == want, variant
        # stored bits: codes + fp16 scale + fp16 zero + 8-bit width field per group (n_min < n_max)
        assert float(q.bits) == sum(want) * 8 + 4 * (32 + 8)


def test_qaq_value_bits_follow_attention():
    # L = 10, eps_v = 0.5, every token spans R = 4: e_max = sqrt(12/10) * 0.5 / a = 0.547723 / a
    #   a = 0.9 -> e = 0.6086, paper log2(4/0.6086) = 2.72 -> 3
    #   a = 0.3 -> e = 1.8257, paper log2(2.191)    = 1.13 -> 2
    #   a = 0.1 -> e = 5.4772, paper log2(0.730) < 0       -> n_min = 1
    #   no attention awareness: a = 1 -> e = 0.5477, log2(7.303) = 2.87 -> 3 for every token
    assert float(qaq_value_emax(10, 0.5, 0.3)) == pytest.approx(math.sqrt(1.2) * 0.5 / 0.3, rel=1e-6)
    x = ramp_tokens([4.0, 4.0, 4.0])
    a = torch.tensor([0.9, 0.3, 0.1]).view(1, 1, 3)
    st = stats(received_max=a, shape=(1, 1, 3))
    m = QAQ(eps_v=0.5, n_min=1, n_max=8, outliers=0.0, n_recent=1, q_norm=1.0)
    q = m.quantize(x, ctx("v", 3, attention=st, total=10))
    assert q.info["bits_v"][0, 0].tolist() == [3, 2, 1]
    flat = QAQ(eps_v=0.5, n_min=1, n_max=8, outliers=0.0, n_recent=1, q_norm=1.0, attention_aware=False)
    assert flat.quantize(x, ctx("v", 3, total=10)).info["bits_v"][0, 0].tolist() == [3, 3, 3]
    # a high-attention token is reconstructed more accurately than a low-attention one (3/2/1 bits on a
    # range of 4: max errors ~0.29 / 0.67 / 2, far apart)
    err = (q.x - x).abs().amax(-1)[0, 0]
    assert err[0] < err[1] < err[2]


def test_qaq_needs_statistics_when_attention_aware():
    m = QAQ(q_norm=None)                              # paper: measured q_norm
    assert m.needs_attention and m.scope == "layer"
    with pytest.raises(KVLabError, match="attention statistics"):
        m.quantize(ramp_tokens([1.0, 2.0]), ctx("v", 2))


def test_qaq_paper_vs_code_variants_differ_as_documented():
    paper, code = QAQ(variant="paper"), QAQ(variant="code")
    assert paper.scope == "layer" and code.scope == "cache"      # the code quantizes once after prefill
    assert QAQ(level="token").scope == "cache"
    # bits: code is about one bit fewer for the same R and e_max
    R = torch.tensor([3.0, 50.0, 700.0])
    e = torch.tensor(0.7)
    p, c = qaq_bits(R, e, 0, 16, "paper"), qaq_bits(R, e, 0, 16, "code")
    assert ((p - c) >= 0).all() and ((p - c) <= 1).all() and (p - c).sum() >= 2
    # q_norm: code uses the constant 300 as ||q||^2, paper the measured max ||q||^2
    x = ramp_tokens([20.0, 20.0])
    st = stats(query_norm=torch.tensor([[30.0]]), shape=(1, 1, 2))       # ||q||^2 = 900 > 300
    kw = dict(outliers=0.0, n_recent=1, n_min=0, n_max=16)
    bp = QAQ(variant="paper", **kw).quantize(x, ctx("k", 2, attention=st, total=64)).info["bits_k"]
    bc = QAQ(variant="code", **kw).quantize_cache([x], [x], [ctx("k", 2, attention=st, total=64)])[0][0].info["bits_k"]
    e_p = float(qaq_key_emax(64, QAQ().eps_k, 900.0))
    e_c = float(qaq_key_emax(64, QAQ().eps_k, 300.0))
    assert bp[0, 0, 0] == math.ceil(math.log2(20 / e_p))
    assert bc[0, 0, 0] == math.ceil(math.log2(20 / (2 * e_c) + 1))
    # grids: code levels are mu + k s (s = R / 2^B), paper levels segment midpoints of [min, max]
    v = torch.tensor([0.0, 0.1, 0.2, 1.0]).view(1, 1, 1, 4)
    kw = dict(outliers=0.0, n_recent=1, n_min=2, n_max=2, attention_aware=False, q_norm=1.0)
    xp = QAQ(variant="paper", **kw).quantize(v, ctx("v", 1)).x.flatten().tolist()
    xc = QAQ(variant="code", **kw).quantize_cache([v], [v], [ctx("k", 1)])[1][0].x.flatten().tolist()
    # paper: 4 segments of width 0.25 -> midpoints 0.125, 0.375, 0.625, 0.875
    assert xp == pytest.approx([0.125, 0.125, 0.125, 0.875], abs=1e-3)
    # code: mu = 0.325, s = 0.25, k = round((x - mu)/s) in [-2, 1] -> 0.325 + k * 0.25
    assert xc == pytest.approx([0.075, 0.075, 0.325, 0.575], abs=1e-3)
    assert xp != pytest.approx(xc, abs=1e-3)


def test_qaq_outliers_excluded_from_statistics():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 4, 64) * 2 - 1                   # ranges ~2
    x[0, 0, :, 5] = 100.0                                  # one huge value per token
    common = dict(eps_k=1.0, q_norm=300.0, n_recent=1, n_min=1, n_max=8, variant="code", attention_aware=False)
    c0 = ctx("k", 4, total=512)
    with_out = QAQ(outliers=0.05, **common).quantize_cache([x], [x], [c0])[0][0]
    without = QAQ(outliers=0.0, **common).quantize_cache([x], [x], [c0])[0][0]
    # code: ceil(0.025 * 64) = 2 values at the low end and 64 - floor(0.975 * 64) = 2 at the high end
    assert int(with_out.info["outliers_k"]) == 4 * 4
    assert (with_out.x[0, 0, :, 5] == 100.0).all()        # outliers kept exactly
    # the range without outliers is ~2 instead of ~101: fewer bits per token
    assert (with_out.info["bits_k"] < without.info["bits_k"]).all()
    # bits include 48 per outlier (fp16 value + int32 index), codes only for the 60 other values
    b = with_out.info["bits_k"][0, 0]
    assert float(with_out.bits) == float((b * 60).sum() + 4 * 40 + 16 * 48)
    # at a fixed width the non-outlier values are reconstructed far better once outliers are split off
    inl = torch.ones_like(x, dtype=torch.bool)
    inl[..., 5] = False
    fixed = {**common, "n_min": 3, "n_max": 3}
    err = {r: (QAQ(outliers=r, **fixed).quantize_cache([x], [x], [c0])[0][0].x - x)[inl].abs().mean()
           for r in (0.0, 0.05)}
    assert err[0.05] < err[0.0] / 10                      # measured ratio 0.042 (2.4x below 0.1)


def test_qaq_last_tokens_get_n_max_and_token_level_spans_layers():
    x = ramp_tokens([0.01] * 6)
    m = QAQ(n_recent=3, n_min=1, n_max=6, outliers=0.0, attention_aware=False, q_norm=1.0)
    # positions 4, 5 of a 6-token layer are the last n_recent - 1 = 2 tokens
    assert m.quantize(x, ctx("k", 6)).info["bits_k"][0, 0].tolist() == [1, 1, 1, 1, 6, 6]
    # token level: one group per token over both layers -> same bits in both, from the larger range
    tok = QAQ(level="token", n_recent=1, n_min=0, n_max=16, outliers=0.0, attention_aware=False, q_norm=1.0)
    a, b = ramp_tokens([1.0, 1.0]), ramp_tokens([1.0, 64.0])
    ks, vs = tok.quantize_cache([a, b], [a, b], [ctx("k", 2, total=64, layer=i, num_layers=2) for i in range(2)])
    assert torch.equal(ks[0].info["bits_k"], ks[1].info["bits_k"])
    e = float(qaq_key_emax(64, tok.eps_k, 1.0))
    # token 0 spans [0, 1] in both layers; token 1 spans [0, 64] over both layers
    assert ks[0].info["bits_k"][0, 0].tolist() == [max(0, math.ceil(math.log2(1 / e))), math.ceil(math.log2(64 / e))]
    # bits split per layer: both layers together = codes + one metadata record per token
    codes = sum(ks[0].info["bits_k"][0, 0].tolist()) * 8 * 2
    assert float(ks[0].bits + ks[1].bits) == pytest.approx(codes + 2 * (32 + 8))


def test_qaq_normal_quantizer_and_levels_run():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 8)
    st = AttentionStats(torch.rand(2, 3, 16), torch.rand(2, 3, 16), torch.rand(2, 3) * 5 + 1, 5)
    for level in ("head", "layer"):
        for quant in ("uniform", "normal"):
            m = QAQ(level=level, quant=quant)
            for kind in "kv":
                q = m.quantize(x, ctx(kind, 16, attention=st))
                assert q.x.shape == x.shape and torch.isfinite(q.x).all()
                assert q.info[f"bits_{kind}"].shape == (2, 3, 16)
                assert float(q.bits) > 0
    with pytest.raises(KVLabError, match="token"):
        QAQ(level="token").quantize(x, ctx("k", 16, attention=st))
