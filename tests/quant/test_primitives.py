"""kvlab.quant.primitives: quantization primitives against hand-computed examples."""
from __future__ import annotations

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant import primitives as P


def t(*vals):
    return torch.tensor(vals, dtype=torch.float32)


# ------------------------------------------------------------------------------------ uniform / levels
def test_two_bit_asymmetric_is_exact_on_four_levels():
    x = t(0, 1, 2, 3).view(1, 1, 1, 4)
    xh, bits = P.quantize_uniform(x, 2)
    assert torch.equal(xh, x)
    assert bits.item() == 4 * 2 + 16 + 16          # codes + fp16 scale + fp16 zero


def test_symmetric_int4_error_bounded_by_half_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 32) * 3
    xh, _ = P.quantize_uniform(x, 4, symmetric=True)
    scale = (x.abs().amax(-1, keepdim=True) / 7).half().float()
    # |x - round(x/s)*s| <= s/2 in exact arithmetic; fp32 evaluation of x/s, q*s and the difference adds
    # at most ~2 ulp of |x| (about 2 * 1.2e-7 * |x|): the bound scales with |x|, it is not a fixed 1e-6
    assert ((xh - x).abs() <= scale / 2 + 2 * torch.finfo(torch.float32).eps * x.abs()).all()


@pytest.mark.parametrize("level,dim", [("token", -1), ("channel", -2)])
def test_grouped_token_and_channel_are_quantize_uniform(level, dim):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 8)
    a = P.quantize_grouped(x, 3, level, group=4)
    b = P.quantize_uniform(x, 3, dim=dim, group=4)
    # exact: quantize_grouped runs the very same quantize_uniform ops on the same tensor (no other kernel)
    assert torch.equal(a[0], b[0]) and a[1].item() == b[1].item()


def test_head_and_layer_levels_one_group_each():
    # head 0 holds {0..3}, head 1 holds {10..13}: per head, 2 bits are exact; per layer they are not
    x = torch.stack([torch.arange(4.).repeat(3, 1), 10 + torch.arange(4.).repeat(3, 1)]).view(1, 2, 3, 4)
    xh, bits = P.quantize_grouped(x, 2, "head")
    assert torch.equal(xh, x)
    assert bits.item() == 2 * 24 + 2 * 32          # 24 elements * 2 bits + (scale, zero) per head
    xl, bits_l = P.quantize_grouped(x, 2, "layer")
    assert not torch.equal(xl, x)
    assert bits_l.item() == 2 * 24 + 32            # one group for the whole tensor
    # layer level = quantize_uniform on the flattened tensor (the same elementwise ops: exact)
    ref, _ = P.quantize_uniform(x.reshape(1, -1), 2)
    assert torch.equal(xl, ref.view_as(x))


def test_head_level_mixed_bits_accounting():
    # [b=1, h=2, T=4, D=8], 2 bits for head 0, 3 bits for head 1:
    # codes 32*2 + 32*3 = 160, metadata 2 groups * 32 = 64 -> 224
    x = torch.randn(1, 2, 4, 8)
    _, bits = P.quantize_grouped(x, torch.tensor([2., 3.]).view(1, 2, 1, 1), "head")
    assert bits.item() == 224


def test_level_name_is_validated():
    with pytest.raises(KVLabError, match="level"):
        P.quantize_grouped(torch.zeros(1, 1, 2, 2), 2, "row")


# ------------------------------------------------------------------------------------ normal quantiles
def test_normal_levels_are_n01_quantiles():
    lv1, e1 = P.normal_levels(1)
    assert torch.allclose(lv1, t(-0.6745, 0.6745), atol=1e-4) and torch.allclose(e1, t(0.0), atol=1e-6)
    lv2, e2 = P.normal_levels(2)
    # Phi^-1(0.125), Phi^-1(0.375), ... ; edges Phi^-1(0.25), Phi^-1(0.5), Phi^-1(0.75)
    assert torch.allclose(lv2, t(-1.1503, -0.3186, 0.3186, 1.1503), atol=1e-4)
    assert torch.allclose(e2, t(-0.6745, 0.0, 0.6745), atol=1e-4)


