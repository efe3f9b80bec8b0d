"""PM-KVQ as its authors run it (github.com/thu-nics/PM-KVQ, commit c8a2bff; paths below are under
pm_kvq/quantization/methods/pm_kvq/ unless given in full), checked on a tiny model against rules
re-derived here from the authors' code, independently of kvlab.quant.methods.pmkvq:

* the progressive cache (progressive/progressive_modeling_llama.py, the README's "fake" backend): the
  fp window flushed whole every `n_window_token` tokens (:94-108), the memory 16 * (sink + window) +
  bits * quantized checked once per forward after its attention (:128-134) and the width halved at
  most once per forward (:134-147), per sequence from 16 bits (:74-78);
* the key reparameterisation (smoothattention/): s = clamp(maxK ** alpha, 1e-4, 1e4) per rotary pair
  (apply_smoothattention.py:20-26,40-47), alpha searched over 1 - n / 20 (searching_scales.py:91-114) on
  calibration text at interpolated positions (searching_scales.py:43-46).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvlab
from kvlab.calibration import calibrate
from kvlab.hooks import capture, quantize
from kvlab.quant.methods.pmkvq import PMKVQ
from kvlab.quant.primitives import quantize_uniform

SINK, WINDOW, MAX_TOKENS, ALLOC = 1, 8, 64, 4        # budget_l = 4 * 64 = 256 bits per element-slot


def authors_progressive(lengths: list[int], sink: int, window: int, budget_l: float, init_bits: int = 16):
    """progressive_modeling_llama.py:69-147 re-derived for one layer: `lengths` are the tokens each forward
    adds; returns per forward (bits, window tokens, quantized tokens, over budget) after its update.

    The authors raise MemoryError where kvlab stays (nothing quantized yet :135-136, below 2 bits :139-140);
    this loop records `over` there instead."""
    n_sink = n_window = 0
    n_bits = init_bits
    T = 0
    out = []
    for new in lengths:
        T += new
        upd = new
        if n_sink < sink:                                            # :81-92 sink tokens
            take = min(sink - n_sink, upd)
            n_sink += take
            upd -= take
        if window > 0 and upd > 0:                                   # :94-98 the window, flushed in blocks
            tmp = n_window + upd
            n_window = tmp % window                                  # tmp // window * window tokens leave
        quantized = max(0, T - n_sink - n_window)
        memory = n_sink * 16 + n_window * 16 + quantized * n_bits    # :128-133
        over = memory > budget_l
        if over and T > n_sink + n_window and n_bits // 2 >= 2:      # :134-147: halve once per forward
            n_bits //= 2
            over = n_sink * 16 + n_window * 16 + quantized * n_bits > budget_l
        out.append((n_bits, n_window, quantized, over))
    return out


def _ids(n, seed=0):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_defaults_are_the_authors():
    """scripts/evaluation.py:28-32 (sink 1, window 128, 16 bits, init 16), README.md:75-85 (search at 4 bits),
    searching_scales.py:32 (grid 20); `reparam` is always in the spec string."""
    m = PMKVQ()
    assert (m.sink, m.residual, m.init_bits, m.group) == (1, 128, 16, 128)
    assert (m.reparam, m.reparam_grid, m.reparam_bits, m.shrink, m.count_window, m.flush_block) == \
        ("authors", 20, 4, "per_forward", True, True)
    assert m.spec == "pmkvq:reparam=authors"      # a field the former rules lacked: old specs never collide
    assert kvlab.quant.parse(m.spec) == m
    former = PMKVQ(reparam="none", shrink="direct", count_window=False, flush_block=False)
    assert former.spec != "pmkvq" and former.calibration_key() == {
        "method": "pmkvq-sensitivity", "version": 1, "choices": [2, 4, 8], "group": 128}   # fits on disk reused
    assert m.calibration_key() != former.calibration_key()
    assert PMKVQ(reparam_grid=10).calibration_key() != m.calibration_key()
    assert PMKVQ(reparam="fixed", alpha=0.3).calibration_key() != PMKVQ(reparam="fixed").calibration_key()
    assert m.calibration_needs(128).what == ("q", "k", "v")


@torch.no_grad()
def test_progressive_widths_window_and_flush_blocks_per_step():
    """Prefill 30 tokens, then 40 decode steps of one token; after every call each layer's width, window
    and stored keys follow `authors_progressive` (kvlab's flush at the start of call t+1 is the authors'
    update after forward t), and the per-step bits are that cache's codes + scales + fp16 tokens."""
    lm = kvlab.tiny("llama")
    L, d = lm.model.config.num_hidden_layers, 16
    m = PMKVQ(budget=4.0, max_tokens=MAX_TOKENS, allocation="uniform", sink=SINK, residual=WINDOW, reparam="none")
    assert m.allocated_bits(L) == [ALLOC] * L
    P, N = 30, 40
    ids = _ids(P + N)
    want = authors_progressive([P] + [1] * N, SINK, WINDOW, ALLOC * MAX_TOKENS)
    # the rule re-derived: 16 -> 8 at the prefill's update (480 > 256), 8 -> 4 at the next forward even though
    # 4 would already have fitted at once (kvlab's former shrink="direct" jumps), 4 -> 2 mid-block (T = 47:
    # 16 * (1 + 6) + 4 * 40 = 272 > 256 with 6 tokens in the window, no flush at that forward)
    assert [w[0] for w in want[:3]] == [8, 4, 4] and want[16][0] == 4 and want[17][0] == 2
    assert want[17][1] == 6 and want[0][3] and not any(w[3] for w in want[1:])
    assert PMKVQ(**{**m.__dict__, "shrink": "direct"}).layer_bits(0, L, P, P - SINK - 5) == (4, False)
    got, spans = [], []
    with quantize(lm.model, m, protocol="decode") as run:
        out = lm.model(ids[:, :P], use_cache=True)
        past = out.past_key_values
        for t in range(P, P + N):
            out = lm.model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            got.append([(run.info[i]["k"]["bits"], run.info[i]["k"]["window"], run.info[i]["v"]["bits"],
                         run.info[i]["k"]["over_budget"]) for i in range(L)])
            # the stored keys of the tokens the flush covered (all but this call's token)
            for i in range(L):
                layer = past.layers[i]
                T = layer.keys.shape[-2] - 1
                bits, w = want[t - P][0], want[t - P][1]
                fp = layer.fp_keys[..., :T, :]
                k = layer.keys[..., :T, :]
                assert torch.equal(k[..., :SINK, :], fp[..., :SINK, :])               # the fp16 sink
                assert torch.equal(k[..., T - w:, :], fp[..., T - w:, :])             # the fp16 window
                region = fp[..., SINK:T - w, :]
                expect = region if bits >= 16 else quantize_uniform(region, bits, dim=-1, group=d)[0]
                assert torch.equal(k[..., SINK:T - w, :], expect)                     # one width, whole region
        steps = run.step_bits()
    for step, (w_bits, w_window, w_q, w_over) in enumerate(want[:N]):
        for i in range(L):
            assert got[step][i] == (w_bits, w_window, w_bits, w_over), (step, i)
            T = P + step
            meta = 32.0 / d if w_bits < 16 else 0.0                                   # fp16 scale + zero per group
            per_elem = (16.0 * (SINK + w_window) + (w_bits + meta) * w_q) / T
            assert steps["layer_bits"][step, i] == pytest.approx(per_elem, rel=1e-9)
    # flush blocks: the window fills up to WINDOW - 1 tokens and empties whole
    windows = [g[0][1] for g in got]
    assert windows == [(P + s - SINK) % WINDOW for s in range(N)]
    assert sorted(set(windows)) == list(range(WINDOW))


