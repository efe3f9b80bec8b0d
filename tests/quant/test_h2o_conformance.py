"""H2O as its authors run it (FMInference/H2O at ac75c2a), re-derived here independently of kvlab.

Decode (`h2o_hf/utils_real_drop/modify_llama.py`, `H2OKVCache_LayerWise`): after every forward the
probabilities each cached key received are added to its score (`_update_hh_score` L317-326, summed
over batch and queries); when the cache holds more than heavy + recent tokens, the last `recent`
and the top `heavy` by score among the others stay and the rest is dropped from the cache
(`__call__` L258-287). Budgets are ratios of the prompt length (`utils_hh/modify_llama.py` L129-131).
The reference below is a bare DynamicCache loop on eager attention (`output_attentions` gives the
probabilities, as the authors' `attn_weights`) that physically drops the evicted tokens, as the
authors' cache does; kvlab masks them instead.

Teacher forced (`h2o_hf/utils_lm_eval/modify_llama.py`): `local_heavy_hitter_mask` (L24-53) plus the
recent band and the causal mask (commit 1603343, L136-145), budgets `int(ratio * seq_len)` (L131-132);
and the HEAD "global statistics" variant (L152-166).
"""
import pytest
import torch

from kvlab import models
from kvlab.hooks import quantize
from quant_helpers import decode_with_keep_sets, eager_calls
from kvlab.quant import parse

P, N = 20, 12                    # prompt, decoded tokens
HEAVY, RECENT = 0.25, 0.2        # 5 heavy + 4 recent of a 20-token prompt


def _ids(t, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


def _eager_tiny():
    m = models.tiny("llama").model
    m.set_attn_implementation("eager")
    return m


def _group_sum(probs, n_kv):
    b, h, q, kv = probs.shape
    return probs.view(b, n_kv, h // n_kv, q, kv).sum(2)


def _gather(t, idx):
    """t [b, kvh, T, d], idx [b, kvh, n] -> the kept tokens [b, kvh, n, d] (each head its own)."""
    return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))


@torch.no_grad()
def reference_decode(model, ids, p, heavy_ratio, recent_ratio):
    """The authors' real-drop decode: per step (after each call) the kept ORIGINAL positions per layer
    [kvh] lists, the budget, and the logits."""
    cfg = model.config
    n_kv = cfg.num_key_value_heads
    heavy, recent = int(heavy_ratio * p), int(recent_ratio * p)
    scores = [None] * cfg.num_hidden_layers          # hh_score per layer [kvh, cached]
    pos = [None] * cfg.num_hidden_layers             # original position of each cached token [kvh, cached]
    kept_after, logits = [], []
    for t0, t1, out in eager_calls(model, ids, p):
        logits.append(out.logits)
        step = []
        for l, att in enumerate(out.attentions):
            a = _group_sum(att.float(), n_kv)[0].sum(1)                 # [kvh, cached + new]
            new = t1 - t0
            new_pos = torch.arange(t0, t1).expand(n_kv, new)
            if scores[l] is None:
                scores[l], pos[l] = a, new_pos
            else:
                a[:, :-new] += scores[l]                                 # L324-326
                scores[l], pos[l] = a, torch.cat([pos[l], new_pos], 1)
            n = scores[l].shape[1]
            if n > heavy + recent:                                       # L265
                top = scores[l][:, : n - recent].topk(heavy, dim=-1).indices.sort(-1).values      # L271-273
                keep = torch.cat([top, torch.arange(n - recent, n).expand(n_kv, recent)], 1)    # L276-277
                layer = out.past_key_values.layers[l]
                layer.keys = _gather(layer.keys, keep[None])
                layer.values = _gather(layer.values, keep[None])
                scores[l], pos[l] = scores[l].gather(1, keep), pos[l].gather(1, keep)            # L285
            step.append([sorted(r.tolist()) for r in pos[l]])
        kept_after.append(step)
    return kept_after, torch.cat(logits, 1), heavy + recent


@torch.no_grad()
def test_decode_evicts_every_step_like_the_authors_real_drop():
    m = _eager_tiny()
    ids = _ids(P + N)
    want_kept, want_logits, budget = reference_decode(m, ids, P, HEAVY, RECENT)
    # after call t the cache holds the eviction decided after call t-1 (the flush at the start of call t,
    # as the authors' end-of-call eviction) plus token t
    run, logits, got_kept = decode_with_keep_sets(m, f"h2o:heavy_ratio={HEAVY},recent_ratio={RECENT}", ids, P)
    assert budget == 9
    for step, (got, want) in enumerate(zip(got_kept, want_kept[:-1])):
        assert got == want, f"decode step {step}"
        assert all(len(h) == budget for layer in got for h in layer)
    # the same attention over the same tokens: masked (kvlab) or dropped (the authors) only reorders sums
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    # bits: the budget's tokens at fp16 over every stored token of the sequence (evicted ones cost 0)
    rec = run.step_bits()
    assert len(rec["avg_bits"]) == N
    want_bits = [16.0 * budget / tokens for tokens in rec["tokens"]]
    assert rec["tokens"].tolist() == list(range(P, P + N))
    assert rec["avg_bits"] == pytest.approx(want_bits)


