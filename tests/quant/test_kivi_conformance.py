"""KIVI's fp16 residual as the authors' code keeps it (`flush="authors"`, the default), checked step by step.

The reference is the authors' code, github.com/jy-yuan/KIVI (commit 876b4d2), `models/llama_kivi.py`,
`LlamaAttention_KIVI.forward` (re-derived here as `AuthorsBuffers`, branch by branch, not through
`KIVI.flush_count`'s formulas):

* prefill of T tokens (lines 189-220): keys — T % R != 0 and T < R: all fp (194-196); T % R != 0 and
  T >= R: the first T - T % R quantized, the last T % R fp (197-199); T % R == 0: all quantized
  (200-202). Values — T <= R: all fp (210-214); else all but the last R quantized (215-220).
* each decode step (105-187): the new key joins the fp key buffer (121-124), the attention reads the
  quantized keys and the buffer (115-129); if the buffer now holds R keys, it is quantized (per channel,
  groups along tokens) and emptied (131-144). The new value joins the fp value buffer (165), the
  attention reads the quantized values and R + 1 fp ones (167-172); if the buffer holds more than R,
  its oldest value is quantized (per token) and dropped from it (174-187).

kvlab flushes before the next call's attention (`PrefillDecode.store`) instead of after the call's own:
the cache every attention call reads is the same. `flush="sliding"` (kvlab's earlier rule, whole groups
of `group` once more than R tokens are pending, K and V alike) is checked against its own formula.
"""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from kvlab import models
from kvlab.hooks import quantize
from kvlab.quant import parse
from kvlab.quant.base import LayerContext
from quant_helpers import decode_with_keep_sets

R, G = 8, 4                      # residual, group (R % G == 0, as the authors assert at line 132)
N_STEPS = 19                     # decode steps: two key flushes and more from any prefill below
PREFILLS = [5, 8, 13, 16, 21]    # T < R, T == R, T % R != 0, T % R == 0, T % R != 0 past 2R
AUTHORS = f"kivi:bits=2,group={G},residual={R}"
SLIDING = AUTHORS + ",flush=sliding"


class AuthorsBuffers:
    """Token counts of LlamaAttention_KIVI's quantized and fp buffers (keys: qk, fk; values: qv, fv).

    `prefill(T)` and `step()` return the spans (kind, start, end) the authors quantize after that call,
    so a hand loop can apply them; `read` is what the latest call's attention read: (qk, fk, qv, fv),
    the fp counts including that call's own token."""

    def __init__(self, r: int):
        self.r = r
        self.qk = self.fk = self.qv = self.fv = 0
        self.read = None

    def prefill(self, t: int) -> list[tuple[str, int, int]]:
        r = self.r
        if t % r != 0:                                       # lines 193-199
            if t < r:
                self.qk, self.fk = 0, t
            else:
                self.qk, self.fk = t - t % r, t % r
        else:                                                # lines 200-202
            self.qk, self.fk = t, 0
        if t <= r:                                           # lines 210-214
            self.qv, self.fv = 0, t
        else:                                                # lines 215-220
            self.qv, self.fv = t - r, r
        self.read = (0, t, 0, t)                             # the prefill attends to its own fp K/V
        return [("k", 0, self.qk), ("v", 0, self.qv)]

    def step(self) -> list[tuple[str, int, int]]:
        r, todo = self.r, []
        self.fk += 1                                         # lines 121-124
        self.fv += 1                                         # line 165
        self.read = (self.qk, self.fk, self.qv, self.fv)     # lines 115-129, 167-172
        if self.fk == r:                                     # lines 131-144
            todo.append(("k", self.qk, self.qk + r))
            self.qk, self.fk = self.qk + r, 0
        if self.fv > r:                                      # lines 174-187
            assert self.fv == r + 1                          # line 175
            todo.append(("v", self.qv, self.qv + 1))
            self.qv, self.fv = self.qv + 1, self.fv - 1
        return todo


def _ids(t, seed=0):
    return torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))


def _rates(method) -> tuple[float, float]:
    """Bits per element of a quantized key (in whole groups) and of a quantized value (per token)."""
    k = method.quantize(torch.randn(1, 2, G, 16), LayerContext(0, 2, "k")).bits.item() / (2 * G * 16)
    v = method.quantize(torch.randn(1, 2, 1, 16), LayerContext(0, 2, "v")).bits.item() / (2 * 16)
    return k, v


def _bits(quantized: int, stored: int, rate: float) -> float:
    """Bits per element of `stored` tokens, `quantized` of them at `rate`, the rest fp16."""
    return (quantized * rate + 16.0 * (stored - quantized)) / stored


