"""QAQ (`variant="code"`) against the authors' implementation, re-derived here from their source.

Upstream: github.com/ClubieDong/QAQ-KVCacheQuantization at f8d47e0 ("quantizer.py" = src/quantizer.py,
"evaluator.py" = src/evaluator.py). `authors_quantize` below restates their `Quantizer.quantize` for
the uniform attention-aware quantizer (the one all their attention-aware runs use, grid_search.py:63-96):
the cache is laid out [batch, tokens, layers, heads, head_dim] (quantizer.py:269) and grouped over the
trailing dims of the level (quantizer.py:59-64). One assumption is kvlab's, not theirs: the group's mean
and scale are rounded to fp16 (what kvlab stores); the authors compute in the model's dtype, fp16 in
their runs (src/main.py:24), so rounding the parameters is what their fp16 runs store too.
"""
from __future__ import annotations

import math

import pytest

from kvlab.quant import parse
import torch
from transformers.cache_utils import DynamicCache

from kvlab import models
from kvlab.hooks import quantize
from kvlab.quant import AttentionStats, LayerContext
from kvlab.quant.methods.qaq import QAQ

GROUP_DIMS = {"token": 3, "layer": 2, "head": 1}       # quantizer.py:59-64: (-3,-2,-1) / (-2,-1) / (-1,)


def authors_quantize(cache, attentions, kind, *, level, outliers, last_n, eps, n_min, n_max,
                     q_norm=300.0, zero="authors", bit_math="fp16"):
    """The authors' Quantizer.quantize (uniform, asymmetric, attention-aware) on one sequence batch.

    cache: [layers, b, heads, T, d] (quantizer.py:268); attentions: per layer [b, heads, T, T], the
    prompt's own attention (evaluator.py:71). Returns (dequantized cache like `cache`, bits per group
    [b, T, (layers), (heads)], bits booked by the authors for the whole cache).
    `zero="mean"` replaces their 0-bit reconstruction by the mean (kvlab's former rule).
    `bit_math="fp16"`: the bit rule on fp16 tensors, as in their fp16 runs (src/main.py:24: R and the
    attention probabilities are fp16, so is every result); "fp32": in float64 (kvlab's former rule).
    """
    x = cache.permute(1, 3, 0, 2, 4).float()                          # [b, T, Ly, h, d], quantizer.py:269
    b, T, Ly, h, d = x.shape
    nd = GROUP_DIMS[level]
    g = x.flatten(start_dim=5 - nd)                                   # groups [b, T, (Ly), (h)], n values
    n = g.shape[-1]
    # outliers, per group, by kthvalue: quantizer.py:198-212
    if outliers == 0.0:
        mask = torch.zeros_like(g, dtype=torch.bool)
    else:
        lo = torch.kthvalue(g, int(math.ceil(outliers / 2 * n)), dim=-1).values[..., None]
        hi = torch.kthvalue(g, int(math.floor((1.0 - outliers / 2) * n)), dim=-1).values[..., None]
        mask = (g <= lo) | (g > hi)
    keep = ~mask
    # statistics of the non-outliers (masked tensors): quantizer.py:173, 181-183, 217, 226-230
    mx = torch.where(keep, g, -math.inf).amax(-1)
    mn = torch.where(keep, g, math.inf).amin(-1)
    mean = torch.where(keep, g, 0.0).sum(-1) / keep.sum(-1)
    dt = torch.float16 if bit_math == "fp16" else torch.float64
    R = (mx - mn).to(dt)
    # error spans: keys quantizer.py:160 (a Python float), values quantizer.py:163-171 (a tensor)
    if kind == "k":
        e = math.sqrt(12.0 / q_norm * math.log(T ** 3 / (T - 1) * eps ** 2 + 1))
    else:
        a = torch.stack(attentions)[:, :, :, -last_n:, :]            # [Ly, b, h, last_n, T]
        a = a.permute(1, 4, 0, 2, 3).flatten(start_dim=5 - nd)       # [b, T, (Ly), (h), ...]: quantize_dims
        e = math.sqrt(12.0 / T) * eps / a.amax(-1).to(dt)
    # bits: quantizer.py:187, 191; the last last_n - 1 tokens at n_max: quantizer.py:193-195
    bits = torch.clamp(torch.ceil(torch.log2(R / (2 * e) + 1)).long(), n_min, n_max)
    if last_n > 1:
        bits[:, -last_n + 1:] = n_max
    # grid: mean + clamp(round((x - mean) / s), -2^(n-1), 2^(n-1) - 1) * s, s = R / 2^n
    # (quantizer.py:230, 239, 244, 249); at n = 0 both bounds are 2 ** -1 - 1 = -(2 ** -1) = -0.5
    nb = bits.double()[..., None]
    m16 = mean.half().float()[..., None]
    s16 = ((mx - mn)[..., None] / 2.0 ** nb).half().float()
    k = torch.round((g - m16) / s16)
    k = torch.minimum(torch.maximum(k, -(2.0 ** (nb - 1))), 2.0 ** (nb - 1) - 1).float()
    if zero == "mean":
        k = torch.where(nb == 0, 0.0, k)
    deq = torch.where(mask, g, m16 + k * s16)                          # outliers kept: quantizer.py:253
    out = deq.reshape(b, T, Ly, h, d).permute(2, 0, 3, 1, 4)
    # bits booked: quantizer.py:275-276 (per value) and 286-298 (per token, + mean and scale per group)
    avg = bits.double().mean().item() * (1 - outliers) + 16 * outliers
    groups_per_token = {"token": 1, "layer": Ly, "head": Ly * h}[level]
    per_token = avg * Ly * (h * d) + 2 * 16 * groups_per_token      # hidden_size = h * d (one KV head per query head)
    return out, bits, per_token * T * b, mask.reshape(b, T, Ly, h, d).permute(2, 0, 3, 1, 4)


