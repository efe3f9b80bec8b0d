"""The interception core on tiny random models of every supported family."""
import pytest
import torch
import torch.nn.functional as F

import kvlab
from kvlab import KVLabError, models
from kvlab.core.arch import apply_rope
from kvlab.hooks import capture, quantize

FAMILIES = models.TINY_FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return models.tiny(request.param)


def _ids(b=2, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (b, t), generator=g)


def _kl(logits, ref):
    return F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()


@torch.no_grad()
@pytest.mark.parametrize("protocol", ["fake", "prefill-decode"])
def test_identity_is_bit_identical(tiny, protocol):
    m, ids = tiny.model, _ids()
    ref = m(ids).logits
    with quantize(m, "fp16", protocol=protocol) as run:
        out = m(ids)
        # exact by design: the identity method runs the bare model's own kernels on the same tensors
        assert torch.equal(out.logits, ref)
        cont = m(_ids(2, 8, 1), past_key_values=out.past_key_values).logits
    assert torch.equal(cont, m(_ids(2, 8, 1), past_key_values=m(ids).past_key_values).logits)
    assert run.summary()["avg_bits"] == 16.0


@torch.no_grad()
def test_identity_generate_identical(tiny):
    m, ids = tiny.model, _ids(1, 12)
    ref = m.generate(ids, max_new_tokens=10, do_sample=False)
    with quantize(m, "fp16", protocol="prefill-decode"):
        out = m.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(ref, out)


@torch.no_grad()
def test_uniform_orders_by_bits(tiny):
    m, ids = tiny.model, _ids()
    ref = m(ids).logits
    kls = {}
    for bits in (8, 4, 2):
        with quantize(m, f"int{bits}") as run:
            kls[bits] = _kl(m(ids).logits, ref)
        assert run.summary()["avg_bits"] > bits  # metadata counted
    # measured over the 7 families: int8 KL 2e-6 .. 2.7e-5 (>= 37x below 1e-3); each step down in bits
    # raises KL >= 14x, far beyond fp32 rounding of a KL (~1e-8)
    assert kls[8] < 1e-3
    assert kls[8] < kls[4] < kls[2]


@torch.no_grad()
def test_fake_changes_prefill_prefill_decode_only_continuation(tiny):
    m, ids = tiny.model, _ids()
    ctx, cont = ids[:, :24], ids[:, 24:]
    ref_ctx = m(ctx)
    ref_cont = m(cont, past_key_values=ref_ctx.past_key_values).logits
    with quantize(m, "int2", protocol="fake"):
        assert not torch.equal(m(ctx).logits, ref_ctx.logits)
    with quantize(m, "int2", protocol="prefill-decode") as run:
        out = m(ctx)
        # exact by design: the prefill attends to its own fp K/V with the bare model's kernels
        assert torch.equal(out.logits, ref_ctx.logits)
        cont_q = m(cont, past_key_values=out.past_key_values).logits
    assert not torch.equal(cont_q, ref_cont)
    s = run.summary()
    # the cache the continuation was scored against: 24 context tokens at 2 bits + fp16 scale and zero
    # per 16-element token vector (the 16 continuation tokens are not stored yet)
    assert s["avg_bits"] == pytest.approx(2 + 32 / 16)


@torch.no_grad()
def test_prefill_decode_accounting_with_residual_window():
    m = models.tiny("llama").model
    ids = _ids(1, 40)
    with torch.no_grad(), quantize(m, "int:bits=2,residual=8", protocol="prefill-decode") as run:
        past = m(ids[:, :24]).past_key_values
        m(ids[:, 24:36], past_key_values=past)      # flushes 16 of the 24 stored tokens (8 stay fp16)
        assert run.summary()["avg_bits"] == pytest.approx((16 * 4 + 8 * 16) / 24)
        m(ids[:, 36:], past_key_values=past)        # now 36 stored: 28 quantized, 8 fp16
        assert run.summary()["avg_bits"] == pytest.approx((28 * 4 + 8 * 16) / 36)


