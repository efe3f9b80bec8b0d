"""Q-Hitter as its authors run it (VITA-Group/Q-Hitter, `utils/modify_llama.py`), re-derived here.

`QH2OKVCache.__call__` (L122-175) after every forward: accumulate the probabilities each cached key
received (`_update_hh_score` L177-191, budgets from the prompt length L181-185: `default_ratio`
(H2O part), `hh_size - default_ratio` (combined part), `recent_size`); quantize the new tokens in
place at 4 bits with `Quantization_simulated` (L55-75, zero point ROUNDED, L64) and score their
friendliness 1 - (err_K + err_V) / 2 with errors min-max normalised over every head and token of
the prompt (`Qerror(..., normalize=True)` L78-88 on `[heads, T]`, L200-202), a decoded token over
its heads (L204-206); combine with the accumulated attention min-max normalised over the whole
layer (L209-211); when the cache is over its size keep the recent tokens, the top H2O part by
attention and the top combined part among the rest (L134-175).

The reference is a bare DynamicCache loop on eager attention that quantizes and drops tokens
physically, as the authors' cache does; kvlab quantizes in its flush and masks evicted tokens.
"""
import pytest
import torch

from kvlab import models
from kvlab.hooks import quantize
from quant_helpers import decode_with_keep_sets, eager_calls

P, N = 20, 12
H2O_R, QH_R, REC_R, ALPHA, BITS = 0.15, 0.15, 0.1, 0.5, 4      # 3 + 3 + 2 of a 20-token prompt


def _ids(t, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


def quantization_simulated(w, n_bit):
    """L55-75, written out: per row asymmetric, integer zero point."""
    mx, mn = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    max_int = 2 ** n_bit - 1
    scales = (mx - mn).clamp(min=1e-5) / max_int
    zeros = (-torch.round(mn / scales)).clamp(0, max_int)
    return (torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales


def _norm(e):
    return (e - e.min()) / (e.max() - e.min())           # L84-85: over everything it is given


def _gather(t, idx):
    return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))


