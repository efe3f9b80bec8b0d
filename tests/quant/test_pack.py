"""kvlab.pack: packed storage rebuilds each method's dequantized tensor bit for bit, and its bytes are the
accounted bits (`Quantized.bits / 8`), or differ exactly where the method reconstructs from numbers wider
than the fp16 the accounting books."""
from __future__ import annotations

import math

import pytest
import torch

import kvlab

from kvlab import pack as P
from kvlab.core.cache import PackedStore
from kvlab.errors import KVLabError
from kvlab.quant import AttentionStats, LayerContext, parse
from kvlab.quant.base import Captured
from kvlab.quant.packing import pack_bits, stream_bytes, unpack_bits

# the realistic shape: 3 KV heads, 512 tokens, head_dim 64, random normal with large outlier channels
SHAPE = (1, 3, 512, 64)

LAYER_SPECS = [
    "int:bits=4", "int:bits=2", "int:bits=3,k_axis=channel,group=128", "int:bits=4,symmetric=true,group=32",
    "kivi:bits=2", "kivi:bits=4", "kivi:bits=3,group=128",
    "kvquant:bits=3,k_scale=online,nuq=false", "kvquant:bits=2,k_scale=online,group=32,nf=true,outliers=0.01",
    "qaq", "qaq-low", "qaq:quant=normal,n_min=0,eps_v=2.0", "qaq:attention_aware=false,q_norm=50.0,n_min=4,n_max=4",
    "pmkvq:allocation=uniform,reparam=none,budget=2", "pmkvq:allocation=uniform,reparam=none,budget=4",
    "pmkvq:allocation=uniform,reparam=none,budget=8",
    "quarot:bits=2", "quarot:bits=4", "quarot:bits=3,asym=false,group=32",
]
CALIBRATED = ["kvquant:bits=3", "kvquant:bits=2,outliers=0.01", "kvquant:bits=4,outliers=0.01,qnorm=true",
              "kvquant:bits=3,outliers=0.02,cap_outliers=true", "kvquant:bits=2,nuq=false,outliers=0.01",
              "pmkvq:allocation=uniform,reparam=fixed,budget=4"]
QHITTER = ["qhitter:eviction=once", "qhitter:eviction=once,zero=exact", "qhitter:eviction=once,bits=2,group=32"]