def kvlab_booking(bits, mask, level, n_layers, width_field):
    """kvlab's booking (booking="kvlab"), per layer: B per non-outlier value + 32 (+ 8) per group + 48 per
    outlier; at token level a group's 32 (+ 8) is shared evenly between the layers."""
    meta = 32 + (8 if width_field else 0)
    per_layer = []
    for layer in range(n_layers):
        m = mask[layer].permute(0, 2, 1, 3)                           # [b, T, h, d]
        if level == "head":
            bl = bits[:, :, layer]                                    # [b, T, h]
            codes = (bl * (~m).sum(-1)).sum()
            groups = bl.numel()
        elif level == "layer":
            bl = bits[:, :, layer]                                    # [b, T]
            codes = (bl * (~m).flatten(2).sum(-1)).sum()
            groups = bl.numel()
        else:
            codes = (bits * (~m).flatten(2).sum(-1)).sum()
            groups = bits.numel() / n_layers
        per_layer.append(float(codes) + groups * meta + float(m.sum()) * 48)
    return per_layer


def _bits_map(bits, layer, level, h):
    """The authors' bits of one layer as kvlab's info map [b, kv_heads, T]."""
    if level == "head":
        return bits[:, :, layer].transpose(1, 2)
    bl = bits[:, :, layer] if level == "layer" else bits
    return bl[:, None, :].expand(-1, h, -1)


def _stats(att, n_recent):
    """What kvlab's core measures for one layer (MHA): a_max over the last n_recent queries."""
    return AttentionStats(att.sum(2), att[:, :, -n_recent:, :].amax(2), torch.ones(att.shape[:2]), n_recent)


def _case(seed, Ly=2, b=1, h=2, T=24, d=16):
    gen = torch.Generator().manual_seed(seed)
    ks = [torch.randn(b, h, T, d, generator=gen) * (1 + torch.rand(1, 1, T, 1, generator=gen) * 4) for _ in range(Ly)]
    vs = [torch.randn(b, h, T, d, generator=gen) * 0.5 for _ in range(Ly)]
    atts = []
    for _ in range(Ly):
        logits = torch.randn(b, h, T, T, generator=gen) * 5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        atts.append(logits.softmax(-1))
    return ks, vs, atts