@torch.no_grad()
def reference_decode(model, ids, p):
    cfg = model.config
    n_kv = cfg.num_key_value_heads
    default, hh, recent = int(H2O_R * p), int(QH_R * p), int(REC_R * p)
    size = default + hh + recent
    L = cfg.num_hidden_layers
    hh_score, q_score, pos = [None] * L, [None] * L, [None] * L
    kept_after, logits = [], []
    for t0, t1, out in eager_calls(model, ids, p):
        logits.append(out.logits)
        step = []
        for l, att in enumerate(out.attentions):
            b, h, q, kv = att.shape
            a = att.float().view(b, n_kv, h // n_kv, q, kv).sum(2)[0].sum(1)        # [kvh, kv]
            new = t1 - t0
            new_pos = torch.arange(t0, t1).expand(n_kv, new)
            if hh_score[l] is None:
                hh_score[l], pos[l] = a, new_pos
            else:
                a[:, :-new] += hh_score[l]
                hh_score[l], pos[l] = a, torch.cat([pos[l], new_pos], 1)
            layer = out.past_key_values.layers[l]
            k, v = layer.keys[0, :, -new:], layer.values[0, :, -new:]               # [kvh, new, d]
            kq, vq = quantization_simulated(k, BITS), quantization_simulated(v, BITS)
            ek, ev = (kq - k).norm(dim=-1), (vq - v).norm(dim=-1)                   # [kvh, new]
            layer.keys[0, :, -new:], layer.values[0, :, -new:] = kq, vq             # in place (L66-68)
            if q_score[l] is None:
                q_score[l] = (2 - _norm(ek) - _norm(ev)) / 2                        # L200-202: [heads, T] at once
            else:
                qs = (2 - _norm(ek[:, 0]) - _norm(ev[:, 0])) / 2                    # L204-206: over the heads
                q_score[l] = torch.cat([q_score[l], qs[:, None]], 1)
            comb = ALPHA * _norm(hh_score[l]) + (1 - ALPHA) * q_score[l]            # L209-211
            n = hh_score[l].shape[1]
            if n > size:                                                             # L131
                top_d = hh_score[l][:, : n - recent].topk(default, dim=-1).indices          # L137-138
                sel = comb[:, : n - recent].scatter(-1, top_d, -1)                           # L147
                top_h = sel.topk(hh, dim=-1).indices                                         # L149
                keep = torch.cat([top_h, top_d, torch.arange(n - recent, n).expand(n_kv, recent)], 1)
                keep = keep.sort(-1).values
                layer.keys, layer.values = _gather(layer.keys, keep[None]), _gather(layer.values, keep[None])
                hh_score[l], q_score[l], pos[l] = (x.gather(1, keep) for x in (hh_score[l], q_score[l], pos[l]))
            step.append([sorted(r.tolist()) for r in pos[l]])
        kept_after.append(step)
    return kept_after, torch.cat(logits, 1), size


@torch.no_grad()
def test_decode_quantizes_and_evicts_every_step_like_the_authors():
    m = models.tiny("llama").model
    m.set_attn_implementation("eager")
    ids = _ids(P + N)
    want_kept, want_logits, budget = reference_decode(m, ids, P)
    spec = f"qhitter:h2o_ratio={H2O_R},qh_ratio={QH_R},recent_ratio={REC_R},alpha={ALPHA}"
    run, logits, got_kept = decode_with_keep_sets(m, spec, ids, P)
    assert budget == 8
    for step, (got, want) in enumerate(zip(got_kept, want_kept[:-1])):
        assert got == want, f"decode step {step}"
        assert all(len(h) == budget for layer in got for h in layer)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    # bits: the budget's tokens at 4 bits + fp16 scale and zero per token vector (head_dim 16), over
    # every stored token; evicted tokens cost 0
    d = m.config.hidden_size // m.config.num_attention_heads
    rec = run.step_bits()
    assert rec["avg_bits"] == pytest.approx([budget * (BITS * d + 32) / d / t for t in rec["tokens"]])


@torch.no_grad()
def test_former_behaviour_is_bit_identical_under_its_named_values():
    """eviction=once, norm=head, zero=exact: the one-shot rule kvlab ran before (quantize_cache once after the
    prefill), so results equal a direct call of that rule on the prefill's statistics."""
    m = models.tiny("llama").model
    ids = _ids(P + 4)
    old = "qhitter:eviction=once,norm=head,zero=exact"
    with quantize(m, old, protocol="prefill-decode") as run:
        out = m(ids[:, :P], use_cache=True)
        m(ids[:, P:], past_key_values=out.past_key_values, use_cache=True)
        keep = run.cache.layers[0].keep
    assert keep is not None and bool(keep[..., P:].all())
    assert int(keep[0, 0, :P].sum()) == int(0.05 * P) + int(0.07 * P) + int(0.08 * P)


@torch.no_grad()
def test_fake_replays_the_decode_rule_per_query():
    """Fake protocol: query i sees the cache the rule kept after query i - 1, plus itself; the budget is a
    ratio of the window; the last row's cache is what the bits count (4-bit tokens)."""
    m = models.tiny("llama").model
    T = 40
    with quantize(m, f"qhitter:h2o_ratio={H2O_R},qh_ratio={QH_R},recent_ratio={REC_R}", protocol="fake") as run:
        m(_ids(T, 5))
    budget = int(H2O_R * T) + int(QH_R * T) + int(REC_R * T)
    for layer in run.cache.layers:
        assert (layer.keep.sum(-1) == budget).all()
        assert layer.keep[..., T - int(REC_R * T):].all()             # the recent tokens are kept
    d = m.config.hidden_size // m.config.num_attention_heads
    assert run.summary()["avg_bits"] == pytest.approx(budget * (BITS * d + 32) / d / T)
