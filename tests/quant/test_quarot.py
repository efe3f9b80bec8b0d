"""kvlab.quant.methods.quarot: QuaRot's Hadamard-rotated KV cache (Ashkboos et al. 2024; github.com/spcl/QuaRot),
and the Hadamard matrices of kvlab.quant.primitives."""
from __future__ import annotations

import math

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant import parse
from kvlab.quant import primitives as P
from kvlab.quant.methods import quarot as _quarot  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods.quarot import QuaRot

from quant_helpers import layer_ctx as ctx


# ------------------------------------------------------------------------------------ independent references
def walsh(n: int) -> torch.Tensor:
    """Normalised Walsh-Hadamard matrix from the closed form H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    parity = torch.zeros(n, n, dtype=torch.long)
    a = i & j
    while bool(a.any()):
        parity ^= a & 1
        a = a >> 1
    return (1.0 - 2.0 * parity.double()) / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard transform of the last axis (butterflies, unnormalised), what QuaRot's CUDA
    `hadamard_transform` computes."""
    y = x.clone()
    n = y.shape[-1]
    h = 1
    while h < n:
        y = y.view(*x.shape[:-1], n // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2)
        y = y.reshape(*x.shape)
        h *= 2
    return y


def reference_quarot(x, kind, *, bits, group=None, asym=True, clip=0.95, rotate=True):
    """QuaRot re-derived one group at a time: rotate, min-max RTN with clipping and an integer zero point
    (the key path's range also holds 0), rotate back."""
    d = x.shape[-1]
    g = group or d
    h = walsh(d).float()
    t = x.float() @ h if rotate else x.float()
    rows = t.reshape(-1, g)
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        v = rows[r]
        mx, mn = v.max(), v.min()
        if kind == "k" and g == d:
            mx, mn = torch.clamp(mx, min=0.0), torch.clamp(mn, max=0.0)
        mx, mn = mx * clip, mn * clip
        if asym:
            top = 2 ** bits - 1
            s = ((mx - mn) / top).half().float().clamp_min(1e-8)
            z = torch.round(-mn / s)
            out[r] = s * (torch.clamp(torch.round(v / s) + z, 0, top) - z)
        else:
            top = 2 ** (bits - 1) - 1
            s = (torch.maximum(mn.abs(), mx) / top).half().float().clamp_min(1e-8)
            out[r] = s * torch.clamp(torch.round(v / s), -top - 1, top)
    out = out.reshape(t.shape)
    return (out @ h.T if rotate else out).to(x.dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------ Hadamard matrices
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_walsh_hadamard_is_orthogonal_and_the_closed_form(n):
    h = P.hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # exact: both are +-1 times the same 1/sqrt(n) in float64
    assert torch.equal(h, walsh(n))
    # and it is the matrix the fast transform applies (QuaRot's online key rotation)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(x @ h, fwht(x) / math.sqrt(n), atol=1e-12)


@pytest.mark.parametrize("n", [12, 20, 24, 28, 36, 40, 48, 80, 96, 112, 160, 192])
def test_non_power_of_two_orders_are_hadamard(n):
    h = P.hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64), atol=0)


@pytest.mark.parametrize("n", [3, 6, 10, 52, 0])
def test_orders_without_a_construction_are_refused(n):
    with pytest.raises(KVLabError, match="hadamard_matrix"):
        P.hadamard_matrix(n)


def test_hadamard_matrix_is_cached_per_size_device_and_dtype():
    a = P.hadamard_matrix(64)
    assert P.hadamard_matrix(64) is a and a.dtype == torch.float32
    assert P.hadamard_matrix(64, "cpu", torch.float32) is a
    b = P.hadamard_matrix(64, dtype=torch.float64)
    assert b is not a and b.dtype == torch.float64
    with torch.inference_mode():
        c = P.hadamard_matrix(32)
    assert not c.is_inference()          # made outside inference mode: usable anywhere


