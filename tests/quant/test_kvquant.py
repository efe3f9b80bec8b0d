"""kvlab.quant.methods.kvquant: KVQuant (Hooper et al., NeurIPS 2024; github.com/SqueezeAILab/KVQuant)."""
from __future__ import annotations

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant import parse
from kvlab.quant.methods import kvquant as _kvquant  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.kvquant import KVQuant

from quant_helpers import layer_ctx as ctx, rel_err


def heavy(shape, seed):
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    scale = 1 + torch.arange(shape[-1], dtype=torch.float32) * 0.05      # channel-dependent ranges
    return t.sample(shape) * scale


SHAPE = (4, 2, 128, 32)


@pytest.fixture(scope="module")
def data():
    ktr, vtr, kte, vte = (heavy(SHAPE, s) for s in range(4))
    g = torch.Generator().manual_seed(9)
    gk, gv = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    return ktr, vtr, kte, vte, gk, gv


def calibrated(spec, data):
    ktr, vtr, _, _, gk, gv = data
    m = parse(spec)
    return m.with_state(m.fit_tensors([ktr], [vtr], [gk], [gv]))


def errors(m, data):
    _, _, kte, vte, _, _ = data
    return (rel_err(m.quantize(kte, ctx("k", start=1)).x, kte),
            rel_err(m.quantize(vte, ctx("v", start=1)).x, vte))


@pytest.mark.parametrize("bits,bound_k,bound_v", [(2, 0.5, 0.6), (3, 0.7, 0.97)])
def test_kvquant_nuq_beats_int_on_heavy_tails(bits, bound_k, bound_v, data):
    e_int = errors(calibrated(f"kvquant:bits={bits},nuq=false", data), data)
    # plain k-means: this fixture's gradients are random (no information), so the datatype alone is compared
    e_nuq = errors(calibrated(f"kvquant:bits={bits},fisher=none", data), data)
    # measured ratios nuq/int: keys 0.42 (2 bits), 0.66 (3 bits); values 0.53, 0.94. The 3-bit value margin
    # is thin (3%) but the inputs are seeded samples (no matmul) and k-means on them, so another CPU changes
    # these ratios by ~1e-6 relative, not by percents. They are specific to this sample (other seeds give
    # value ratios above 1): change the data and these bounds must be re-measured.
    assert e_nuq[0] < bound_k * e_int[0] and e_nuq[1] < bound_v * e_int[1]


@pytest.mark.parametrize("bits", [2, 3])
def test_kvquant_one_percent_outliers_reduce_error(bits, data):
    e0 = errors(calibrated(f"kvquant-nuq{bits}", data), data)
    e1 = errors(calibrated(f"kvquant-nuq{bits}-1%", data), data)
    # measured ratios: keys 0.19 / 0.15, values 0.36 / 0.30 (2 / 3 bits): >= 2.2x below the bounds
    assert e1[0] < 0.5 * e0[0] and e1[1] < 0.8 * e0[1]


def test_kvquant_outliers_are_exact_and_counted(data):
    m = calibrated("kvquant:bits=2,outliers=0.02", data)
    _, _, kte, vte, _, _ = data
    q = m.quantize(vte, ctx("v", start=1))
    # per token over 2 heads x 32 dims = 64 values: ceil(0.01 * 64) = 1 smallest + 1 largest kept
    v_tok = vte.transpose(1, 2).reshape(4, 128, 64)
    q_tok = q.x.transpose(1, 2).reshape(4, 128, 64)
    idx_max = v_tok.argmax(-1, keepdim=True)
    assert torch.equal(q_tok.gather(-1, idx_max), v_tok.gather(-1, idx_max).half().float())
    # bits: codes 2 * 32768 + 512 tokens * (offset, scale) 32 + 1024 outliers * 48
    #       + the 4-entry fp16 codebook, since start=1 <= sink=1 makes this the layer's first chunk
    n_tok = 4 * 128
    expected = 2 * vte.numel() + n_tok * 32 + 2 * n_tok * 48 + 4 * 16
    assert q.bits.item() == expected