def test_quantize_normal_equiprobable_buckets_and_bits():
    torch.manual_seed(0)
    x = (torch.randn(1, 1, 1, 20000) * 2 + 5)
    xh, bits = P.quantize_normal(x, 2)
    mu, sd = x.mean(), x.std(unbiased=False)
    levels = mu + sd * P.normal_levels(2)[0]
    vals, counts = torch.unique(xh, return_counts=True)
    assert len(vals) == 4
    # the quantizer stores mu and sigma as fp16 (relative rounding <= 2^-11): its levels may sit up to
    # 2^-11 * (|mu| + sigma * max|level|) ~ 3.6e-3 from the fp32 ones (1.1e-3 measured; levels are ~1.6 apart)
    fp16_slack = 2.0 ** -11 * (mu.abs() + sd * P.normal_levels(2)[0].abs().max()).item() + 1e-5
    assert torch.allclose(vals, levels, rtol=0, atol=fp16_slack)
    assert ((counts.float() / x.numel() - 0.25).abs() < 0.02).all()
    assert bits.item() == 2 * 20000 + 32


def test_quantize_normal_statistics_exclude_outliers():
    x = t(-1, 1, -1, 1, 1000).view(1, 5)
    excl = torch.tensor([[False, False, False, False, True]])
    xh, _ = P.quantize_normal(x, 1, exclude=excl)
    # mu = 0, sigma = 1 over the four dense values: they map to +-0.6745
    assert torch.allclose(xh[0, :4], t(-1, 1, -1, 1) * 0.6745, atol=1e-3)


# ------------------------------------------------------------------------------------ k-means codebooks
def test_kmeans_recovers_three_cluster_centres():
    torch.manual_seed(0)
    sample = torch.cat([torch.randn(500) * 0.1 - 4, torch.randn(1500) * 0.1 + 1, torch.randn(1000) * 0.1 + 6])
    c = P.kmeans_1d(sample[torch.randperm(sample.numel())], 3)
    assert torch.allclose(c, t(-4, 1, 6), atol=0.02)


def test_kmeans_codebook_gaussian_is_lloyd_max():
    torch.manual_seed(0)
    cb = P.kmeans_codebook(torch.randn(200_000), 2)
    assert cb.numel() == 4
    assert torch.allclose(cb, t(-1.510, -0.4528, 0.4528, 1.510), atol=0.02)   # Lloyd-Max 2-bit N(0,1)


def test_weighted_kmeans_pulls_towards_heavy_weights():
    # one centroid = weighted mean: (0*1 + 1*3) / 4
    assert P.kmeans_1d(t(0, 1), 1, weights=t(1, 3)).item() == pytest.approx(0.75)
    torch.manual_seed(0)
    v = torch.rand(4000)
    w = torch.where(v > 0.8, torch.full_like(v, 50.0), torch.ones_like(v))
    plain, weighted = P.kmeans_1d(v, 4), P.kmeans_1d(v, 4, weights=w)
    assert (weighted > 0.8).sum() > (plain > 0.8).sum()            # centroids move into the heavy region


def test_kmeans_batched_matches_separate_runs():
    torch.manual_seed(0)
    v = torch.randn(3, 1000) * torch.tensor([[1.], [2.], [0.5]])
    batched = P.kmeans_1d(v, 4)
    for i in range(3):
        # batched vs one row: Lloyd stops once assignments freeze (then each centroid is exactly its
        # cluster mean), so only the per-cluster sums' reduction order can differ: fp32 rounding, a few
        # ulp of |c| <= ~3 (~1e-6); identical here. allclose's rtol=1e-5 on top covers that.
        assert torch.allclose(batched[i], P.kmeans_1d(v[i], 4), atol=1e-6)


