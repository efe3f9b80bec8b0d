"""Retrieval under a quantized cache (kvlab.retrieval) and per-token maps from a session (kvlab.bitmaps),
on tiny random models (seconds)."""
import pytest
import torch

import kvlab
from kvlab import bitmaps, data
from kvlab.retrieval import (exact_length_passkey, generate, generation_agreement, passkey_accuracy)


@pytest.fixture(scope="module")
def lm():
    return kvlab.load("tiny-llama")


@pytest.fixture(scope="module")
def ids(lm):
    return data.windows(lm, "wiki", n_tokens=96, window=96)


def _bare_generate(lm, ids, n):
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out[:, ids.shape[-1]:]


# ----------------------------------------------------------------------------- retrieval
def test_exact_length_examples(lm):
    for n in (300, 333):                 # 333 cannot be hit with this key/depth (snapping to whitespace)
        ex = exact_length_passkey(lm.tokenizer, n, 0.5, seed=3)
        assert abs(ex.input_ids.shape[-1] - n) <= (0 if n == 300 else 2)
        assert lm.tokenizer.decode(ex.input_ids[0]).count(ex.answer) == 2      # the needle says it twice


def test_passkey_grid_runs_and_has_every_cell(lm):
    df = passkey_accuracy(lm, "kivi-2", context_lengths=[300, 360], depths=[0.0, 0.5, 1.0], n_per_cell=2, seed=1)
    assert len(df) == 2 * 3 * 2
    assert set(df["context"]) == {300, 360} and set(df["depth"]) == {0.0, 0.5, 1.0}
    assert (df["tokens"] == df["context"]).all()
    assert df["exact"].dtype == bool and df["digits"].between(0, 1).all()
    grid = df.pivot_table(index="depth", columns="context", values="exact")
    assert grid.shape == (3, 2)


def test_fp16_generation_equals_plain_generate(lm):
    ids = torch.cat([exact_length_passkey(lm.tokenizer, 300, d, seed=5).input_ids for d in (0.0, 0.5, 1.0)])
    for protocol in ("prefill-decode", "fake"):
        got = generate(lm, "fp16", ids, 8, protocol=protocol)
        assert torch.equal(got, _bare_generate(lm, ids, 8))     # exact: same batch, the bare model's kernels


def test_passkey_fp16_rows_match_plain_generate(lm):
    df = passkey_accuracy(lm, "fp16", context_lengths=[300], depths=[0.0, 1.0], n_per_cell=2, seed=2,
                          batch_size=16)
    # plain generate on the same batches passkey_accuracy ran (prompts of equal token and answer length,
    # in row order, up to batch_size): fp16 then runs the very same kernels, so tokens match exactly.
    # One prompt at a time would be another matmul shape, whose logits may differ in the last bits
    # (1e-7 measured) and could flip a greedy near-tie on some CPU.
    groups = {}
    for _, r in df.iterrows():
        ex = exact_length_passkey(lm.tokenizer, r["context"], r["depth"], r["example_seed"])
        groups.setdefault((ex.input_ids.shape[-1], ex.answer_ids.numel()), []).append((r, ex))
    for (_, n_ans), rows in groups.items():
        for s in range(0, len(rows), 16):
            chunk = rows[s:s + 16]
            want = _bare_generate(lm, torch.cat([ex.input_ids for _, ex in chunk]), n_ans)
            for (r, _), w in zip(chunk, want):
                assert r["generated"] == lm.tokenizer.decode(w.tolist())


def test_generation_agreement(lm, ids):
    same = generation_agreement(lm, "fp16", ids[:, :64], max_new_tokens=6)
    assert same["agreement"] == 1.0 and same["prefix"] == 6.0
    q = generation_agreement(lm, "int:bits=1", ids[:, :64], max_new_tokens=6, reference=same["reference"])
    assert 0.0 <= q["agreement"] <= 1.0 and q["tokens"].shape == (1, 6)


