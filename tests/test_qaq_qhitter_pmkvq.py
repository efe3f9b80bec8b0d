"""QAQ, PM-KVQ, Q-Hitter/H2O and the HF QuantizedCache comparator: rules on hand-made tensors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant import AttentionStats, LayerContext, parse
from kvlab.quant.allocation import allocate_bits, qaq_bits, qaq_key_emax, qaq_value_emax
from kvlab.quant.methods import hf_cache as _hf  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods import pmkvq as _pmkvq  # noqa: F401
from kvlab.quant.methods import qaq as _qaq  # noqa: F401
from kvlab.quant.methods import qhitter as _qhitter  # noqa: F401
from kvlab.quant.methods.hf_cache import HFQuantizedCache, backend_available
from kvlab.quant.methods.pmkvq import PMKVQ
from kvlab.quant.methods.qaq import QAQ
from kvlab.quant.methods.qhitter import H2O, QHitter
from kvlab.quant.registry import PRESETS


def ctx(kind, t, *, attention=None, start=0, total=None, layer=0, num_layers=1):
    return LayerContext(layer=layer, num_layers=num_layers, kind=kind, start=start, attention=attention,
                        total_tokens=t + start if total is None else total)


def stats(received_sum=None, received_max=None, query_norm=None, shape=(1, 1, 4)):
    b, h, t = shape
    return AttentionStats(received_sum if received_sum is not None else torch.ones(b, h, t),
                          received_max if received_max is not None else torch.ones(b, h, t),
                          query_norm if query_norm is not None else torch.ones(b, h), n_recent=1)


def ramp_tokens(ranges, d=8):
    """x [1, 1, t, d]: token i holds d evenly spaced values spanning [0, ranges[i]]."""
    r = torch.tensor(ranges, dtype=torch.float32).view(-1, 1)
    return (torch.linspace(0, 1, d).view(1, d) * r).view(1, 1, len(ranges), d)


# ============================================================================================ QAQ
def test_qaq_key_bits_by_hand():
    # L = 10 tokens, eps_k = 1, q_norm (= ||q||^2) = 3:
    #   ln(L^3/(L-1) * eps^2 + 1) = ln(1000/9 + 1) = ln(112.111) = 4.71949
    #   e_max = sqrt(12 / 3 * 4.71949) = sqrt(18.8780) = 4.34488
    e = math.sqrt(12 / 3 * math.log(1000 / 9 + 1))
    assert e == pytest.approx(4.34488, abs=1e-4)
    assert float(qaq_key_emax(10, 1.0, 3.0)) == pytest.approx(e, rel=1e-6)
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
    # a high-attention token is reconstructed more accurately than a low-attention one
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
    assert err[0.05] < err[0.0] / 10


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


# ========================================================================================= PM-KVQ
def test_allocation_respects_budget_and_favours_sensitive_layers():
    s = torch.tensor([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1], [100.0, 50.0, 1.0], [1.0, 0.5, 0.1]])
    bits = allocate_bits(s, (2, 4, 8), budget=4.0)
    # budget 4 avg over 4 layers = 16 bit-slots; the sensitive layer gets 8, the rest share 8: 2 + 2 + 4
    assert bits[2] == 8 and sum(bits) <= 16 and sorted(bits[:2] + bits[3:]) == [2, 2, 4]
    # exact: matches brute force on random sensitivities and uneven layer sizes
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(5, 3, generator=g).sort(dim=1, descending=True).values
        sizes = [int(z) for z in torch.randint(1, 4, (5,), generator=g)]
        budget = float(torch.empty(1).uniform_(2.0, 8.0, generator=g))
        got = allocate_bits(s, (2, 4, 8), budget, sizes)
        best = min((sum(s[l, (2, 4, 8).index(c)] for l, c in enumerate(combo)), combo)
                   for combo in itertools.product((2, 4, 8), repeat=5)
                   if sum(c * z for c, z in zip(combo, sizes)) <= budget * sum(sizes) + 1e-9)
        cost = sum(s[l, (2, 4, 8).index(c)] for l, c in enumerate(got))
        assert sum(c * z for c, z in zip(got, sizes)) <= budget * sum(sizes) + 1e-9
        assert float(cost) == pytest.approx(float(best[0]))
    with pytest.raises(KVLabError, match="budget"):
        allocate_bits(torch.ones(3, 3), (2, 4, 8), budget=1.5)


def test_pmkvq_halves_exactly_when_budget_is_crossed():
    m = PMKVQ(budget=4.0, max_tokens=1024, allocation="uniform", sink=1, residual=128)
    assert m.allocated_bits(2) == [4, 4]
    # budget_l = 4 * 1024 = 4096 bit-slots; quantized tokens n at 16 bits while 16 n <= 4096 <=> n <= 256
    assert m.layer_bits(0, 2, 256 + 129, 256) == (16, False)
    assert m.layer_bits(0, 2, 257 + 129, 257) == (8, False)        # 16 * 257 = 4112 > 4096
    assert m.layer_bits(0, 2, 512 + 129, 512) == (8, False)        # 8 * 512 = 4096
    assert m.layer_bits(0, 2, 513 + 129, 513)[0] == 4
    assert m.layer_bits(0, 2, 1024, 1024)[0] == 4                  # the allocated width at max_tokens
    assert m.layer_bits(0, 2, 1025, 1025)[0] == 2
    # 2 bits is the floor; beyond it the layer is over budget (the authors raise MemoryError)
    assert m.layer_bits(0, 2, 10_000, 9_871) == (2, True)
    # the authors' rule also charges the fp16 sink + window (129 tokens -> 16 * 129 = 2064):
    # 16 bits while 2064 + 16 n <= 4096 <=> n <= 127 quantized tokens (256 total)
    w = PMKVQ(budget=4.0, max_tokens=1024, allocation="uniform", count_window=True)
    assert w.layer_bits(0, 2, 256, 127) == (16, False)
    assert w.layer_bits(0, 2, 257, 128) == (8, False)              # 2064 + 16 * 128 = 4112 > 4096
    assert w.layer_bits(0, 2, 383, 254)[0] == 8                    # 2064 + 8 * 254 = 4096
    assert w.layer_bits(0, 2, 384, 255)[0] == 4
    assert w.layer_bits(0, 2, 1024, 895)[0] == 2                   # half the allocated width at max_tokens
    # through quantize (rewrites_stored: the whole quantized region is handed over)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 128, 64)
    q = m.quantize(x, ctx("k", 128, start=1, total=257, num_layers=2))
    assert q.info["bits"] == 16
    q = w.quantize(x, ctx("k", 128, start=1, total=257, num_layers=2))
    assert q.info["bits"] == 8
    assert float(q.bits) == 8 * x.numel() + (x.numel() // 64) * 32     # one group of 64 per token-head
    q16 = w.quantize(x[..., :127, :], ctx("k", 127, start=1, total=256, num_layers=2))
    assert q16.info["bits"] == 16 and (q16.x - x[..., :127, :]).abs().max() < 4e-3   # fp16 zero point
    # re-quantizing what is stored at the same width changes nothing (progressive rewrites are stable)
    again = w.quantize(q.x, ctx("k", 128, start=1, total=257, num_layers=2))
    assert torch.allclose(again.x, q.x, atol=1e-6)
    assert PMKVQ.rewrites_stored


def test_pmkvq_sensitivity_allocation_and_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    m = PMKVQ(budget=3.0)
    assert m.needs_calibration and not PMKVQ(allocation="uniform").needs_calibration
    with pytest.raises(KVLabError, match="calibrate"):
        m.quantize(torch.randn(1, 1, 4, 8), ctx("k", 4))
    # hand-made sensitivities: layer 1 is the sensitive one
    bits = m.set_sensitivity(torch.tensor([[1.0, .1, .01], [9.0, 3.0, .02]]), torch.zeros(2, 3))
    assert bits == [2, 4] and m.allocated_bits(2) == [2, 4]
    # calibration on a tiny model: one backward pass, sensitivities fall with bits, cached on disk
    from kvlab.models import tiny

    lm = tiny("llama")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    cal = PMKVQ(budget=4.0, max_tokens=96)
    cal.calibrate(lm.model, ids)
    k, v = cal._calib["k"], cal._calib["v"]
    assert k.shape == v.shape == (2, 3) and (k > 0).all() and (v > 0).all()
    assert (k[:, 0] > k[:, 1]).all() and (k[:, 1] > k[:, 2]).all()
    assert sum(cal.allocated_bits(2)) <= 8
    assert all(p.grad is None for p in lm.model.parameters())   # weights untouched
    assert any(tmp_path.rglob("*.pt"))
    again = PMKVQ(budget=4.0, max_tokens=96)
    again.calibrate(lm.model, ids)                              # from the disk cache
    assert torch.equal(again._calib["k"], k)


# ====================================================================================== H2O / Q-Hitter
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
    m = QHitter(alpha=0.0)                     # 7 H2O + 8 combined + 5 recent of 100
    qk, qv = (r[0] for r in m.quantize_cache([k], [v], [ctx("k", t, attention=st)]))
    kept = qk.keep[0, 0].nonzero().flatten().tolist()
    assert kept == list(range(7)) + friendly + list(range(95, 100))
    assert torch.equal(qk.keep, qv.keep)
    # 4-bit per token: codes + fp16 scale + fp16 zero for each of the 20 kept tokens, 0 for the rest
    assert float(qk.bits) == 20 * (4 * d + 32)
    assert float(qv.bits) == 20 * (4 * d + 32)
    assert float(qk.info["friendliness"][0, 0, friendly].min()) == pytest.approx(1.0)
    # alpha = 1: attention only -> the 15 heaviest tokens plus the recent ones
    h = QHitter(alpha=1.0)
    keep = h.quantize_cache([k], [v], [ctx("k", t, attention=st)])[0][0].keep[0, 0]
    assert keep.nonzero().flatten().tolist() == list(range(15)) + list(range(95, 100))
    # the keep budget counts the layer's full length (total_tokens), not only the tokens handed over
    part = m.quantize_cache([k[..., :50, :]], [v[..., :50, :]],
                            [ctx("k", 50, attention=stats(received_sum=acc[..., :50], shape=(1, 1, 50)), total=100)])
    assert int(part[0][0].keep.sum()) == 15                                 # 7 + 8, recent ones are not here


def test_token_oracles_need_statistics():
    with pytest.raises(KVLabError, match="attention statistics"):
        QHitter().quantize_cache([torch.randn(1, 1, 4, 4)], [torch.randn(1, 1, 4, 4)], [ctx("k", 4)])


# =================================================================================== specs / errors
MY_METHODS = ("qaq", "pmkvq", "qhitter", "h2o", "hf")


def test_presets_round_trip():
    mine = {n: s for n, s in PRESETS.items() if s.split(":")[0] in MY_METHODS}
    assert {"qaq-high", "qaq-low", "qaq-code", "pmkvq-4", "pmkvq-3", "qhitter-20", "h2o-20",
            "hf-quanto-int4", "hf-quanto-int2", "hf-hqq-int4", "hf-hqq-int2", "hf-fp8"} <= set(mine)
    for name in mine:
        m = parse(name)
        assert parse(m.spec) == m, name
        assert parse(str(m)) == m
    assert parse("hf-quanto-int4-kchannel").axis_key == -1


@pytest.mark.parametrize("spec, field", [
    ("qaq:eps_k=0", "eps_k"), ("qaq:eps_v=-1", "eps_v"), ("qaq:level=block", "level"),
    ("qaq:quant=nf4", "quant"), ("qaq:variant=github", "variant"), ("qaq:outliers=1.0", "outliers"),
    ("qaq:n_min=4,n_max=2", "n_max"), ("qaq:n_recent=0", "n_recent"), ("qaq:q_norm=0", "q_norm"),
    ("pmkvq:min_bits=3", "min_bits"), ("pmkvq:budget=1.5", "budget"), ("pmkvq:budget=20", "budget"),
    ("pmkvq:max_bits=16,init_bits=8", "init_bits"), ("pmkvq:allocation=greedy", "allocation"),
    ("pmkvq:max_tokens=0", "max_tokens"),
    ("qhitter:h2o_ratio=1.0", "h2o_ratio"), ("qhitter:alpha=1.5", "alpha"),
    ("qhitter:h2o_ratio=0.5,qh_ratio=0.4,recent_ratio=0.2", "recent_ratio"), ("qhitter:bits=0", "bits"),
    ("h2o:heavy_ratio=-0.1", "heavy_ratio"), ("h2o:recent_ratio=1", "recent_ratio"),
    ("hf:backend=bnb", "backend"), ("hf:nbits=3", "nbits"), ("hf:backend=hqq,axis_key=-1", "axis_key"),
    ("hf:axis_value=1", "axis_value"), ("hf:backend=fp8,nbits=4", "nbits"), ("hf:group=0", "group"),
])
def test_invalid_configs_name_the_field(spec, field):
    with pytest.raises(KVLabError, match=field):
        parse(spec)


# =========================================================================================== HF cache
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