CFG = dict(eps_k=1.0, eps_v=3.0, n_min=0, n_max=4, outliers=0.01, n_recent=5)


@pytest.mark.parametrize("level", ["head", "layer", "token"])
@pytest.mark.parametrize("outliers", [0.0, 0.1])
@pytest.mark.parametrize("bit_math", ["fp16", "fp32"])
def test_code_variant_matches_the_authors_rules_on_tensors(level, outliers, bit_math):
    """Bits per group, reconstruction (0-bit groups included) and both bookings, layers of a whole cache."""
    ks, vs, atts = _case(1)
    cfg = {**CFG, "outliers": outliers, "bit_math": bit_math}
    Ly, (b, h, T, d) = len(ks), ks[0].shape
    ctxs = [LayerContext(layer=i, num_layers=Ly, kind="k", attention=_stats(a, cfg["n_recent"]), total_tokens=T)
            for i, a in enumerate(atts)]
    m = QAQ(variant="code", level=level, **cfg)
    assert m.zero_bits == "authors" and m.booking == "kvlab"     # the defaults (bit_math: "fp16")
    qk, qv = m.quantize_cache(ks, vs, ctxs)
    m_auth = QAQ(variant="code", level=level, booking="authors", **cfg)
    ak, av = m_auth.quantize_cache(ks, vs, ctxs)
    seen = set()
    for kind, xs, qs, qa, eps in (("k", ks, qk, ak, cfg["eps_k"]), ("v", vs, qv, av, cfg["eps_v"])):
        ref, bits, booked, mask = authors_quantize(torch.stack(xs), atts, kind, level=level, outliers=outliers,
                                                   last_n=cfg["n_recent"], eps=eps, n_min=0, n_max=4,
                                                   bit_math=bit_math)
        seen |= set(bits.unique().tolist())
        for layer in range(Ly):
            assert torch.equal(qs[layer].info[f"bits_{kind}"], _bits_map(bits, layer, level, h)), (kind, layer)
            torch.testing.assert_close(qs[layer].x, ref[layer], rtol=0, atol=1e-6)
            assert int(qs[layer].info[f"outliers_{kind}"]) == int(mask[layer].sum())
        # kvlab's booking, per layer
        want = kvlab_booking(bits, mask, level, Ly, width_field=True)
        assert [float(q.bits) for q in qs] == pytest.approx(want, rel=1e-6)
        # the authors' booking: the whole cache's bits (their size per token x tokens), split over layers
        assert sum(float(q.bits) for q in qa) == pytest.approx(booked, rel=1e-6)
        assert all(torch.equal(a.x, q.x) for a, q in zip(qa, qs))    # booking changes no value
    assert 4 in seen and 1 in seen
    if bit_math == "fp32":
        assert 0 not in seen                                      # log2(1 + y) > 1e-5 unless y < ~7e-6
    elif level != "token":
        assert 0 in seen                                          # fp16: 1 + y rounds to 1 for y <= 2^-11