def test_hf_comparator_generates(lm):
    pytest.importorskip("optimum.quanto")
    ids = exact_length_passkey(lm.tokenizer, 300, 0.5, seed=1).input_ids
    assert generate(lm, "hf-quanto-int4", ids, 4).shape == (1, 4)
    with pytest.raises(kvlab.KVLabError, match="prefill-decode"):
        generate(lm, "hf-quanto-int4", ids, 4, protocol="fake")


# ----------------------------------------------------------------------------- bit maps
def _run(lm, ids, spec, protocol):
    with torch.no_grad(), kvlab.quantize(lm, spec, protocol=protocol) as run:
        if protocol == "fake":
            lm.model(ids)
        else:
            out = lm.model(ids[:, :64])
            lm.model(ids[:, 64:], past_key_values=out.past_key_values)
    return run


@pytest.mark.parametrize("protocol", ["fake", "prefill-decode"])
def test_qaq_bit_map_matches_reported_bits(lm, ids, protocol):
    """The map holds code bits per value (fp16 tokens at 16); the report adds per-group metadata.

    QAQ head level stores per (token, KV head) group of head_dim values: B code bits per value + 32 bits of
    scale/zero + an 8-bit width field. Without outliers, reported = map mean + 40 / head_dim, exactly (fake:
    the whole window; prefill-decode: the stored prompt, all quantized, the continuation not stored yet).
    With 1% outliers each outlier costs 48 bits instead of its B code bits (B in 1..8), so the gap grows by
    n_outliers x (48 - B) / elements: ~0.5 bits here (QAQ reports its outlier count in info).
    """
    T, d = ids.shape[-1], 16
    n_q = T if protocol == "fake" else 64     # prefill-decode: the 64 prompt tokens are stored quantized
    for spec, slack in (("qaq:outliers=0.0", 1e-4), ("qaq", 1.0)):
        run = _run(lm, ids, spec, protocol)
        for kind in "kv":
            m = bitmaps.bit_map(run, kind)
            assert m.shape == (2, 2, T)                      # [layers, kv_heads, tokens]
            assert (m[..., :n_q] <= 8).all() and (m[..., :n_q] >= 1).all()
            if protocol == "prefill-decode":
                assert (m[..., 64:] == 16).all()             # the continuation: in the cache at fp16
        # the report (and bits_table's map mean) covers the stored cache: every token quantized
        tab = bitmaps.bits_table(run)
        for _, r in tab.iterrows():
            n_out = int(run.info[r["layer"]][r["kind"]][f"outliers_{r['kind']}"])
            elems = 2 * n_q * d                              # kv_heads x stored tokens x head_dim
            # each outlier: 48 bits stored instead of its group's 1..8 code bits
            lo, hi = 40 / d + n_out * (48 - 8) / elems, 40 / d + n_out * (48 - 1) / elems
            assert lo - 1e-4 <= r["meta"] <= hi + 1e-4, (r, n_out)
            assert r["meta"] <= 40 / d + slack
            if spec == "qaq:outliers=0.0":
                assert n_out == 0 and r["meta"] == pytest.approx(40 / d, abs=1e-4)
        info_map = run.info[0]["k"]["bits_k"][0].float()
        assert torch.equal(bitmaps.bit_map(run, "k")[0, :, :info_map.shape[-1]], info_map)


def test_qaq_layer_level_map_repeats_over_heads(lm, ids):
    run = _run(lm, ids, "qaq:level=layer,outliers=0.0", "fake")
    m = bitmaps.bit_map(run, "v")
    assert torch.equal(m[:, 0], m[:, 1])


def test_qhitter_keep_map_and_bits(lm, ids):
    run = _run(lm, ids, "qhitter-20", "fake")
    keep = bitmaps.keep_map(run)
    assert keep.shape == (2, 2, 96) and keep.dtype == torch.bool
    per_head = keep.sum(-1)
    n_keep = int(0.05 * 96) + int(0.07 * 96) + int(0.08 * 96)
    assert (per_head == n_keep).all()
    bk = bitmaps.bit_map(run, "k")
    assert (bk[~keep] == 0).all() and (bk[keep] == 4).all()
    tab = bitmaps.bits_table(run)
    assert (tab["meta"] - 32 / 16 * n_keep / 96).abs().max() < 1e-4     # one fp16 scale + zero per kept token