def test_kvquant_bits_by_hand():
    # kvquant nuq3, no outliers, keys [1, 2 heads, 10 tokens, 64 dims], calibrated per-channel ranges:
    #   first chunk (start <= sink=1): codes 3 * 1280 = 3840 + thresholds 2 * 16 * (2*64) = 4096
    #                                  + codebook 8 * 16 = 128                      -> 8064
    #   later chunks: codes only                                                     -> 3840
    # values (per token over both heads, 10 tokens): codes 3840 + 10 * 32 = 320 (+128 first chunk)
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    m = KVQuant(bits=3, fisher=False)
    m = m.with_state(m.fit_tensors([k], [v]))
    x = torch.randn(1, 2, 10, 64)
    assert m.quantize(x, ctx("k", start=1)).bits.item() == 8064
    assert m.quantize(x, ctx("k", start=11)).bits.item() == 3840
    assert m.quantize(x, ctx("v", start=1)).bits.item() == 3840 + 320 + 128
    assert m.quantize(x, ctx("v", start=11)).bits.item() == 3840 + 320


def test_kvquant_qnorm_matches_moments(data):
    ktr, vtr, _, _, _, _ = data
    for spec in ("kvquant:bits=2,fisher=false", "kvquant:bits=2,fisher=false,qnorm=true"):
        m = calibrated(spec, data)
        ratios = []
        for kind, x in (("k", ktr), ("v", vtr)):
            lo = hi = None
            if kind == "k":
                lo, hi = m.state["k_lo"][0][None, :, None, :], m.state["k_hi"][0][None, :, None, :]
            off, scl, _, _ = m._normalise(x, kind, lo, hi)
            z = (x - off) / scl
            zh = (m.quantize(x, ctx(kind, start=1)).x - off) / scl
            ratios.append((zh.std() / z.std()).item())
            if "qnorm" in spec:
                assert abs(zh.mean().item() - z.mean().item()) < 5e-3
        # measured: |r - 1| <= 3.5e-4 with Q-Norm (its fp16 a, c: 2^-11 relative; fitted without the sink
        # token, measured here with it), |mean shift| <= 8.7e-5; r = 0.945 / 0.944 without (a property of
        # k-means on this seeded, matmul-free data)
        if "qnorm" in spec:
            assert all(abs(r - 1) < 5e-3 for r in ratios), ratios
        else:
            assert all(r < 0.97 for r in ratios), ratios       # plain k-means shrinks the spread


def test_kvquant_fisher_weights_move_the_codebook(data):
    ktr, vtr, _, _, _, _ = data
    plain = KVQuant(bits=2, fisher=False).fit_tensors([ktr], [vtr])
    # sensitivity concentrated on the large values pulls the outer centroids outwards
    gk, gv = (torch.where(x.abs() > 3, 10.0, 0.1) for x in (ktr, vtr))
    weighted = KVQuant(bits=2, fisher="activation").fit_tensors([ktr], [vtr], [gk], [gv])
    for name in ("k_cb", "v_cb"):
        assert weighted[name][0].abs().max() > plain[name][0].abs().max()
    with pytest.raises(KVLabError, match="fisher"):
        KVQuant(bits=2).fit_tensors([ktr], [vtr])


def test_kvquant_needs_calibration_and_says_so():
    m = parse("kvquant-nuq4")
    assert m.needs_calibration and m.key_site == "pre_rope" and m.sink_tokens == 1 and m.token_group == 1
    with pytest.raises(KVLabError, match="calibrate"):
        m.quantize(torch.randn(1, 1, 4, 8), ctx("k"))
    online = parse("kvquant:bits=4,nuq=false,k_scale=online,group=16")
    assert not online.needs_calibration and online.token_group == 16
    x = torch.randn(1, 2, 32, 16)
    q = online.quantize(x, ctx("k", start=1))
    # per channel over groups of 16 tokens: codes 4 * 1024 + (2 heads * 16 ch * 2 groups) * 32; no codebook
    assert q.bits.item() == 4 * 1024 + 64 * 32
    assert rel_err(q.x, x) < 0.02                                # measured 0.0042


def test_kvquant_presets_and_spec_roundtrip():
    # `fisher` (and, for k-means codebooks, `kmeans_impl`) are always spelled out: their defaults changed,
    # and old results are keyed by the old specs
    assert parse("kvquant-nuq3-1%").spec == "kvquant:bits=3,fisher=activation,outliers=0.01,kmeans_impl=sklearn,kmeans_points=None"
    assert parse("kvquant-int2").spec == "kvquant:bits=2,nuq=false,fisher=activation"
    assert parse("kvquant:bits=3,outliers=0.01").spec != "kvquant:bits=3,outliers=0.01"
    assert parse("kvquant-nuq4") == KVQuant(bits=4)
    for b in (2, 3, 4):
        for name in (f"kvquant-nuq{b}", f"kvquant-nuq{b}-1%", f"kvquant-int{b}"):
            m = parse(name)
            assert m.bits == b and parse(m.spec) == m
    m = parse("kvquant:bits=3,qnorm=true,sink=4,k_scale=online,group=32,fisher=false")
    assert parse(m.spec) == m and m.sink_tokens == 4