def test_zero_bits_reconstruct_mean_minus_half_range():
    """n = 0: quantizer.py:249 clamps every code to 2 ** -1 - 1 = -0.5, so x_hat = mean - R/2 (quantizer.py:244)."""
    x = torch.tensor([0.0, 1.0, 2.0, 5.0, -3.0, 0.5, 0.25, 9.0]).view(1, 1, 1, 8)
    ctx = LayerContext(layer=0, num_layers=1, kind="k", total_tokens=1)
    kw = dict(variant="code", n_min=0, n_max=0, outliers=0.0, n_recent=1, attention_aware=False, q_norm=300.0)
    mu, R = float(x.mean()), float(x.max() - x.min())                 # 1.84375, 12
    got = QAQ(**kw).quantize_cache([x], [x], [ctx])
    want = torch.tensor(mu, dtype=torch.float16).item() - 0.5 * R     # mean stored as fp16, scale R = 12 exact
    for q in got[0] + got[1]:
        assert torch.allclose(q.x, torch.full_like(x, want), rtol=0, atol=1e-6)
        assert float(q.bits) == 32                                    # no code bits, fp16 mean + scale
    old = QAQ(**kw, zero_bits="mean").quantize_cache([x], [x], [ctx])[0][0]
    assert torch.allclose(old.x, torch.full_like(x, torch.tensor(mu, dtype=torch.float16).item()), rtol=0, atol=0)
    # with outliers, the extremes stay and mean / range come from the rest (quantizer.py:217, 253)
    q = QAQ(**{**kw, "outliers": 0.25}).quantize_cache([x], [x], [ctx])[0][0].x.flatten()
    rest = torch.tensor([0.0, 1.0, 2.0, 5.0, 0.5, 0.25])              # k_lo = ceil(1) = 1 -> -3; k_hi = 7 -> 9
    want = torch.tensor(float(rest.mean()), dtype=torch.float16).item() - 0.5 * 5.0
    assert q[4] == -3.0 and q[7] == 9.0
    assert torch.allclose(q[[0, 1, 2, 3, 5, 6]], torch.full((6,), want), rtol=0, atol=1e-6)


def test_zero_bits_matter_only_at_zero_bits_and_only_on_the_code_grid():
    ks, vs, atts = _case(2)
    ctxs = [LayerContext(layer=i, num_layers=2, kind="k", attention=_stats(a, 5), total_tokens=24)
            for i, a in enumerate(atts)]
    for variant, quant, n_min, same in (("code", "uniform", 1, True), ("code", "uniform", 0, False),
                                        ("paper", "uniform", 0, True), ("code", "normal", 0, True)):
        cfg = {**CFG, "n_min": n_min}
        a = QAQ(variant=variant, quant=quant, **cfg).quantize_cache(ks, vs, ctxs)
        m = QAQ(variant=variant, quant=quant, zero_bits="mean", **cfg).quantize_cache(ks, vs, ctxs)
        eq = all(torch.equal(p.x, q.x) for p, q in zip(a[0] + a[1], m[0] + m[1]))
        assert eq == same, (variant, quant, n_min)


def test_the_code_variants_new_defaults_are_always_in_the_spec():
    """Results are stored under spec strings: the code variant's old specs meant zero_bits=mean and
    bit_math=fp32, so the new defaults are spelled out; in the paper variant they change nothing, and its
    per-step rule (whose old specs meant requant=once) is spelled out instead."""
    assert QAQ(variant="code").spec == "qaq:variant=code,bit_math=fp16,zero_bits=authors"
    assert QAQ(variant="code", zero_bits="mean", bit_math="fp32").spec == "qaq:variant=code,bit_math=fp32,zero_bits=mean"
    assert QAQ().spec == "qaq:requant=step" and parse(QAQ(variant="code").spec) == QAQ(variant="code")
    assert QAQ(booking="authors").spec == "qaq:booking=authors,requant=step"


# ---- on a tiny model, through kvlab's prefill-decode protocol --------------------------------------

def _mha_llama():
    """Tiny llama with one KV head per query head (the authors' Llama-2-7B/13B and OPT are MHA); larger
    initial weights than the default 0.02 make attention peaky, so value widths spread over 0 .. n_max."""
    return models.tiny("llama", num_key_value_heads=4, initializer_range=0.3)


