"""kvlab.quant.methods.pmkvq: PM-KVQ (Liu et al. 2025, arXiv 2505.18610; github.com/thu-nics/PM-KVQ)."""
from __future__ import annotations

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant.methods import pmkvq as _pmkvq  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.pmkvq import PMKVQ

from quant_helpers import token_ctx as ctx

# kvlab's former behaviour (the defaults follow the authors' code since issue 14; see the module docstring)
FORMER = dict(reparam="none", shrink="direct", count_window=False, flush_block=False)
FORMER_SPEC = "reparam=none,shrink=direct,count_window=false,flush_block=false"


def test_pmkvq_halves_exactly_when_budget_is_crossed():
    m = PMKVQ(budget=4.0, max_tokens=1024, allocation="uniform", sink=1, residual=128, **FORMER)
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
    w = PMKVQ(budget=4.0, max_tokens=1024, allocation="uniform", **{**FORMER, "count_window": True})
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
    # re-quantizing what is stored at the same width changes nothing (progressive rewrites are stable):
    # stored values sit on the grid, (x - min) / scale lands within ~1e-6 of an integer, far from a .5
    # tie, so the same codes come back; only fp32 rounding of min + q * scale (~1 ulp of |x| <= 4.3) remains
    again = w.quantize(q.x, ctx("k", 128, start=1, total=257, num_layers=2))
    assert torch.allclose(again.x, q.x, atol=1e-6)
    assert PMKVQ.rewrites_stored


def test_pmkvq_sensitivity_allocation_and_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    m = PMKVQ(budget=3.0, **FORMER)
    assert m.needs_calibration and not PMKVQ(allocation="uniform", **FORMER).needs_calibration
    assert PMKVQ(allocation="uniform").needs_calibration          # reparam="authors" calibrates its scales
    with pytest.raises(KVLabError, match="kvlab.calibrate"):
        m.quantize(torch.randn(1, 1, 4, 8), ctx("k", 4))
    # hand-made sensitivities: layer 1 is the sensitive one
    k_sens, v_sens = torch.tensor([[1.0, .1, .01], [9.0, 3.0, .02]]), torch.zeros(2, 3)
    assert m.allocate(k_sens, v_sens) == [2, 4]
    assert m.with_state({"k": k_sens, "v": v_sens}).allocated_bits(2) == [2, 4]
    # calibration on a tiny model: one backward pass, sensitivities fall with bits, cached on disk
    from kvlab.calibration import calibrate
    from kvlab.models import tiny

    lm = tiny("llama")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    cal = calibrate(lm, PMKVQ(budget=4.0, max_tokens=96, **FORMER), ids=ids)
    k, v = cal.state["k"], cal.state["v"]
    assert k.shape == v.shape == (2, 3) and (k > 0).all() and (v > 0).all()
    assert (k[:, 0] > k[:, 1]).all() and (k[:, 1] > k[:, 2]).all()
    assert sum(cal.allocated_bits(2)) <= 8
    assert all(p.grad is None for p in lm.model.parameters())   # weights untouched
    assert any(tmp_path.rglob("*.pt"))
    # an independent re-derivation of the sensitivity (PM-KVQ eq. for s[l, b]): post-RoPE K/V of the
    # batch at interpolated positions (stride max_tokens // T = 4), gradients of the mean loss
    from kvlab.hooks import capture
    from kvlab.quant.primitives import quantize_uniform

    pos = (torch.arange(24) * 4)[None].expand(2, 24)
    emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.enable_grad(), capture(lm.model, what=("k", "v"), retain_grad=True) as cp:
        logits = lm.model(inputs_embeds=emb, position_ids=pos).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
        ks, vs = cp["k"], cp["v"]
        grads = torch.autograd.grad(loss, ks + vs)
    for layer in range(2):
        for c, bits in enumerate((2, 4, 8)):
            x, g = ks[layer].detach(), grads[layer]
            xh, _ = quantize_uniform(x, bits, dim=-1, group=16)
            want = ((xh - x) * g).abs().mean().double()
            assert float(k[layer, c]) == pytest.approx(float(want), rel=1e-6)   # same ops, float64 at the end
    again = calibrate(lm, PMKVQ(budget=4.0, max_tokens=96, **FORMER), ids=ids)   # from the disk cache
    assert torch.equal(again.state["k"], k)
    other_budget = calibrate(lm, PMKVQ(budget=3.0, max_tokens=96, **FORMER), ids=ids)   # same sensitivities, other allocation
    assert torch.equal(other_budget.state["k"], k)


def test_pmkvq_bits_of_several_sequences_in_prefill_decode():
    """A rewriting method's region is replaced per flush, per sequence: identical sequences must give the
    average bits of one (the region of a finished sequence once vanished from the account: 7.06 -> 5.03
    -> 4.35 bits for 1, 2, 3 identical windows)."""
    import kvlab
    from kvlab.calibration import calibrate

    lm = kvlab.tiny("llama")
    m = calibrate(lm, "pmkvq:budget=3.0,max_tokens=64,residual=8," + FORMER_SPEC, n_tokens=256, window=64)
    ids = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    got = []
    for n in (1, 2, 3):
        with torch.no_grad(), kvlab.quantize(lm, m, protocol="prefill-decode") as run:
            for _ in range(n):
                out = lm.model(ids[:, :48])
                lm.model(ids[:, 48:], past_key_values=out.past_key_values)
        got.append(run.summary())
    assert got[0]["avg_bits"] < 16
    for s in got[1:]:
        assert s["avg_bits"] == got[0]["avg_bits"]            # exact: the same integer counts and bit sums
        assert s["k_rel_err"] == pytest.approx(got[0]["k_rel_err"], rel=1e-6)   # fp32 sums in another order
