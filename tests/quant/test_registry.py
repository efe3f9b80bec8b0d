"""kvlab.quant.registry: presets round-trip and invalid specs name the field (QAQ, PM-KVQ, Q-Hitter, H2O, HF cache)."""
from __future__ import annotations

import pytest

from kvlab.errors import KVLabError
from kvlab.quant import parse
from kvlab.quant.methods import hf_cache as _hf  # noqa: F401  (registers, until methods/__init__ imports it)
from kvlab.quant.methods import pmkvq as _pmkvq  # noqa: F401
from kvlab.quant.methods import qaq as _qaq  # noqa: F401
from kvlab.quant.methods import qhitter as _qhitter  # noqa: F401
from kvlab.quant.registry import PRESETS


MY_METHODS = ("qaq", "pmkvq", "qhitter", "h2o", "hf")


def test_presets_round_trip():
    mine = {n: s for n, s in PRESETS.items() if s.split(":")[0] in MY_METHODS}
    assert {"qaq-high", "qaq-low", "qaq-code", "pmkvq-4", "pmkvq-3", "qhitter-20", "h2o-20",
            "hf-quanto-int4", "hf-quanto-int2", "hf-hqq-int4", "hf-hqq-int2", "hf-fp8"} <= set(mine)
    for name in mine:
        m = parse(name)
        assert parse(m.spec) == m, name
        assert parse(str(m)) == m
    assert parse("hf-quanto-int4-kchannel").axis_key == -1


@pytest.mark.parametrize("spec, field", [
    ("qaq:eps_k=0", "eps_k"), ("qaq:eps_v=-1", "eps_v"), ("qaq:level=block", "level"),
    ("qaq:quant=nf4", "quant"), ("qaq:variant=github", "variant"), ("qaq:outliers=1.0", "outliers"),
    ("qaq:n_min=4,n_max=2", "n_max"), ("qaq:n_recent=0", "n_recent"), ("qaq:q_norm=0", "q_norm"),
    ("pmkvq:min_bits=3", "min_bits"), ("pmkvq:budget=1.5", "budget"), ("pmkvq:budget=20", "budget"),
    ("pmkvq:max_bits=16,init_bits=8", "init_bits"), ("pmkvq:allocation=greedy", "allocation"),
    ("pmkvq:max_tokens=0", "max_tokens"),
    ("qhitter:h2o_ratio=1.0", "h2o_ratio"), ("qhitter:alpha=1.5", "alpha"),
    ("qhitter:h2o_ratio=0.5,qh_ratio=0.4,recent_ratio=0.2", "recent_ratio"), ("qhitter:bits=0", "bits"),
    ("h2o:heavy_ratio=-0.1", "heavy_ratio"), ("h2o:recent_ratio=1", "recent_ratio"),
    ("hf:backend=bnb", "backend"), ("hf:nbits=3", "nbits"), ("hf:backend=hqq,axis_key=-1", "axis_key"),
    ("hf:axis_value=1", "axis_value"), ("hf:backend=fp8,nbits=4", "nbits"), ("hf:group=0", "group"),
])
def test_invalid_configs_name_the_field(spec, field):
    with pytest.raises(KVLabError, match=field):
        parse(spec)
