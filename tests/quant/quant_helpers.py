"""Helpers shared by the method tests in tests/quant (imported as `from quant_helpers import ...`:
pytest's default `prepend` import mode puts this folder, which has no __init__.py, on sys.path)."""
from __future__ import annotations

import torch

from kvlab.quant import AttentionStats, LayerContext


# the KIVI / KVQuant tests' context: a chunk of one layer (imported there as `ctx`)
def layer_ctx(kind, layer=0, start=0, num_layers=1):
    return LayerContext(layer=layer, num_layers=num_layers, kind=kind, start=start)


def rel_err(a, b):
    return ((a - b).pow(2).mean() / b.pow(2).mean()).item()


# the QAQ / PM-KVQ / Q-Hitter / HF-cache tests' context: `t` tokens handed over, `total` in the layer
# (imported there as `ctx`)
def token_ctx(kind, t, *, attention=None, start=0, total=None, layer=0, num_layers=1):
    return LayerContext(layer=layer, num_layers=num_layers, kind=kind, start=start, attention=attention,
                        total_tokens=t + start if total is None else total)


def stats(received_sum=None, received_max=None, query_norm=None, shape=(1, 1, 4)):
    b, h, t = shape
    return AttentionStats(received_sum if received_sum is not None else torch.ones(b, h, t),
                          received_max if received_max is not None else torch.ones(b, h, t),
                          query_norm if query_norm is not None else torch.ones(b, h), n_recent=1)


def decode_with_keep_sets(model, spec, ids, prefill, keep_sets=True):
    """Prefill `prefill` tokens of ids, then one token per forward inside `quantize(model, spec,
    protocol="decode")`. Returns (run, logits of every call concatenated, per step after each decode
    call: per layer, per KV head of batch 0, the kept positions of the stored tokens read before it).
    `keep_sets=False` (methods that evict nothing, e.g. KIVI): the third item is None."""
    from kvlab.hooks import quantize

    kept = []
    with torch.no_grad(), quantize(model, spec, protocol="decode") as run:
        out = model(ids[:, :prefill], use_cache=True)
        past, logits = out.past_key_values, [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits)
            if keep_sets:
                kept.append([[torch.nonzero(row[:-1]).flatten().tolist() for row in layer.keep[0]]
                             for layer in run.cache.layers])
    return run, torch.cat(logits, 1), kept if keep_sets else None


def eager_calls(model, ids, prefill):
    """The authors' decode on a plain DynamicCache with the attention probabilities returned: yields
    (t0, t1, output) for the prefill ids[:, :prefill] and then one token per call. The caller may drop
    tokens from the cache between calls (real eviction), so positions are passed explicitly."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    for t0, t1 in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        past = cache.get_seq_length()
        out = model(ids[:, t0:t1], past_key_values=cache, use_cache=True, output_attentions=True,
                    position_ids=torch.arange(t0, t1)[None], cache_position=torch.arange(past, past + t1 - t0))
        yield t0, t1, out