@pytest.mark.parametrize("spec,field", [
    ("kvquant:bits=0", "bits"), ("kvquant:bits=9", "bits"), ("kvquant:outliers=1.0", "outliers"),
    ("kvquant:outliers=-0.1", "outliers"), ("kvquant:k_scale=dynamic", "k_scale"),
    ("kvquant:group=32", "group"), ("kvquant:k_scale=online,group=0", "group"), ("kvquant:sink=-1", "sink"),
])
def test_kvquant_invalid_configs_name_the_field(spec, field):
    with pytest.raises(KVLabError, match=f"'{field}'"):
        parse(spec)


# ======================================================================================== kvlab.calibrate
def _fisher_reference(model, ids):
    """Independent re-derivation of KVQuant's calibration capture: per row, pre-RoPE K and V and the
    gradients of the row's summed next-token cross-entropy, with the parameters as the autograd leaves
    (as the authors' code does it), not the input embeddings kvlab uses."""
    from kvlab.hooks import capture

    ks, vs, gks, gvs = [], [], [], []
    for row in ids:
        x = row[None]
        with torch.enable_grad(), capture(model, what=("k_pre", "v"), retain_grad=True) as cap:
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum")
            kl, vl = cap["k_pre"], cap["v"]
            gs = torch.autograd.grad(loss, kl + vl)
        ks.append(kl), vs.append(vl), gks.append(gs[:len(kl)]), gvs.append(gs[len(kl):])
    cat = lambda rows: [torch.cat([r[l].detach() for r in rows]) for l in range(len(rows[0]))]   # noqa: E731
    return cat(ks), cat(vs), cat(gks), cat(gvs)


@pytest.mark.parametrize("spec", ["kvquant:bits=3", "kvquant:bits=2,fisher=false,outliers=0.05,qnorm=true"])
def test_kvquant_calibrate_on_tiny_model(spec, tmp_path, monkeypatch):
    import kvlab
    from kvlab.calibration import calibrate

    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    lm = kvlab.tiny("llama")
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    params = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    m = calibrate(lm, spec, ids=ids)
    assert m.spec == parse(spec).spec and m.state is not None and parse(spec).state is None
    cal = m.state
    L, H, D = lm.config.num_hidden_layers, lm.config.num_key_value_heads, lm.config.head_dim
    assert cal["k_cb"].shape == (L, 2 ** m.bits) and cal["v_cb"].shape == (L, 2 ** m.bits)
    assert cal["k_lo"].shape == (L, H, D) and (cal["k_lo"] <= cal["k_hi"]).all()
    assert torch.isfinite(cal["k_cb"]).all() and (cal["k_cb"].diff(dim=-1) >= 0).all()
    # the model is untouched (no parameter gradients left behind, same weights, same flags)
    for n, p in lm.model.named_parameters():
        assert p.grad is None and torch.equal(p, params[n]) and p.requires_grad
    # the fit equals one from an independent capture (parameters as leaves, per-row summed loss);
    # exact: the same forward and backward kernels run on the same inputs
    k, v, gk, gv = _fisher_reference(lm.model, ids)
    want = parse(spec).fit_tensors(k, v, gk if m.uses_fisher else None, gv if m.uses_fisher else None)
    assert cal.keys() == want.keys() and all(torch.equal(cal[n], want[n]) for n in want)
    # cached: a second calibration reads the file instead of running the model
    files = list((tmp_path / "calibration").glob("*.pt"))
    assert len(files) == 1
    monkeypatch.setattr("kvlab.calibration.capture_for", lambda *a: pytest.fail("recomputed"))
    m2 = calibrate(lm, spec, ids=ids)
    assert all(torch.equal(m2.state[n], cal[n]) for n in cal)   # exact: the stored tensors, read back
    # and quantizing the calibration keys works with the learned tables
    from kvlab.hooks import capture
    with torch.no_grad(), capture(lm.model, what=("k_pre", "v"), max_tokens=None) as cap:
        lm.model(ids[:1])
    k0 = cap["k_pre"][0]
    q = m.quantize(k0, ctx("k", start=1, num_layers=L))
    assert q.x.shape == k0.shape and rel_err(q.x, k0) < 0.3     # measured 0.037 / 0.072