def test_quantize_to_codebook_by_hand():
    # group min -1, max 3 -> offset 1, scale 2; z = [-1, -0.5, 0.2, 1]
    # codebook [-1, -0.5, 0.5, 1] -> [-1, -0.5, 0.5, 1] -> x_hat = [-1, 0, 2, 3]
    x = t(-1, 0, 1.4, 3).view(1, 1, 1, 4)
    xh, bits = P.quantize_to_codebook(x, t(-1, -0.5, 0.5, 1))
    assert torch.allclose(xh.flatten(), t(-1, 0, 2, 3))
    assert bits.item() == 2 * 4 + 32
    # given offset/scale (offline ranges): no per-group metadata here, values clamp to the ends
    xh2, bits2 = P.quantize_to_codebook(t(-5, 0.25, 9), t(-1, -0.5, 0.5, 1), offset=t(0.0), scale=t(1.0))
    assert torch.allclose(xh2, t(-1, 0.5, 1)) and bits2.item() == 2 * 3


def test_uniform_codebook_matches_asymmetric_int():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, 16)
    a, _ = P.quantize_to_codebook(x, P.uniform_codebook(3))
    b, _ = P.quantize_uniform(x, 3)
    scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 7
    # two code paths with different fp16 metadata (offset/half-range vs min/step): their grids differ by
    # fp16 rounding, ~2^-11 * (|min| + 1.5 * range) <= scale * 0.01 + 1e-3 (3.3e-3 * scale measured).
    # A one-step disagreement would need an element within that grid difference of a decision boundary:
    # x is a seeded randn (no matmul) and its closest element is 8e-4 steps from one, which fp32
    # rounding (~1e-6 steps) on any CPU cannot close.
    assert ((a - b).abs() <= scale * 0.01 + 1e-3).all()
    assert P.codebook_bits(P.uniform_codebook(3)).item() == 8 * 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,dim,group,symmetric", [(2, -1, None, False), (3, -1, 32, False), (4, -2, 16, False),
                                                      (1, -2, 5, False), (4, -1, 32, True), (3, -2, None, True)])