@torch.no_grad()
def test_pre_rope_keys_rotate_to_post_rope_keys(tiny):
    m, ids = tiny.model, _ids(1, 20)
    with capture(m, what=("k_pre", "k")) as cap:
        m(ids)
    from kvlab.core.arch import find_attention
    sites = find_attention(m)
    rotary = m.model.rotary_emb
    pos = torch.arange(ids.shape[1])[None]
    for layer, site in enumerate(sites):
        k_pre = cap["k_pre"][layer]
        kwargs = {}
        if isinstance(getattr(rotary, "rope_type", None), dict):   # gemma3: local/global rope per layer type
            kwargs["layer_type"] = m.config.layer_types[layer]
        cos, sin = rotary(k_pre, pos, **kwargs)
        # same formula, possibly another elementwise kernel (FMA or not): ~1 ulp of |k| <= 3.3 (4e-7);
        # identical here
        assert torch.allclose(apply_rope(site.module, k_pre, cos, sin), cap["k"][layer], atol=1e-5)


@torch.no_grad()
def test_attention_received_matches_eager_output_attentions(tiny):
    m, ids = tiny.model, _ids(2, 30)
    orig = m.config._attn_implementation
    m.set_attn_implementation("eager")
    try:
        att = m(ids, output_attentions=True).attentions
    finally:
        m.set_attn_implementation(orig)
    with capture(m, what=("attn",)) as cap:
        m(ids)
    g = m.config.num_attention_heads // m.config.num_key_value_heads
    for layer, a in enumerate(att):                     # a: [b, heads, q, kv]
        expected = a.sum(2).view(a.shape[0], -1, g, a.shape[-1]).sum(2)
        # eager's softmax vs our chunked fp32 one, summed over 30 queries x 2 heads (values up to ~9):
        # worst-case fp32 rounding 60 * 1.2e-7 * 9 ~ 6e-5; measured <= 1e-6
        assert torch.allclose(cap["attn"][layer], expected, atol=1e-4)


@torch.no_grad()
def test_attention_stats_chunked_equal_unchunked():
    from kvlab.core.attention import attention_received
    q, k = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8)
    a = attention_received(q, k, None, 0.3, 2, 5, chunk=7)
    b = attention_received(q, k, None, 0.3, 2, 5, chunk=1000)
    # chunks of 7 vs all 50 queries: other matmul shapes and summation order, fp32 rounding of sums of
    # up to 100 probabilities (measured <= 1e-6); the maxima differ by a few ulp (relative 3e-7 measured,
    # allclose's default rtol=1e-5)
    assert torch.allclose(a.received_sum, b.received_sum, atol=1e-5)
    assert torch.allclose(a.received_max, b.received_max)


def test_hooks_removed_after_exception():
    lm = models.tiny("llama")
    m = lm.model
    n_hooks = lambda: sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())  # noqa
    before, impl = n_hooks(), m.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m, what=("k_pre", "q")):
            assert n_hooks() > before
            assert m.config._attn_implementation != impl
            raise RuntimeError("boom")
    assert n_hooks() == before and m.config._attn_implementation == impl
    assert not hasattr(m, "_kvlab_session")
    with torch.no_grad():
        assert type(m(_ids()).past_key_values).__name__ == "DynamicCache"


def test_double_installation_is_an_error():
    m = models.tiny("llama").model
    with quantize(m, "int4"):
        with pytest.raises(KVLabError, match="already installed"):
            with capture(m):
                pass


def test_unsupported_architecture_named_at_install():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = models.tiny_config("llama")
            self.lin = torch.nn.Linear(4, 4)
    with pytest.raises(KVLabError, match="unsupported architecture Toy"):
        with quantize(Toy(), "int4"):
            pass


@torch.no_grad()
def test_nan_in_keys_names_layer_and_tensor():
    m = models.tiny("llama").model
    k_proj = m.model.layers[1].self_attn.k_proj
    h = k_proj.register_forward_hook(lambda mod, i, o: o.masked_fill(torch.zeros_like(o, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True), float("nan")))
    try:
        with pytest.raises(KVLabError, match="keys of layer 1"):
            with quantize(m, "int4"):
                m(_ids())
    finally:
        h.remove()