@torch.no_grad()
def test_fake_protocol_has_no_history_and_no_window():
    """fake quantizes every chunk once as it enters: the width of the final length (shrink "direct"), no window."""
    lm = kvlab.tiny("llama")
    m = PMKVQ(budget=4.0, max_tokens=MAX_TOKENS, allocation="uniform", sink=SINK, residual=WINDOW, reparam="none")
    with quantize(lm.model, m, protocol="fake") as run:
        lm.model(_ids(60))
    info = run.info[0]["k"]
    assert "window" not in info
    # 16 * 1 (sink) + b * 59 <= 256 -> b = 4 at once
    assert info["bits"] == 4 == m.layer_bits(0, 2, 60, 59)[0]


def _authors_max_keys(keys: list[torch.Tensor]) -> list[torch.Tensor]:
    """apply_smoothattention.py:20-26 literally: |key| reshaped to [..., -1, d/2], amax over dim -2, max over rows."""
    out = []
    for key in keys:
        key_max = torch.amax(key.abs().reshape(*key.shape[:-2], -1, key.shape[-1] // 2), dim=-2, keepdim=True)
        out.append(key_max.amax(0)[:, 0])                 # [kv_heads, d/2]
    return out


def _authors_alpha(q, k, v, max_key, grid=20, bits=4):
    """searching_scales.py:86-118: per alpha = 1 - n / grid, scales = clamp(max_key ** alpha), key_scales =
    repeat over both halves (:93-94); keys K / s quantized at `bits` (per group, asymmetric) and s put back on
    the query side; values quantized; MSE of the causal attention output; the first minimum wins (strict <)."""
    d = k.shape[-1]
    rep = q.shape[1] // k.shape[1]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    vq = quantize_uniform(v, bits, dim=-1, group=d)[0]
    losses = []
    for n in range(grid):
        rep_scales = (max_key ** (1 - n / grid)).clamp(min=1e-4, max=1e4)
        key_scale = rep_scales.repeat(1, 2)[None, :, None, :]                # [1, kvh, 1, d]
        kq = quantize_uniform(k / key_scale, bits, dim=-1, group=d)[0]
        query_scale = key_scale.repeat_interleave(rep, 1)
        outq = F.scaled_dot_product_attention(q * query_scale, kq.repeat_interleave(rep, 1),
                                              vq.repeat_interleave(rep, 1), is_causal=True)
        losses.append(F.mse_loss(outq, ref).item())
    best = min(range(grid), key=lambda n: (losses[n], n))
    return 1 - best / grid, losses


@torch.no_grad()
def test_key_reparameterisation_scales_search_and_stored_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    lm = kvlab.tiny("llama")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    m = calibrate(lm, PMKVQ(budget=4.0, max_tokens=96, allocation="uniform", sink=SINK, residual=WINDOW), ids=ids)
    # the calibration re-derived: q, k, v of the fp model at interpolated positions 0, 4, 8, ... (96 // 24)
    pos = (torch.arange(24) * 4)[None].expand(2, 24)
    with capture(lm.model, what=("q", "k", "v")) as cap:
        lm.model(ids, position_ids=pos)
        qs, ks, vs = cap["q"], cap["k"], cap["v"]
    max_key = _authors_max_keys(ks)
    for layer in range(2):
        alpha, losses = _authors_alpha(qs[layer], ks[layer], vs[layer], max_key[layer])
        got = float(m.state["alpha"][layer])
        # the same alpha, unless two grid points tie to fp32 rounding of the two attention kernels
        assert got == pytest.approx(alpha) or losses[round((1 - got) * 20)] <= min(losses) * (1 + 1e-5), \
            (layer, got, alpha, losses)
        s = (max_key[layer] ** got).clamp(1e-4, 1e4).repeat(1, 2)
        torch.testing.assert_close(m.state["rep_scales"][layer], s, rtol=1e-6, atol=0)
    # the stored keys: s * Q(K / s) at the layer's width; values are not reparameterised
    P = 40
    x = _ids(P + 3, seed=3)
    with quantize(lm.model, m, protocol="decode") as run:
        out = lm.model(x[:, :P], use_cache=True)
        past = out.past_key_values
        for t in range(P, P + 3):
            past = lm.model(x[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
        for i in range(2):
            layer = past.layers[i]
            T = layer.keys.shape[-2] - 1
            info_k, info_v = run.info[i]["k"], run.info[i]["v"]
            bits, w = info_k["bits"], info_k["window"]
            assert bits < 16 and w == (T - SINK) % WINDOW
            s = m.state["rep_scales"][i][None, :, None, :]
            fp = layer.fp_keys[..., SINK:T - w, :]
            want = quantize_uniform(fp / s, bits, dim=-1, group=16)[0] * s
            assert torch.equal(layer.keys[..., SINK:T - w, :], want)
            assert not torch.equal(want, quantize_uniform(fp, bits, dim=-1, group=16)[0])   # the scales matter
            fv = layer.fp_values[..., SINK:T - w, :]
            assert torch.equal(layer.values[..., SINK:T - w, :], quantize_uniform(fv, info_v["bits"], dim=-1, group=16)[0])
    # reparam="fixed": alpha 0.5 everywhere (apply_smoothattention.py:33,40), scales from the same maxima
    f = calibrate(lm, PMKVQ(budget=4.0, max_tokens=96, allocation="uniform", reparam="fixed"), ids=ids)
    assert f.state["alpha"].tolist() == [0.5, 0.5]
    for layer in range(2):
        torch.testing.assert_close(f.state["rep_scales"][layer],
                                   (max_key[layer] ** 0.5).clamp(1e-4, 1e4).repeat(1, 2), rtol=1e-6, atol=0)