def realistic(dtype=torch.float32, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] = x[..., 3] * 15 + 4          # a few large outlier channels (as keys have)
    x[..., shape[-1] * 5 // 8] = x[..., shape[-1] * 5 // 8] * 8 - 6
    return x.to(dtype)


def attention(shape=SHAPE, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, h, t, _ = shape
    return AttentionStats(torch.rand(b, h, t, generator=g) * 5, torch.rand(b, h, t, generator=g) * 0.3,
                          torch.rand(b, h, generator=g) * 20 + 1, n_recent=5)


def ctx(kind, shape=SHAPE, layer=0, num_layers=1, start=0, previous=None):
    return LayerContext(layer=layer, num_layers=num_layers, kind=kind, start=start, attention=attention(shape),
                        total_tokens=start + shape[2], previous=previous)


def _fit(spec: str):
    """A method fitted on random calibration tensors of the realistic shape (no model: kvlab's fit code)."""
    m = parse(spec)
    g = torch.Generator().manual_seed(7)
    ks = [realistic(seed=10 + l, shape=(2, 3, 256, 64)) for l in range(2)]
    vs = [torch.randn(2, 3, 256, 64, generator=g) for _ in range(2)]
    if isinstance(m, P.KVQuant):
        grads = [torch.randn(2, 3, 256, 64, generator=g) for _ in range(2)] if m.uses_fisher else None
        return m.with_state(m.fit_tensors(ks, vs, grads, grads))
    return m.with_state(m.fit(Captured({"k": ks, "v": vs})))


def _method(spec: str):
    return _fit(spec) if spec in CALIBRATED else parse(spec)


def _quantized(m, x, c):
    """(Quantized, keep) of the method for x: quantize, or Q-Hitter's whole-cache rule on (x, x / 2)."""
    if isinstance(m, P.QHitter):
        qk, qv = m.quantize_cache([x], [x * 0.5], [c])
        return qk[0], qk[0].keep
    return m.quantize(x, c), None


def _check_exact(m, x, c):
    q, keep = _quantized(m, x, c)
    p = P.pack(m, x, c, keep=keep)
    y = P.unpack(p)
    assert y.dtype == q.x.dtype and y.shape == q.x.shape
    if keep is None:
        assert torch.equal(y, q.x), f"{m.spec} {c.kind}: unpack differs from quantize"
    else:
        assert torch.equal(y[keep], q.x[keep]) and bool((y[~keep] == 0).all())
    return p, q


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", LAYER_SPECS + CALIBRATED + QHITTER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpack_equals_quantize(spec, dtype):
    m = _method(spec)
    x = realistic(dtype)
    layer = 1 if spec in CALIBRATED else 0
    for kind in "kv":
        for start in (0, 7):
            _check_exact(m, x, ctx(kind, layer=layer, num_layers=2, start=start))


def test_unpack_ragged_groups_and_history():
    """KIVI and per-channel int with a ragged last token group; PM-KVQ with its fp window (history)."""
    x = realistic(shape=(2, 2, 77, 16))
    for spec in ("kivi:bits=2,group=16,residual=32", "int:bits=3,k_axis=channel,v_axis=channel,group=32",
                 "kvquant:bits=4,k_scale=online,group=10,nuq=false,outliers=0.05"):
        for kind in "kv":
            _check_exact(parse(spec), x, ctx(kind, shape=x.shape))
    m = parse("pmkvq:allocation=uniform,reparam=none,budget=4,max_tokens=100,residual=32")
    for previous in ({}, {"bits": 8}, {"bits": 16}):
        for kind in "kv":
            p, _ = _check_exact(m, x, ctx(kind, shape=x.shape, start=1, previous=previous))
            assert p.layout["window"] == 77 % 32


@pytest.mark.parametrize("spec", ["int:bits=4", "kivi:bits=2", "qaq", "quarot:bits=4",
                                  "kvquant:bits=2,k_scale=online,group=32,nf=true,outliers=0.01"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_beyond_fp16_range_stored_saturated(spec, dtype):
    """An fp32/bf16 model with values beyond fp16's 65504 (1e5): the fp16 fields are stored as the method
    rounds them (`primitives._fp16`, saturating at +-65504), so unpack still equals quantize and nothing
    stored is inf (KVQuant's fp16 outliers used to be stored as inf)."""
    x = realistic(dtype, shape=(1, 3, 64, 64)).clone()
    x[0, 0, 5, 3], x[0, 1, 9, 7], x[0, 2, 11, 40] = 1e5, -1e5, 7e4
    m = parse(spec)
    for kind in "kv":
        p, q = _check_exact(m, x, ctx(kind, shape=x.shape))
        assert torch.isfinite(q.x).all()
        for name, t in {**p.data, **p.tables}.items():
            assert not (t.is_floating_point() and bool(t.isinf().any())), f"{spec} {kind}: {name} holds inf"


def test_kvquant_calibrated_on_tiny_model(tmp_path, monkeypatch):
    import kvlab
    from kvlab.hooks import capture

    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    lm = kvlab.tiny("llama")
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    L = lm.config.num_hidden_layers
    with torch.no_grad(), capture(lm.model, what=("k_pre", "v"), max_tokens=None) as cap:
        lm.model(ids[:1])
    for spec in ("kvquant:bits=3", "kvquant:bits=2,fisher=false,outliers=0.05,qnorm=true"):
        m = kvlab.calibrate(lm, spec, ids=ids)
        for layer in range(L):
            for kind, x in (("k", cap["k_pre"][layer]), ("v", cap["v"][layer])):
                for start in (0, 1, 5):       # the layer's first chunk carries the codebook and thresholds
                    c = LayerContext(layer=layer, num_layers=L, kind=kind, start=start)
                    p, q = _check_exact(m, x, c)
                    assert p.tables_counted == (start <= m.sink_tokens)
                    assert p.nbytes * 8 == pytest.approx(float(q.bits), abs=8 * len(p.data))


# --------------------------------------------------------------------------------------------------
def _table(rows) -> str:
    lines = [f"{'method':58s} {'kind':4s} {'measured B':>11s} {'accounted B':>12s} {'diff':>8s}"]
    lines += [f"{s:58s} {k:4s} {m:11d} {a:12.1f} {m / a - 1:+8.2%}" for s, k, m, a in rows]
    return "\n".join(lines)


def measured_vs_accounted(dtype, specs=LAYER_SPECS + CALIBRATED + QHITTER):
    rows = []
    x = realistic(dtype)
    for spec in specs:
        m = _method(spec)
        for kind in "kv":
            c = ctx(kind, layer=1 if spec in CALIBRATED else 0, num_layers=2)
            q, keep = _quantized(m, x, c)
            rows.append((spec, kind, P.measured_bytes(m, x, c, keep=keep), float(q.bits) / 8))
    return rows


def test_measured_bytes_within_5_percent_of_accounted():
    """In the cache's 16-bit dtype every method's packed bytes are its accounted bits / 8 (within 5%)."""
    rows = measured_vs_accounted(torch.float16)
    bad = [r for r in rows if abs(r[2] / r[3] - 1) > 0.05]
    assert not bad, "measured vs accounted bytes, [1, 3, 512, 64] fp16:\n" + _table(rows)


def test_measured_bytes_in_fp32_differ_only_where_explained():
    """fp32 input: QAQ keeps its outliers at fp32 (booked as fp16: +2 bytes each) and Q-Hitter's rounded-zero
    quantizer dequantizes with an fp32 scale (+2 bytes per group) and an integer zero point (b bits, not 16);
    every other method's bytes equal its accounted bits / 8 up to the last partial byte of each stream."""
    x = realistic()
    rows, bad = [], []
    for spec in LAYER_SPECS + CALIBRATED + QHITTER:
        m = _method(spec)
        for kind in "kv":
            c = ctx(kind, layer=1 if spec in CALIBRATED else 0, num_layers=2)
            q, keep = _quantized(m, x, c)
            p = P.pack(m, x, c, keep=keep)
            acc = float(q.bits) / 8
            extra = 0.0
            if isinstance(m, P.QAQ) and "outlier_value" in p.data:
                extra = 2 * p.data["outlier_value"].numel()
            if isinstance(m, P.QHitter) and m.zero == "rounded":
                groups = p.data["scale"].numel()
                extra = groups * (2 + m.bits / 8 - 2)
            rows.append((spec, kind, p.nbytes, acc))
            if abs(p.nbytes - acc - extra) >= len(p.data) + 1:
                bad.append((spec, kind, p.nbytes, acc + extra))
    assert not bad, "unexplained differences, [1, 3, 512, 64] fp32:\n" + _table(bad) + "\n\nall:\n" + _table(rows)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 13, 64, 1001])
def test_pack_bits_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    for word in (torch.uint8, torch.int32):
        w = pack_bits(codes, bits, word)
        assert w.dtype == word and w.nbytes == stream_bytes(n, bits, word)
        assert w.nbytes == math.ceil(n * bits / (8 * w.element_size())) * w.element_size()
        assert torch.equal(unpack_bits(w, bits, n).long(), codes)
    # the extremes round-trip too, in any shape
    ext = torch.tensor([[0, (1 << bits) - 1, 0], [(1 << bits) - 1, 1 % (1 << bits), 0]])
    assert torch.equal(unpack_bits(pack_bits(ext, bits), bits, ext.numel()).view(ext.shape).long(), ext)


def test_pack_bits_rejects_codes_out_of_range():
    with pytest.raises(KVLabError, match="2-bit"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(KVLabError, match="bits must be"):
        pack_bits(torch.tensor([0]), 17)


def test_method_without_packing_raises_naming_it():
    x = realistic(shape=(1, 2, 8, 16))
    for spec, name in (("h2o", "h2o"), ("fp16", "fp16")):
        with pytest.raises(KVLabError, match=f"method '{name}'.*no packed storage"):
            P.pack(spec, x, ctx("k", shape=x.shape))
    with pytest.raises(KVLabError, match="scope 'cache'"):
        P.pack("qaq-code", x, ctx("k", shape=x.shape))
    with pytest.raises(KVLabError, match="evicts nothing"):
        P.pack("int4", x, ctx("k", shape=x.shape), keep=torch.ones(1, 2, 8, dtype=torch.bool))
    assert {"int", "kivi", "kvquant", "qaq", "pmkvq", "qhitter", "quarot"} <= set(P.supported())


# -- run.summary(): measured beside accounted, through the session ---------------------------------------

@pytest.mark.parametrize("spec,protocol", [("int:bits=4", "fake"), ("kivi:bits=2,group=16,residual=32", "prefill-decode"),
                                           ("kivi:bits=2,group=16,residual=32", "decode"), ("quarot-2", "decode"),
                                           ("pmkvq:allocation=uniform,budget=3.0,max_tokens=64,residual=16,reparam=none",
                                            "decode")])
def test_summary_reports_measured_bytes_beside_the_accounted(spec, protocol):
    """quantize(..., measure_bytes=True): every stored span is packed; the sum of the packed tensors' bytes
    (plus 2 bytes per fp16 sink / window element) is within 5% of the accounted bits / 8. The model is
    bf16: the accounting books full-precision tokens at 16 bits, and PM-KVQ keeps its authors' window
    itself, in the model's dtype (4 bytes an element in an fp32 model; test_pack's fp32 cases state it)."""
    from kvlab.hooks import quantize

    m = kvlab.tiny("llama").model.to(torch.bfloat16)
    ids = torch.randint(3, 300, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), quantize(m, spec, protocol=protocol, measure_bytes=True) as run:
        if protocol == "fake":
            m(ids)
        else:
            past = m(ids[:, :48]).past_key_values
            for t in range(48, 96):
                past = m(ids[:, t:t + 1], past_key_values=past).past_key_values
    s = run.summary()
    assert s["packed_bytes_measured"] == pytest.approx(s["packed_bytes"], rel=0.05), s
    with quantize(m, spec, protocol=protocol) as plain:
        m(ids[:, :8])
    assert math.isnan(plain.summary()["packed_bytes_measured"])       # not measured unless asked


def test_measure_bytes_refuses_methods_without_packed_storage():
    from kvlab.hooks import quantize

    m = kvlab.tiny("llama").model
    for spec in ("h2o", "fp16"):
        with pytest.raises(KVLabError, match="measure_bytes|packed storage"):
            with quantize(m, spec, protocol="prefill-decode", measure_bytes=True):
                pass


def test_unpack_bits_of_many_streams_at_once_equals_each():
    g = torch.Generator().manual_seed(3)
    for bits in (1, 2, 3, 5, 8):
        codes = torch.randint(0, 1 << bits, (6, 37), generator=g)
        words = torch.stack([pack_bits(c, bits) for c in codes])
        assert torch.equal(unpack_bits(words, bits, 37), codes.to(torch.int32))


@pytest.mark.parametrize("spec", ["int:bits=3", "int:bits=2,k_axis=channel,group=8", "kivi:bits=2,group=16",
                                  "kvquant:bits=2,k_scale=online,group=4,nf=true,outliers=0.05",
                                  "kvquant:bits=3,outliers=0.05"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_unpack_chunks_batches_like_chunks_bit_for_bit(spec, kind):
    """A decode cache holds one chunk per flushed token (or group): `unpack_chunks` dequantizes runs of chunks
    with one signature in one vectorized call. The result is each chunk's own `unpack`, concatenated along
    the tokens, bit for bit, for runs of 1-token chunks, multi-token chunks and a mix (runs break where the
    shape changes); outlier counts differ from chunk to chunk."""
    shape = (2, 3, 40, 64)
    m = _fit(spec) if "outliers=0.05" in spec and "online" not in spec else parse(spec)
    x = realistic(shape=shape, seed=5)
    cuts = [0] + list(range(1, 9)) + [12, 16, 20, 24, 25, 26, 40]     # 1-token chunks, then 4-token, then mixed
    store = PackedStore()                # as a packed cache holds them: equal per-layer tables shared
    for s, e in zip(cuts, cuts[1:]):
        store.add(kind, P.pack(m, x[..., s:e, :], ctx(kind, shape=(2, 3, e - s, 64), start=s)), s, e)
    packeds = [c.packed for c in store.chunks[kind]]
    runs = P.unpack_chunks(packeds)
    assert [(i, j) for i, j, _ in runs][0] == (0, 8) and any(j - i > 1 for i, j, _ in runs[1:])
    assert sum(j - i for i, j, _ in runs) == len(packeds)
    got = torch.cat([t for _, _, t in runs], dim=-2)
    want = torch.cat([p.unpack() for p in packeds], dim=-2)
    assert torch.equal(got, want)