@torch.no_grad()
def test_layer_report_and_capture_limits():
    m = models.tiny("qwen2").model
    with quantize(m, "int4") as run:
        m(_ids())
    rep = run.layer_report()
    # int4 key error measured 0.064 (3x below the bound)
    assert list(rep["layer"]) == [0, 1] and (rep["k_rel_err"] > 0).all() and (rep["k_rel_err"] < 0.2).all()
    with capture(m, what=("k", "v"), max_tokens=10, to="cpu") as cap:
        m(_ids())
    assert cap["k"][0].shape == (2, 2, 10, 16) and cap["v"][1].device.type == "cpu"


def test_bad_protocol_and_capture_names():
    m = models.tiny("llama").model
    with pytest.raises(KVLabError, match="protocol"):
        with quantize(m, "int4", protocol="online"):
            pass
    with pytest.raises(KVLabError, match="cannot capture"):
        with capture(m, what=("keys",)):
            pass


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_with_identity():
    lm = models.tiny("llama")
    m = lm.model
    a = _ids(1, 20, 3)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), a], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    ref = m.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with quantize(m, "fp16", protocol="prefill-decode"):
        out = m.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, out)


def test_capture_retain_grad_gives_gradients():
    m = models.tiny("llama").model
    ids = _ids(1, 16)
    with capture(m, what=("k_pre", "k", "v"), retain_grad=True) as cap:
        out = m(ids, labels=ids)
    out.loss.backward()
    for what in ("k_pre", "k", "v"):
        g = cap[what][0].grad
        assert g is not None and g.abs().sum() > 0, what
    m.zero_grad()


@torch.no_grad()
def test_nan_produced_by_a_method_is_named():
    from dataclasses import dataclass
    from kvlab.quant.base import Method, Quantized

    @dataclass(frozen=True)
    class Broken(Method):
        name = "broken-test"

        def quantize(self, x, ctx):
            return Quantized(x / 0.0 * 0.0, torch.zeros((), device=x.device))

    m = models.tiny("llama").model
    with pytest.raises(KVLabError, match=r"quantized keys \(output of broken-test\) of layer 0"):
        with quantize(m, Broken()):
            m(_ids())


def _first_attention(model):
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))


@torch.no_grad()
@pytest.mark.parametrize("spec", ["fp16", "int:bits=2", "kvquant:bits=3,nuq=false,k_scale=online,outliers=0.01", "h2o:heavy_ratio=0.25,recent_ratio=0.25"])
def test_attention_output_error_matches_layer0_oracle(tiny, spec):
    """Layer 0 sees the same queries with and without quantization, so its attention-output error must
    equal the relative change of o_proj's input between a plain run and a quantized run (both protocols;
    in prefill-decode only the continuation reads a stored cache, so only it counts). Covers pre-RoPE keys
    (kvquant), eviction (h2o), sliding layers (gemma2/3) and fused qkv (phi3)."""
    m, ids = tiny.model, _ids(2, 48, 3)
    got = []
    hook = _first_attention(m).o_proj.register_forward_pre_hook(lambda mod, a: got.append(a[0].clone()))
    try:
        fp_full = (m(ids), got.pop())[1]
        out = m(ids[:, :32])
        got.clear()
        m(ids[:, 32:], past_key_values=out.past_key_values)
        fp_cont = got.pop()
        for protocol, fp in (("fake", fp_full), ("prefill-decode", fp_cont)):
            with quantize(m, spec, protocol=protocol, attn_error=True) as run:
                if protocol == "fake":
                    m(ids)
                else:
                    out = m(ids[:, :32])
                    got.clear()
                    m(ids[:, 32:], past_key_values=out.past_key_values)
            q = got.pop()
            oracle = ((q - fp).norm() / fp.norm()).item()
            measured = run.layer_report()["attn_rel_err"]
            # same tensors, norms reduced in another order (and, in prefill-decode, summed over calls):
            # relative rounding ~sqrt(6000) * 1.2e-7 ~ 1e-5 of an error >= 0.02; measured <= 1.1e-7
            assert measured[0] == pytest.approx(oracle, rel=1e-4, abs=1e-6), (protocol, measured.tolist())
            assert run.summary()["attn_rel_err"] == pytest.approx(measured.mean())
            if spec == "fp16":
                assert (measured == 0).all()       # exact: fp16 K/V are the reference K/V, same kernel
            else:
                assert (measured > 0.01).all()     # smallest measured: 0.023 (gemma2, kvquant, prefill-decode)
    finally:
        hook.remove()