# ------------------------------------------------------------------------------------ the method
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("cfg", [
    dict(bits=2), dict(bits=4), dict(bits=3, clip=1.0), dict(bits=2, group=16), dict(bits=4, asym=False),
    dict(bits=2, rotate=False), dict(bits=1),
])
def test_method_equals_the_reference(kind, cfg):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 64) * torch.linspace(0.2, 3.0, 64)
    x[..., 7] += 6.0                                         # an offset channel: ranges are not symmetric
    fields = dict(bits=cfg["bits"], group=cfg.get("group"), asym=cfg.get("asym", True),
                  clip_ratio=cfg.get("clip", 0.95), rotate_keys=cfg.get("rotate", True),
                  rotate_values=cfg.get("rotate", True))
    got = QuaRot(**fields).quantize(x, ctx(kind)).x
    want = reference_quarot(x, kind, bits=cfg["bits"], group=cfg.get("group"), asym=cfg.get("asym", True),
                            clip=cfg.get("clip", 0.95), rotate=cfg.get("rotate", True))
    assert got.shape == x.shape and got.dtype == x.dtype
    # the same fp32 operations on the same values; only the order of the rotation's sums may differ
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_values_use_their_own_bits_and_clip():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 8, 32)
    m = QuaRot(bits=2, v_bits=4, v_clip_ratio=1.0)
    assert torch.allclose(m.quantize(x, ctx("v")).x, reference_quarot(x, "v", bits=4, clip=1.0), atol=1e-5)
    assert torch.allclose(m.quantize(x, ctx("k")).x, reference_quarot(x, "k", bits=2, clip=0.95), atol=1e-5)


def test_key_range_holds_zero_value_range_does_not():
    # a head vector whose rotated coordinates are all positive: x = H^T y with y > 0
    h = walsh(16).float()
    y = 4.0 + torch.arange(16.0) % 4
    x = (y @ h.T).view(1, 1, 1, 16)
    m = QuaRot(bits=2, clip_ratio=1.0)
    # values: range [4, 7], step 1 -> {4, 5, 6, 7} exactly representable
    assert torch.allclose(m.quantize(x, ctx("v")).x @ h, y.view(1, 1, 1, 16), atol=1e-5)
    # keys: range [0, 7] (QuaRot's per-head key path), step 7/3: not exact
    assert not torch.allclose(m.quantize(x, ctx("k")).x @ h, y.view(1, 1, 1, 16), atol=1e-3)


def test_rotation_keeps_q_dot_k_and_attention_output():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    h = walsh(64).float()
    # full precision: rotating q and k by the same H leaves every logit unchanged
    assert torch.allclose((q @ h) @ (k @ h).mT, q @ k.mT, atol=1e-4)
    m = parse("quarot-2")
    k_hat, v_hat = m.quantize(k, ctx("k")).x, m.quantize(v, ctx("v")).x
    # QuaRot's deployed form: rotated query against the rotated quantized cache ...
    rotated_keys_hat = reference_quarot(k, "k", bits=2) @ h        # Q(k H) H^T H = Q(k H), what QuaRot stores
    logits_deployed = (q @ h) @ rotated_keys_hat.mT
    # ... equals kvlab's form: the plain query against x_hat = Q(k H) H^T
    assert torch.allclose(logits_deployed, q @ k_hat.mT, atol=1e-4)
    # values: softmax . Q(v H), then o_proj's fused H^T, equals softmax . x_hat
    p = torch.softmax(q @ k_hat.mT / 8, dim=-1)
    rotated_values_hat = reference_quarot(v, "v", bits=2) @ h
    assert torch.allclose((p @ rotated_values_hat) @ h.T, p @ v_hat, atol=1e-5)


