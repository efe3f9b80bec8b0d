"""The decode path's cost-saving mechanics keep every number: in-place flushes, the reused per-step
bits, the scalar constants of the uniform quantizer (benchmarks/bench_decode.py measures the costs)."""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from kvlab import models
from kvlab.core.cache import write_tokens
from kvlab.core.ledger import Ledger
from kvlab.hooks import quantize
from kvlab.quant.base import Quantized
from kvlab.quant import primitives
from kvlab.quant.primitives import quantize_uniform


def _cache(t=10, seed=0):
    return torch.randn(1, 2, t, 4, generator=torch.Generator().manual_seed(seed))


def _cat(stored, s, e, new):
    return torch.cat([stored[..., :s, :], new, stored[..., e:, :]], dim=-2)


@torch.no_grad()
def test_write_tokens_in_place_outside_autograd():
    stored, new = _cache(), _cache(3, 1)
    want = _cat(stored, 4, 7, new)
    ptr = stored.data_ptr()
    got = write_tokens(stored, 4, 7, new)
    assert got.data_ptr() == ptr and torch.equal(got, want)      # no copy of the cache


@torch.no_grad()
def test_write_tokens_leaves_a_span_returned_unchanged_alone():
    stored = _cache()
    before = stored.clone()
    assert write_tokens(stored, 2, 5, stored[..., 2:5, :]) is stored      # the identity method's answer
    assert torch.equal(stored, before)


@torch.no_grad()
def test_write_tokens_copies_when_in_place_is_not_safe():
    stored = _cache()
    before = stored.clone()
    shifted = stored[..., 1:4, :]                                    # overlaps the span it replaces
    got = write_tokens(stored, 2, 5, shifted)
    assert torch.equal(got, _cat(before, 2, 5, before[..., 1:4, :])) and torch.equal(stored, before)
    wide = _cache(3, 1).double()                                     # torch.cat promotes: keep that
    got = write_tokens(stored, 2, 5, wide)
    assert got.dtype == torch.float64 and torch.equal(stored, before)


def test_write_tokens_copies_while_autograd_records():
    stored, new = _cache(), _cache(3, 1).requires_grad_()
    before = stored.clone()
    got = write_tokens(stored, 4, 7, new)
    assert got.requires_grad and torch.equal(stored, before)         # a graph may hold the old values
    got.sum().backward()
    assert torch.equal(new.grad, torch.ones_like(new))


def test_bits_by_layer_reuses_its_tensor_and_widens_exactly():
    ledger = Ledger(2)
    assert ledger.bits_by_layer() is None
    x = torch.randn(1, 1, 3, 4)
    big = torch.tensor(2.0 ** 24 + 1.0, dtype=torch.float64)        # not representable in float32
    ledger.quantized(0, "k", x, Quantized(x, torch.tensor(100.5)))
    first = ledger.bits_by_layer()
    assert ledger.bits_by_layer() is first                           # nothing booked since: the same tensor
    assert first.dtype == torch.float64 and first.tolist() == [[100.5, 0.0], [0.0, 0.0]]
    ledger.quantized(1, "v", x, Quantized(x, big))                   # mixed dtypes: each part widened alone
    second = ledger.bits_by_layer()
    assert second is not first and second.tolist() == [[100.5, 0.0], [0.0, 2.0 ** 24 + 1.0]]
    ledger.quantized(1, "k", x, Quantized(x, torch.tensor(3.0)), replace=True)   # a rewritten region counts
    assert ledger.bits_by_layer().tolist() == [[100.5, 0.0], [3.0, 2.0 ** 24 + 1.0]]


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_constants_work_inside_and_outside_inference_mode(bits, monkeypatch):
    monkeypatch.setattr(primitives, "_CONSTANTS", {})                # made afresh, inside inference mode
    x = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(bits))
    b = torch.full((1, 2, 5, 1), float(bits))                        # the tensor path, built per call
    want = quantize_uniform(x, b)
    with torch.inference_mode():
        got = quantize_uniform(x, bits)                              # makes the cached constants here
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    y = x.clone().requires_grad_()
    xh, _ = quantize_uniform(y, bits)                                # the same constants, with autograd
    xh.sum().backward()
    assert y.grad is not None


@torch.no_grad()
def test_decode_flush_leaves_the_attention_error_reference_intact():
    """The flush writes int4 values into the stored cache; the attention-error reference (fp K/V of
    every stored token) must keep the prefill's fp values: those of a bare run, bit for bit."""
    m = models.tiny("llama").model
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    bare = m(ids[:, :8], past_key_values=DynamicCache(config=m.config), use_cache=True).past_key_values
    with quantize(m, "int4", protocol="decode", attn_error=True) as run:
        out = m(ids[:, :8], use_cache=True)
        for t in range(8, 24):
            out = m(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    for ours, fp in zip(out.past_key_values.layers, bare.layers):
        assert torch.equal(ours.ref_keys[..., :8, :], fp.keys) and torch.equal(ours.ref_values[..., :8, :], fp.values)
        assert not torch.equal(ours.keys[..., :8, :], fp.keys)          # the cache itself holds int4 values
    assert run.summary()["attn_rel_err"] > 0