def test_uniform_encode_is_quantize_uniforms_codes(dtype, bits, dim, group, symmetric):
    """`uniform_encode` (what kvlab.pack stores) holds quantize_uniform's codes: decoding them gives its tensor
    bit for bit (ragged groups, a one-token group, values beyond fp16's range included), codes in range,
    fp16 metadata finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 21, 40, generator=g) * 4
    x[0, 1, 0, :] = 3.0                              # constant rows / channels: a zero range
    if dtype != torch.float16:
        x[1, 2, 4, 7], x[0, 0, 9, 1] = 1e5, -2e5     # beyond fp16: saturating fp16 metadata (`_fp16`)
    x = x.to(dtype)
    want, _ = P.quantize_uniform(x, bits, dim=dim, group=group, symmetric=symmetric)
    e = P.uniform_encode(x, bits, dim=dim, group=group, symmetric=symmetric)
    assert e["codes"].dtype == torch.int32 and e["codes"].shape == x.shape
    assert int(e["codes"].min()) >= 0 and int(e["codes"].max()) <= 2 ** bits - 1
    assert ("zero" in e) != symmetric
    assert all(t.dtype == torch.float16 and bool(t.isfinite().all()) for k, t in e.items() if k != "codes")
    got = P.uniform_decode(e["codes"], e["scale"], e.get("zero"), bits, dim=dim, group=group, dtype=dtype)
    assert torch.equal(got, want)


def test_uniform_encode_symmetric_needs_two_bits():
    with pytest.raises(KVLabError, match="bits >= 2"):
        P.uniform_encode(torch.randn(1, 1, 4, 8), 1, symmetric=True)


# ------------------------------------------------------------------------------------ outliers
def test_split_outliers_magnitude_exact_count_and_range_shrinks():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 100)
    for ratio, k in ((0.01, 1), (0.05, 5), (0.013, 2)):      # ceil(ratio * 100)
        dense, mask = P.split_outliers(x, ratio)
        assert (mask.sum(-1) == k).all()
        # the outliers are the k largest magnitudes of each vector
        thresh = x.abs().topk(k, dim=-1).values[..., -1:]
        assert torch.equal(mask, x.abs() >= thresh)
        assert (dense.abs().amax(-1) < x.abs().amax(-1)).all()
        assert P.outlier_bits(mask).item() == mask.sum().item() * (16 + 32)
    # ties: still exactly k per vector
    _, mask = P.split_outliers(torch.ones(1, 10), 0.2)
    assert mask.sum().item() == 2


def test_split_outliers_sides_and_dense_statistics():
    x = torch.arange(20.).view(1, 20)
    dense, mask = P.split_outliers(x, 0.1, mode="sides")      # ceil(0.05 * 20) = 1 per end
    assert mask.nonzero()[:, 1].tolist() == [0, 19]
    inner = x[0, 1:19]
    assert dense.min().item() == 1 and dense.max().item() == 18
    assert dense.mean().item() == pytest.approx(inner.mean().item())   # filled with the dense mean
    # dense ranges: quantizing `dense` at 1 bit ignores the outliers' range
    assert P.merge_outliers(dense, x, mask)[0, 0].item() == 0.0


def test_split_outliers_per_group_with_ragged_tail():
    # 10 tokens per channel in groups of 4: sizes 4, 4, 2; ratio 0.3 -> ceil(1.2)=2, 2, min(ceil(0.6), 1)=1
    x = torch.randn(1, 1, 10, 3)
    _, mask = P.split_outliers(x, 0.3, dim=-2, group=4)
    assert (mask.sum(-2) == 5).all()
    assert (mask[:, :, :4].sum(-2) == 2).all() and (mask[:, :, 8:].sum(-2) == 1).all()


def test_split_outliers_validates_ratio():
    with pytest.raises(KVLabError, match="ratio"):
        P.split_outliers(torch.zeros(4), 1.0)
    with pytest.raises(KVLabError, match="mode"):
        P.split_outliers(torch.zeros(4), 0.1, mode="top")


def test_split_outliers_threshold():
    x = t(-3, 0, 1, 5)
    dense, mask = P.split_outliers_threshold(x, t(-1.0), t(2.0))
    assert mask.tolist() == [True, False, False, True]
    assert dense.tolist() == [0.5, 0, 1, 0.5]


# ------------------------------------------------------------------------------------ Q-Norm
def test_qnorm_matches_group_mean_and_std():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 64) * 3 + 1
    xh, _ = P.quantize_uniform(x, 2)
    xq, bits = P.qnorm(xh, x)
    assert bits.item() == 2 * 2 * 6 * 32                       # 24 token groups x 2 fp16
    # a and c are stored as fp16 (relative 2^-11 = 4.9e-4): std within ~5e-4 relative, mean within
    # ~|mean| * 1e-3; measured 2.8e-4 (std, rel) and 1.2e-4 (mean, abs)
    assert torch.allclose(xq.mean(-1), x.mean(-1), atol=5e-3)
    assert torch.allclose(xq.std(-1), x.std(-1), rtol=2e-3)
    assert not torch.allclose(xh.std(-1), x.std(-1), rtol=2e-2)   # the shift Q-Norm removes


def test_qnorm_leaves_excluded_untouched():
    x = t(0, 1, 2, 3, 100).view(1, 5)
    xh = t(0.5, 0.5, 2.5, 2.5, 100).view(1, 5)
    ex = torch.tensor([[False] * 4 + [True]])
    xq, _ = P.qnorm(xh, x, exclude=ex)
    assert xq[0, 4].item() == 100
    assert xq[0, :4].mean().item() == pytest.approx(1.5, abs=1e-3)
    assert xq[0, :4].std(unbiased=False).item() == pytest.approx(x[0, :4].std(unbiased=False).item(), rel=1e-3)


def test_quantile_along_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 101)
    for q in (0.0, 0.005, 0.5, 0.995, 1.0):
        # same sorted values, the interpolation may round differently: ~1 ulp of |x| <= ~3 (identical here)
        assert torch.allclose(P.quantile_along(x, q, -1), torch.quantile(x, q, dim=-1), atol=1e-6)