def test_rotation_removes_outlier_channels():
    # keys with a few channels 10x the others (per-channel outliers, as in real keys)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 256, 64, generator=g)
    x[..., [5, 37]] *= 10.0
    k = ctx("k")
    # the mechanism: after the rotation no coordinate stands out (max / rms per token vector)
    crest = lambda t: (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean().item()   # noqa: E731
    assert crest(x) > 5.0 and crest(x @ P.hadamard_matrix(64)) < 3.5
    rotated2 = rel(parse("quarot-2").quantize(x, k).x, x)
    plain2 = rel(parse("int2").quantize(x, k).x, x)                 # kvlab's plain per-token int2
    assert rotated2 < 0.5 * plain2, (rotated2, plain2)              # measured 0.36 vs 0.83
    # the rotation alone (same quantizer, same clip, no rotation): 4 bits halves the error
    rotated4 = rel(parse("quarot-4").quantize(x, k).x, x)
    unrotated4 = rel(parse("quarot:bits=4,rotate_keys=false").quantize(x, k).x, x)
    assert rotated4 < 0.6 * unrotated4, (rotated4, unrotated4)      # measured 0.075 vs 0.156


def test_bits_are_exact():
    x = torch.randn(2, 3, 10, 64)                                   # 3840 elements, 60 head vectors
    assert parse("quarot-2").quantize(x, ctx("k")).bits.item() == 2 * 3840 + 60 * 32
    assert parse("quarot-4").quantize(x, ctx("v")).bits.item() == 4 * 3840 + 60 * 32
    m = QuaRot(bits=2, v_bits=3, group=16, asym=False)              # 240 groups of 16, one fp16 scale each
    assert m.quantize(x, ctx("k")).bits.item() == 2 * 3840 + 240 * 16
    assert m.quantize(x, ctx("v")).bits.item() == 3 * 3840 + 240 * 16
    # no rotation changes no bits
    assert parse("quarot:bits=2,rotate_keys=false").quantize(x, ctx("k")).bits.item() == 2 * 3840 + 60 * 32


def test_presets_defaults_and_spec_round_trip():
    m = parse("quarot-4")
    assert (m.bits, m.v_bits, m.group, m.asym, m.clip_ratio, m.rotate_keys, m.rotate_values) == \
        (4, None, None, True, 0.95, True, True)
    assert (m.sink_tokens, m.residual_tokens, m.token_group) == (0, 0, 1)
    assert {parse(f"quarot-{b}").bits for b in (2, 3, 4, 8)} == {2, 3, 4, 8}
    for spec in ("quarot-2", "quarot:bits=2,v_bits=4", "quarot:bits=3,group=32,asym=false,clip_ratio=1.0",
                 "quarot:bits=2,rotate_keys=false,rotate_values=false,residual=128,v_clip_ratio=0.9"):
        m = parse(spec)
        assert parse(m.spec) == m


@pytest.mark.parametrize("spec,field", [
    ("quarot:bits=0", "bits"), ("quarot:bits=9", "bits"), ("quarot:v_bits=0", "v_bits"), ("quarot:group=0", "group"),
    ("quarot:clip_ratio=0", "clip_ratio"), ("quarot:clip_ratio=1.5", "clip_ratio"),
    ("quarot:v_clip_ratio=-0.5", "v_clip_ratio"), ("quarot:bits=1,asym=false", "bits"), ("quarot:residual=-1", "residual"),
])
def test_invalid_configs_name_the_field(spec, field):
    with pytest.raises(KVLabError, match=f"'{field}'"):
        parse(spec)


def test_head_dim_errors_name_the_fix():
    with pytest.raises(KVLabError, match="'group'.*divide head_dim"):
        QuaRot(group=24).quantize(torch.randn(1, 1, 2, 64), ctx("k"))
    x = torch.randn(1, 1, 4, 52)                                    # no Hadamard matrix of order 52 is built
    with pytest.raises(KVLabError, match="rotate_keys=false,rotate_values=false"):
        QuaRot(bits=4).quantize(x, ctx("k"))
    out = QuaRot(bits=4, rotate_keys=False, rotate_values=False).quantize(x, ctx("k")).x
    assert torch.allclose(out, reference_quarot(x, "k", bits=4, rotate=False), atol=1e-6)
    # a non-power-of-two order kvlab can build (96 = 48 x 2) rotates and stays close to x
    y = torch.randn(1, 2, 8, 96)
    assert rel(QuaRot(bits=8).quantize(y, ctx("v")).x, y) < 0.02


def test_half_precision_input_keeps_its_dtype():
    x = torch.randn(1, 2, 6, 64).half()
    out = parse("quarot-4").quantize(x, ctx("k")).x
    assert out.dtype == torch.float16 and rel(out.float(), x.float()) < 0.15