@torch.no_grad()
@pytest.mark.parametrize("level", ["head", "layer", "token"])
def test_tiny_model_prefill_decode_matches_the_authors_pipeline(level):
    """evaluator.py:65-81: prefill the prompt, quantize its K/V once (keys and values by their own rules,
    the prompt's attentions for a_max), then score the continuation in one forward against it."""
    P, C = 40, 8
    ids = torch.randint(3, 300, (1, P + C), generator=torch.Generator().manual_seed(3))
    cfg = dict(eps_k=1.0, eps_v=0.3, n_min=0, n_max=6, outliers=0.01, n_recent=5)

    # the authors' pipeline: eager attention to read the probabilities (output_attentions=True)
    ref_lm = _mha_llama()
    ref = ref_lm.model
    ref.set_attn_implementation("eager")
    out = ref(ids[:, :P], past_key_values=DynamicCache(config=ref.config), use_cache=True, output_attentions=True)
    past = out.past_key_values
    atts = [a[:, :, :P, :P] for a in out.attentions]
    keys = torch.stack([layer.keys for layer in past.layers])
    values = torch.stack([layer.values for layer in past.layers])
    rk, bk, booked_k, mk = authors_quantize(keys, atts, "k", level=level, outliers=cfg["outliers"],
                                            last_n=cfg["n_recent"], eps=cfg["eps_k"], n_min=0, n_max=6)
    rv, bv, booked_v, mv = authors_quantize(values, atts, "v", level=level, outliers=cfg["outliers"],
                                            last_n=cfg["n_recent"], eps=cfg["eps_v"], n_min=0, n_max=6)
    for i, layer in enumerate(past.layers):
        layer.keys, layer.values = rk[i].clone(), rv[i].clone()
    want = ref(ids[:, P:], past_key_values=past, use_cache=True).logits

    lm = _mha_llama()
    m = lm.model
    m.set_attn_implementation("eager")                            # the same kernels: the same fp K/V as the reference
    method = QAQ(variant="code", level=level, **cfg)
    with quantize(m, method, protocol="prefill-decode") as run:
        p = m(ids[:, :P], use_cache=True).past_key_values
        got = m(ids[:, P:], past_key_values=p, use_cache=True).logits
        stored = [(layer.keys[..., :P, :].clone(), layer.values[..., :P, :].clone()) for layer in run.cache.layers]
    h = keys.shape[2]
    for i in range(len(stored)):
        for kind, bits, r, (kk, vv) in (("k", bk, rk, stored[i]), ("v", bv, rv, stored[i])):
            assert torch.equal(run.info[i][kind][f"bits_{kind}"], _bits_map(bits, i, level, h)), (level, i, kind)
            torch.testing.assert_close(kk if kind == "k" else vv, r[i], rtol=0, atol=1e-5)
    assert len(bv[:, :-4].unique()) >= 4                         # value widths vary
    if level == "head":
        assert 0 in bv                                            # 0-bit groups are part of the check
    assert (bk[:, -4:] == 6).all() and (bv[:, -4:] == 6).all()     # quantizer.py:193-195
    # the continuation reads the same cache
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # kvlab's booking per layer, re-derived
    for kind, bits, mask in (("k", bk, mk), ("v", bv, mv)):
        want_bits = kvlab_booking(bits, mask, level, 2, width_field=True)
        assert [float(run.ledger.bits[(i, kind)]) for i in range(2)] == pytest.approx(want_bits, rel=1e-6)

    # booking="authors": the ledger holds the authors' whole-cache bits (quantizer.py:275-298)
    with quantize(m, QAQ(variant="code", level=level, booking="authors", **cfg), protocol="prefill-decode") as run:
        p = m(ids[:, :P], use_cache=True).past_key_values
        m(ids[:, P:], past_key_values=p, use_cache=True)
    for kind, booked in (("k", booked_k), ("v", booked_v)):
        assert sum(float(run.ledger.bits[(i, kind)]) for i in range(2)) == pytest.approx(booked, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The paper variant's per-step re-quantization (Sec. 4.2), re-derived in a hand-written decode loop
# ------------------------------------------------------------------------------------------------


def _paper_requantize(x, a_max, q_sq, L, kind, *, level, eps_k, eps_v, n_min, n_max, n_recent):
    """One layer's whole stored region quantized by the paper's rules (Sec. 4.1), from its fp copy x
    [b, h, T, d]: widths clamp(ceil(log2(R / e_max)), n_min, n_max) with e_max = sqrt(12 / ||q||^2 *
    ln(L^3 / (L - 1) eps_k^2 + 1)) (keys) or sqrt(12 / L) eps_v / a_max (values); the last n_recent - 1
    tokens (incomplete window) at n_max; 2^B equal segments of [min, max], values at the segment
    midpoint (min and segment width as stored, fp16). No outliers. Returns (dequantized, widths [b, h, T])."""
    b, h, T, d = x.shape
    g, a, q = x, a_max, q_sq                                     # head level: one group per (token, head)
    if level == "layer":
        g = x.transpose(1, 2).reshape(b, T, h * d)[:, None]      # [b, 1, T, h*d]: one group per token
        a = a_max.amax(1, keepdim=True)
        q = q_sq.amax(1, keepdim=True)
    mn, mx = g.amin(-1), g.amax(-1)
    if kind == "k":
        e = torch.sqrt(12.0 / q[..., None] * math.log(L ** 3 / (L - 1) * eps_k ** 2 + 1))
    else:
        e = math.sqrt(12.0 / L) * eps_v / a.clamp_min(1e-12)
    bits = torch.ceil(torch.log2((mx - mn) / e) - 1e-5).nan_to_num(n_max, n_max, n_min).clamp(n_min, n_max)
    bits[..., T - (n_recent - 1):] = n_max
    lo = mn.half().float()[..., None]
    s = ((mx - mn)[..., None] / 2.0 ** bits[..., None]).half().float().clamp_min(1e-8)
    idx = torch.floor((g - lo) / s).clamp(torch.zeros_like(s), 2.0 ** bits[..., None] - 1)
    xh = lo + (idx + 0.5) * s
    if level == "layer":
        xh = xh[:, 0].reshape(b, T, h, d).transpose(1, 2)
        bits = bits.expand(b, h, T)
    return xh, bits.long()


@torch.no_grad()
@pytest.mark.parametrize("level", ["head", "layer"])
def test_paper_variant_requantizes_every_stored_token_at_every_decode_step(level):
    """Sec. 4.2 in decode: before each call every stored token is quantized again from its fp copy with
    a_max = its largest attention over the last n_recent queries (whichever calls they came in), the
    current L and the largest ||q||^2 so far. The hand loop below keeps the fp copies, the last n_recent
    attention rows and the query norms itself (eager attention probabilities, a hook on q_proj), writes
    the re-quantized region into a plain DynamicCache before each call and must see kvlab's logits, widths
    and bits at every step."""
    P, steps = 12, 10
    cfg = dict(eps_k=1.0, eps_v=0.3, n_min=0, n_max=6, n_recent=4)
    ids = torch.randint(3, 300, (1, P + steps), generator=torch.Generator().manual_seed(5))

    ref = _mha_llama().model
    ref.set_attn_implementation("eager")
    h, d = ref.config.num_key_value_heads, ref.config.hidden_size // ref.config.num_attention_heads
    qn: dict[int, torch.Tensor] = {}

    def q_hook(i):
        def hook(mod, inp, out):                          # ||q|| (RoPE is a rotation: norms unchanged)
            n = out.view(*out.shape[:2], -1, d).norm(dim=-1).amax(1)       # [b, heads]
            qn[i] = n if i not in qn else torch.maximum(qn[i], n)
        return hook

    handles = [layer.self_attn.q_proj.register_forward_hook(q_hook(i)) for i, layer in enumerate(ref.model.layers)]
    cache = DynamicCache(config=ref.config)
    fp: list[list[torch.Tensor]] = []
    rows: list[torch.Tensor] = []
    want_logits, want_bits = [], []
    try:
        for t0, t1 in [(0, P)] + [(t, t + 1) for t in range(P, P + steps)]:
            if t0 > 0:                                    # before the call: re-quantize every stored token
                T = t0
                step_bits = []
                for i, layer in enumerate(cache.layers):
                    a = rows[i].amax(2)
                    k, bk = _paper_requantize(fp[i][0], a, qn[i] ** 2, T, "k", level=level, **cfg)
                    v, bv = _paper_requantize(fp[i][1], a, qn[i] ** 2, T, "v", level=level, **cfg)
                    layer.keys, layer.values = k, v
                    step_bits.append((bk, bv))
                want_bits.append(step_bits)
            out = ref(ids[:, t0:t1], past_key_values=cache, use_cache=True, output_attentions=True)
            want_logits.append(out.logits)
            for i, layer in enumerate(cache.layers):
                new_k, new_v = layer.keys[..., t0:t1, :], layer.values[..., t0:t1, :]
                if i == len(fp):
                    fp.append([new_k.clone(), new_v.clone()])
                    rows.append(out.attentions[i][:, :, -cfg["n_recent"]:, :])
                else:
                    fp[i] = [torch.cat([fp[i][0], new_k], -2), torch.cat([fp[i][1], new_v], -2)]
                    old = torch.nn.functional.pad(rows[i], (0, t1 - t0))
                    rows[i] = torch.cat([old, out.attentions[i]], 2)[:, :, -cfg["n_recent"]:, :]
    finally:
        for hd in handles:
            hd.remove()

    m = _mha_llama().model
    m.set_attn_implementation("eager")
    got_logits, got_bits, got_step = [], [], []
    with quantize(m, QAQ(level=level, outliers=0.0, **cfg), protocol="decode") as run:
        out = m(ids[:, :P], use_cache=True)
        past = out.past_key_values
        got_logits.append(out.logits)
        for t in range(P, P + steps):
            out = m(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            got_logits.append(out.logits)
            got_bits.append([(run.info[i]["k"]["bits_k"].clone(), run.info[i]["v"]["bits_v"].clone())
                             for i in range(len(run.cache.layers))])
        record = run.step_bits()
    for step, (want, got) in enumerate(zip(want_bits, got_bits)):
        for i, ((wk, wv), (gk, gv)) in enumerate(zip(want, got)):
            assert torch.equal(gk, wk) and torch.equal(gv, wv), (level, step, i)
    torch.testing.assert_close(torch.cat(got_logits, 1), torch.cat(want_logits, 1), rtol=0, atol=1e-5)
    # the bits each step read: the whole region at its current widths (32 + 8 metadata bits per group)
    for step, want in enumerate(want_bits):
        total = sum(float(((bk + bv) * d).sum()) for bk, bv in want)       # layer level: maps repeat B per head
        groups = sum(bk.numel() if level == "head" else bk.numel() // h for bk, _ in want) * 2
        elems = sum(bk.numel() * d for bk, _ in want) * 2
        assert record["avg_bits"][step] == pytest.approx((total + groups * 40) / elems, rel=1e-6), step
    # the rule matters: widths of earlier decoded tokens move, and `once` leaves them at n_max
    last_v = want_bits[-1][0][1][0]
    assert (last_v[..., P:P + steps - cfg["n_recent"]] < cfg["n_max"]).any()
    with quantize(m, QAQ(level=level, outliers=0.0, requant="once", **cfg), protocol="decode") as run:
        past = m(ids[:, :P], use_cache=True).past_key_values
        for t in range(P, P + steps):
            past = m(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
        assert not run.method.rewrites_stored
        assert (run.info[0]["v"]["bits_v"] == cfg["n_max"]).all()     # the latest flush: one token, in its window


def test_requant_names_the_rule_and_refuses_whole_cache_variants():
    assert QAQ().requant == "step" and QAQ().rewrites_stored and "requant=step" in QAQ().spec
    assert parse("qaq:requant=once").spec == "qaq:requant=once" and not parse("qaq:requant=once").rewrites_stored
    assert QAQ(variant="code").requant is None and "requant" not in parse("qaq-code").spec
    assert QAQ(level="token").requant is None
    for bad in ("qaq:variant=code,requant=step", "qaq:level=token,requant=step", "qaq:requant=always"):
        with pytest.raises(Exception, match="requant"):
            parse(bad)