def test_attention_maps(lm, ids):
    with kvlab.capture(lm, what=("attn",)) as cap:
        with torch.no_grad():
            lm.model(ids)
    a = bitmaps.attention_map(cap)
    assert a.shape == (2, 2, 96)
    # every query row sums to 1 per query head: 96 queries x 2 query heads per KV head. fp32: each softmax
    # row sums to 1 within a few ulp and the ~18k-term sum adds ~log2(18k) * 1.2e-7 * 192 ~ 3e-4 at worst
    # (1.5e-5 measured; allclose's default rtol=1e-5 adds 1.9e-3 to the atol)
    assert torch.allclose(a.sum(-1), torch.full((2, 2), 192.0), atol=1e-3)
    run = _run(lm, ids, "qaq", "fake")
    amax = bitmaps.attention_map(run, "max")
    assert amax.shape == (2, 2, 96) and (amax <= 1 + 1e-6).all()      # probabilities; 1e-6 = 8 ulp of 1
    assert bitmaps.layer_view(amax, "max").shape == (2, 96)


def test_pmkvq_schedule_matches_session(lm):
    ids = data.windows(lm, "wiki", n_tokens=200, window=200)
    m = kvlab.quant.parse("pmkvq:allocation=uniform,budget=4.0,max_tokens=96,residual=16,shrink=direct,reparam=none")
    with pytest.raises(kvlab.KVLabError, match="once per forward"):      # the authors' rule depends on the arrivals
        bitmaps.progressive_schedule(kvlab.quant.parse("pmkvq:allocation=uniform,reparam=none"), 2, [20])
    sched = bitmaps.progressive_schedule(m, 2, [20, 48, 96, 160], head_dim=16)
    meas = bitmaps.progressive_measured(lm, m, ids, [20, 48, 96, 160])
    merged = sched.merge(meas, left_on=["layer", "tokens"], right_on=["layer", "prefill"])
    assert len(merged) == 8
    assert (merged["bits_x"] == merged["bits_y"]).all(), merged
    # bits per element of the stored cache: the schedule's accounting equals the session's report
    assert merged["avg_bits"].to_numpy() == pytest.approx(merged["k_bits"].to_numpy(), abs=1e-6)
    assert merged["avg_bits"].to_numpy() == pytest.approx(merged["v_bits"].to_numpy(), abs=1e-6)
    # halves as the cache grows past its budget (the fp window charged to it: 16 -> 4 in one length step)
    assert {16, 2} <= set(sched["bits"]) <= {2, 4, 8, 16}
    assert all((g.sort_values("tokens")["bits"].diff().dropna() <= 0).all() for _, g in sched.groupby("layer"))


def test_uniform_candidates():
    cand = bitmaps.uniform_candidates(64)
    assert {"int:bits=4", "int:bits=4,v_bits=2", "int:bits=2,group=32"} <= set(cand["spec"])
    assert cand.set_index("spec").loc["int:bits=4", "avg_bits"] == pytest.approx(4.5)
    assert cand.set_index("spec").loc["int:bits=2,group=32", "avg_bits"] == pytest.approx(3.0)
    assert bitmaps.nearest_uniform(3.45, cand) == "int:bits=4,v_bits=2"


def test_pareto_mask():
    import pandas as pd
    from kvlab.plots import pareto_mask
    df = pd.DataFrame({"bits": [16, 4.5, 3.0, 3.0, 2.5, 5.0], "ppl": [10, 10.5, 12, 13, 40, 11]})
    assert pareto_mask(df, "bits", "ppl").tolist() == [True, True, True, False, True, False]