def test_attention_output_error_not_measured_by_default():
    import math

    m = models.tiny("llama").model
    with torch.no_grad(), quantize(m, "int4") as run:
        m(_ids())
    assert math.isnan(run.summary()["attn_rel_err"])
    assert m.config._attn_implementation in ("sdpa", "eager")      # no attention wrapper was needed


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_received_matches_brute_force_for_continuations(mask_kind):
    """q_len < kv_len (a continuation over a cache), left padding in the mask, chunks trimmed causally."""
    from kvlab.core.attention import attention_received
    g = torch.Generator().manual_seed(0)
    b, h, kvh, q_len, kv_len, d = 2, 4, 2, 13, 29, 8
    q, k = torch.randn(b, h, q_len, d, generator=g), torch.randn(b, kvh, kv_len, d, generator=g)
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    allowed = (torch.arange(kv_len)[None] <= pos)[None, None].expand(b, 1, q_len, kv_len).clone()
    allowed[1, ..., :4] = False                                    # row 1 is left-padded by 4 tokens
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    if mask_kind == "none":
        allowed[1, ..., :4] = True
    logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    want_sum = p.sum(2).view(b, kvh, 2, kv_len).sum(2)
    want_max = p[:, :, -3:].amax(2).view(b, kvh, 2, kv_len).amax(2)
    for chunk in (1, 5, 64):
        st = attention_received(q, k, mask, 0.3, 2, 3, chunk=chunk)
        # other matmul shapes / summation order than the brute force: fp32 rounding of probabilities
        # (<= 1) summed over <= 26 terms, ~1e-6 worst case
        assert torch.allclose(st.received_sum, want_sum, atol=1e-5)
        assert torch.allclose(st.received_max, want_max, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("first_call", [1, 2, 7])
def test_received_max_slides_over_the_last_n_recent_queries_across_calls(first_call, n):
    """QAQ's attention window in decode: after each call, a_max of key j is the max of its attention
    over the last n_recent queries of the sequence, whichever calls they came in (a prefill of
    `first_call` queries, then one per call), brute-forced here from the whole probability matrix."""
    from kvlab.core.attention import accumulate_stats, attention_received
    g = torch.Generator().manual_seed(1)
    b, h, kvh, T, d = 1, 4, 2, 12, 8
    q, k = torch.randn(b, h, T, d, generator=g), torch.randn(b, kvh, T, d, generator=g)
    causal = torch.arange(T)[None] <= torch.arange(T)[:, None]
    p = ((q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3).masked_fill(~causal, float("-inf")).softmax(-1)
    folded = p.view(b, kvh, 2, T, T).amax(2)                       # [b, kvh, query, key]
    st, t = None, 0
    for t1 in [first_call] + list(range(first_call + 1, T + 1)):
        new = attention_received(q[:, :, t:t1], k[:, :, :t1], None, 0.3, 2, n)
        st = accumulate_stats(st, new, t1 - t)
        want = folded[:, :, max(0, t1 - n):t1, :t1].amax(2)
        assert torch.allclose(st.received_max, want, atol=1e-6), t1
        assert st.recent.shape[-2] == min(n, t1)
        assert torch.allclose(st.received_sum, p[:, :, :t1, :t1].sum(2).view(b, kvh, 2, t1).sum(2), atol=1e-5)
        t = t1


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_attention_with_stats_output_matches_the_models_kernel(mask_kind, softcap):
    """The fake protocol's statistics pass takes its output from kvlab's own fp32 probabilities: it must
    be the eager kernel's output (GQA, continuation over a cache, padding, softcapping) and carry the
    same statistics as `attention_received`."""
    from kvlab.core.attention import attention_received, attention_with_stats
    g = torch.Generator().manual_seed(2)
    b, h, kvh, q_len, kv_len, d = 2, 6, 2, 11, 23, 8
    q, k, v = (torch.randn(b, h, q_len, d, generator=g), torch.randn(b, kvh, kv_len, d, generator=g),
               torch.randn(b, kvh, kv_len, d, generator=g))
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    allowed = (torch.arange(kv_len)[None] <= pos)[None, None].expand(b, 1, q_len, kv_len).clone()
    allowed[1, ..., :3] = False
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    if mask_kind == "none":
        allowed[1, ..., :3] = True
    logits = (q @ k.repeat_interleave(3, dim=1).transpose(-1, -2)) * 0.3
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    want = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(3, dim=1)
    for chunk in (4, 64):
        out, st = attention_with_stats(q, k, v, mask, 0.3, 3, 2, softcap=softcap, chunk=chunk)
        assert out.shape == (b, q_len, h, d)
        torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-5)
        ref = attention_received(q, k, mask, 0.3, 3, 2, softcap=softcap, chunk=chunk)
        assert torch.equal(st.received_sum, ref.received_sum) and torch.equal(st.received_max, ref.received_max)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_pass_from_own_probabilities_matches_the_models_kernel(family):
    """Every family (sliding windows, softcapping, q/k norms): in the fake statistics pass the attention
    output comes from kvlab's probabilities; each attention module's output there must be what the
    model's own kernel gives (fp32 rounding), and so must the statistics."""
    from kvlab.core import session as session_mod
    lm = models.tiny(family)
    m, ids = lm.model, _ids(1, 40)
    seen = {}
    for own in (True, False):
        plain = session_mod._plain_attention
        session_mod._plain_attention = (lambda module, kwargs: own) if not own else plain
        first = {}                               # per layer: the first call's output (the statistics pass)
        def keep_first(mod, inp, out, i):
            first.setdefault(i, out[0].clone())

        hooks = [layer.self_attn.register_forward_hook(lambda mod, inp, out, i=i: keep_first(mod, inp, out, i))
                 for i, layer in enumerate(m.model.layers)]
        try:
            with quantize(m, "qaq-low", protocol="fake") as run:
                m(ids)
                seen[own] = (first, [s.received_sum.clone() for s in run.stats])
        finally:
            session_mod._plain_attention = plain
            for hd in hooks:
                hd.remove()
    (out_own, st_own), (out_ref, st_ref) = seen[True], seen[False]
    for i in out_ref:
        scale = out_ref[i].abs().max()
        torch.testing.assert_close(out_own[i] / scale, out_ref[i] / scale, rtol=0, atol=1e-5)
    for a, b in zip(st_own, st_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["qaq-low", "qaq-code"])     # layer scope; whole cache
def test_statistics_pass_stops_after_the_last_layers_attention(family, spec):
    """The fake statistics pass needs every layer's K/V and statistics, all taken once the last layer's
    attention has run: its output projection, MLP and the LM head are skipped (each runs once per forward,
    in the quantized pass), every earlier layer runs twice, and every layer's statistics are there."""
    lm = models.tiny(family)
    m, ids = lm.model, _ids(1, 40)
    calls: dict[str, int] = {}
    last = m.model.layers[-1]
    watched = {"first_mlp": m.model.layers[0].mlp, "last_mlp": last.mlp, "last_o_proj": last.self_attn.o_proj,
               "lm_head": m.lm_head}
    hooks = [mod.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, mod in watched.items()]
    try:
        with quantize(m, spec, protocol="fake") as run:
            m(ids)
            assert all(s is not None and s.received_sum.shape[-1] == 40 for s in run.stats)
    finally:
        for hd in hooks:
            hd.remove()
    assert calls == {"first_mlp": 2, "last_mlp": 1, "last_o_proj": 1, "lm_head": 1}