@torch.no_grad()
@pytest.mark.parametrize("prefill", PREFILLS)
def test_authors_flush_step_by_step_matches_the_two_buffers(prefill):
    """After every decode step, per kind: which tokens are quantized (spans), and the bits of the cache
    that step read (`run.step_bits()["kind_bits"]`, the live `layer_report`), as the buffers say."""
    m = models.tiny("llama").model
    method = parse(AUTHORS)
    assert method.flush == "authors" and method.spec == AUTHORS + ",flush=authors"
    rate_k, rate_v = _rates(method)
    sim = AuthorsBuffers(R)
    ids = _ids(prefill + N_STEPS)
    want_bits = []
    with quantize(m, method, protocol="decode") as run:
        out = m(ids[:, :prefill], use_cache=True)
        sim.prefill(prefill)
        past = out.past_key_values
        for t in range(prefill, prefill + N_STEPS):
            out = m(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            sim.step()
            qk, fk, qv, fv = sim.read
            T = t + 1
            assert qk + fk == T == qv + fv
            for layer in range(2):
                sk, sv = run.token_spans(layer, "k"), run.token_spans(layer, "v")
                assert (sk.sink_end, sk.quantized_end, sk.length) == (0, qk, T), (t, layer)
                assert (sv.sink_end, sv.quantized_end, sv.length) == (0, qv, T), (t, layer)
                assert sk.n_fp == fk and sv.n_fp == fv
                assert run.token_spans(layer).quantized_end == min(qk, qv)
            # the record leaves the latest call's own token out: it is not stored under the rule yet
            bk, bv = _bits(qk, T - 1, rate_k), _bits(qv, T - 1, rate_v)
            want_bits.append((bk, bv))
            rep = run.layer_report()                                   # live counts (stored_counts), per kind
            for kind, q, b in (("k", qk, bk), ("v", qv, bv)):
                if q:                                                  # a kind with nothing booked has no row yet
                    assert rep[f"{kind}_bits"].tolist() == pytest.approx([b, b]), (t, kind)
            assert 1 <= fk <= R                                        # the key buffer never holds more than R
            if T > R:
                assert fv == R + 1                                     # R + 1 fp values read once past R
        rec = run.step_bits()
    assert len(rec["avg_bits"]) == N_STEPS
    want = torch.tensor(want_bits, dtype=torch.float64)                              # [steps, 2]
    got = torch.from_numpy(rec["kind_bits"])                                         # [steps, layers, 2]
    torch.testing.assert_close(got, want[:, None, :].expand_as(got))
    torch.testing.assert_close(torch.from_numpy(rec["avg_bits"]), want.mean(-1))     # K and V hold as many elements
    assert (rec["tokens"] == torch.arange(prefill, prefill + N_STEPS).numpy()).all()


def _hand_loop(model, ids, prefill, flush_spans):
    """Prefill, then one token per forward on a bare DynamicCache; after every call, quantize the spans
    `flush_spans(call)` names with the method itself (K per channel, V per token). Logits of every call."""
    method = parse(AUTHORS)
    cache = DynamicCache(config=model.config)

    def apply(spans):
        for i, layer in enumerate(cache.layers):
            for kind, s, e in spans:
                if e <= s:
                    continue
                name = "keys" if kind == "k" else "values"
                x = getattr(layer, name)
                q = method.quantize(x[..., s:e, :], LayerContext(layer=i, num_layers=len(cache.layers), kind=kind,
                                                                 start=s)).x
                setattr(layer, name, torch.cat([x[..., :s, :], q, x[..., e:, :]], dim=-2))

    out = model(ids[:, :prefill], past_key_values=cache, use_cache=True)
    logits = [out.logits]
    apply(flush_spans(None))
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        apply(flush_spans(t))
    return torch.cat(logits, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("prefill", [13, 16])
def test_authors_flush_logits_equal_a_hand_loop(prefill):
    """The keys quantized R at a time when the key buffer fills, the values one by one as they leave the
    window of R: the logits of every call equal kvlab's bit for bit (and differ from the sliding rule's)."""
    m = models.tiny("llama").model
    ids = _ids(prefill + N_STEPS, seed=1)
    sim = AuthorsBuffers(R)
    want = _hand_loop(m, ids, prefill, lambda t: sim.prefill(prefill) if t is None else sim.step())
    _, got, _ = decode_with_keep_sets(m, AUTHORS, ids, prefill, keep_sets=False)
    assert torch.equal(got[:, :prefill], want[:, :prefill])         # the prefill reads its own fp K/V
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _, sliding, _ = decode_with_keep_sets(m, SLIDING, ids, prefill, keep_sets=False)
    assert not torch.equal(sliding, got)


def _sliding_spans(prefill):
    """kvlab's sliding rule as it stood: before each call, the pending tokens beyond R flush in whole
    groups of G, keys and values alike. Returns flush_spans(call) for the hand loop and the per-call
    quantized counts (what each decode call read)."""
    state = {"q": 0, "T": prefill}
    read = []

    def spans(t):
        if t is not None:
            read.append(state["q"])          # this call read the cache as flushed before it
            state["T"] = t + 1
        p = state["T"] - state["q"]
        n = ((p - R) // G) * G
        if n <= 0:
            return []
        s, state["q"] = state["q"], state["q"] + n
        return [("k", s, s + n), ("v", s, s + n)]
    return spans, read


@torch.no_grad()
@pytest.mark.parametrize("prefill", [13, 16])
def test_sliding_flush_is_the_earlier_rule(prefill):
    """flush=sliding: K and V both hold R .. R+G-1 fp tokens, quantized in whole groups (the rule kvlab
    applied to KIVI before `flush` existed): logits equal a hand loop of that rule, spans and bits follow
    the old formula, and K and V are counted alike."""
    m = models.tiny("llama").model
    ids = _ids(prefill + N_STEPS, seed=2)
    spans, _ = _sliding_spans(prefill)
    want = _hand_loop(m, ids, prefill, spans)
    run, got, _ = decode_with_keep_sets(m, SLIDING, ids, prefill, keep_sets=False)
    summary = run.summary()
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    method = parse(SLIDING)
    rate_k, rate_v = _rates(method)
    spans, read = _sliding_spans(prefill)
    for t in [None, *range(prefill, prefill + N_STEPS)]:
        spans(t)
    with quantize(m, method, protocol="decode") as run:
        out = m(ids[:, :prefill], use_cache=True)
        past = out.past_key_values
        for j, t in enumerate(range(prefill, prefill + N_STEPS)):
            out = m(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            q = read[j]
            # the old expected-bits formula: the spans of a prefill of T, then one token per call
            for kind in ("k", "v", None):
                sp = run.token_spans(0, kind)
                assert (sp.sink_end, sp.quantized_end, sp.length) == (0, q, t + 1)
            if j == 0:                                                 # test_token_spans' formula
                assert q == max(0, ((prefill - R) // G) * G)
        rec = run.step_bits()
    want_bits = torch.tensor([(_bits(q, t, rate_k), _bits(q, t, rate_v))
                              for q, t in zip(read, range(prefill, prefill + N_STEPS))], dtype=torch.float64)
    got_bits = torch.from_numpy(rec["kind_bits"])
    torch.testing.assert_close(got_bits, want_bits[:, None, :].expand_as(got_bits))
    assert summary["avg_bits_end"] == pytest.approx(want_bits[-1].mean().item())


@torch.no_grad()
def test_select_forwards_the_flush_rule():
    """`select` over every layer and both kinds runs its inner KIVI's flush rule: the same logits."""
    from kvlab.quant.methods.select import select_spec

    m = models.tiny("llama").model
    ids = _ids(13 + N_STEPS, seed=3)
    _, alone, _ = decode_with_keep_sets(m, AUTHORS, ids, 13, keep_sets=False)
    _, wrapped, _ = decode_with_keep_sets(m, select_spec(AUTHORS, "all", "kv"), ids, 13, keep_sets=False)
    assert torch.equal(alone, wrapped)


@torch.no_grad()
@pytest.mark.parametrize("flush", ["authors", "sliding"])
def test_both_rules_on_sliding_window_layers(flush):
    """gemma2 with a 16-token window (layer 0 slides, layer 1 is global): past the window both rules
    keep working; the global layer follows its rule exactly, the sliding one stays consistent."""
    lm = models.tiny("gemma2", sliding_window=16)
    m = lm.model
    spec = f"kivi:bits=2,group={G},residual={R},flush={flush}"
    ids = _ids(56)
    sim = AuthorsBuffers(R)
    with quantize(m, spec, protocol="decode") as run:
        out = m(ids[:, :24], use_cache=True)
        sim.prefill(24)
        past = out.past_key_values
        for t in range(24, 56):
            out = m(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            sim.step()
            assert torch.isfinite(out.logits).all()
            assert run.token_spans(1).length == t + 1                # layer 1 is global: it stores every token
            for kind in "kv":
                sp = run.token_spans(0, kind)
                assert sp.length == 15 and 0 <= sp.quantized_end <= sp.length
                assert sp.n_fp <= (R + 1 if flush == "authors" else R + G)
            if flush == "authors":
                qk, _, qv, _ = sim.read
                assert (run.token_spans(1, "k").quantized_end, run.token_spans(1, "v").quantized_end) == (qk, qv)
        rec = run.step_bits()
    assert len(rec["avg_bits"]) == 32
    assert ((rec["kind_bits"] > 0) & (rec["kind_bits"] <= 16.0)).all()