def reference_local_mask(probs, heavy, recent):
    """`local_heavy_hitter_mask` (L24-53) + band + causal (1603343 L136-145), written per head with sets:
    probs [heads, q, q] of one forward. Returns a list per head of per-query sorted kept keys."""
    h, q, _ = probs.shape
    out = []
    for g in range(h):
        p = probs[g].double()
        rows = []
        acc = {j: float(p[:heavy, j].sum()) for j in range(heavy)}        # the first `heavy` queries' sums
        for i in range(q):
            if i < heavy:
                hh = set(range(i + 1))                                        # mask_bottom[:heavy, :heavy], causal
            else:
                top = sorted(acc, key=lambda j: -acc[j])[: heavy - 1]         # topk(heavy - 1)
                hh = set(top) | {i}
                acc = {j: acc.get(j, 0.0) + float(p[i, j]) for j in hh}       # += row, then * mask
            band = set(range(max(0, i - recent), i + 1))
            rows.append(sorted(hh | band))
        out.append(rows)
    return out


@torch.no_grad()
@pytest.mark.parametrize("simulation", ["local", "global"])
def test_fake_simulation_is_the_authors_per_query_mask(simulation, monkeypatch):
    """Layer 0 reads the same queries and keys as the bare model: its per-query mask is re-derived here from
    the bare model's probabilities; every layer's mask also from the logits kvlab handed to the rule."""
    m = _eager_tiny()
    T = 48
    ids = _ids(T, 3)
    heavy, recent = int(HEAVY * T), int(RECENT * T)
    n_kv = m.config.num_key_value_heads
    probs0 = _group_sum(m(ids, output_attentions=True).attentions[0].float(), n_kv)[0]     # [kvh, T, T]
    seen = []
    with quantize(m, f"h2o:heavy_ratio={HEAVY},recent_ratio={RECENT},simulation={simulation}", protocol="fake") as run:
        orig = run.policy.query_keep

        def spy(layer, module, query, key, attention_mask, kwargs):
            mask = orig(layer, module, query, key, attention_mask, kwargs)
            seen.append(mask.clone())
            return mask

        monkeypatch.setattr(run.policy, "query_keep", spy)
        m(ids)
    assert len(seen) == m.config.num_hidden_layers and seen[0].shape == (1, n_kv, T, T)
    if simulation == "local":
        want = reference_local_mask(probs0, heavy, recent)
    else:                       # HEAD L152-166: one heavy set from every query's attention + |i - j| <= recent
        top = probs0.sum(1).topk(heavy, dim=-1).indices
        want = [[sorted(set(top[g].tolist()) & set(range(i + 1)) | set(range(max(0, i - recent), i + 1)))
                 for i in range(T)] for g in range(n_kv)]
    got = [[torch.nonzero(seen[0][0, g, i]).flatten().tolist() for i in range(T)] for g in range(n_kv)]
    assert got == want
    # the cache as it stands after the window (the last query's keys) is what the bits count
    keep = run.cache.layers[0].keep
    assert torch.equal(keep, seen[0][:, :, -1])
    n_keep = sum(int(run.cache.layers[l].keep.sum()) for l in range(len(seen)))
    assert run.summary()["avg_bits"] == pytest.approx(16.0 * n_keep / (len(seen) * n_kv * T))


@torch.no_grad()
def test_former_behaviour_is_a_named_value():
    """eviction="once": one keep set after the prefill, later tokens never evicted (kvlab before issue 14)."""
    m = models.tiny("llama").model
    ids = _ids(P + N)
    with quantize(m, "h2o:eviction=once,heavy_ratio=0.25,recent_ratio=0.2", protocol="decode") as run:
        out = m(ids[:, :P], use_cache=True)
        past = out.past_key_values
        for t in range(P, P + N):
            past = m(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
    keep = run.cache.layers[0].keep[0]
    assert (keep[:, P:]).all() and int(keep[0, :P].sum()) == int(0.25 * P) + int(0.2 * P)
    assert parse("h2o:eviction=once").spec != parse("h2o").spec
