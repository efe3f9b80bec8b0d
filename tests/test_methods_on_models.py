"""Every registered method runs both protocols on every tiny family through the interception core."""
import pytest
import torch

from kvlab import KVLabError, models
from kvlab.hooks import quantize
from kvlab.quant import available, parse
from kvlab.quant.registry import METHODS, PRESETS


def _one_preset_per_method():
    available()
    chosen = {}
    for name in sorted(PRESETS):
        chosen.setdefault(type(parse(name)).name, name)
    for name in sorted(METHODS):
        chosen.setdefault(name, name)
    return sorted(chosen.values())


def _ids(t=48):
    return torch.randint(3, 300, (2, t), generator=torch.Generator().manual_seed(0))


def _run(lm, spec, protocol):
    method = parse(spec)
    m = lm.model
    if getattr(method, "replaces_cache", False):
        pytest.skip("HF QuantizedCache comparators replace the cache: covered by test_qaq_qhitter_pmkvq.py and notebook 05")
    if getattr(method, "needs_calibration", False):
        method.calibrate(m, _ids(64))
    ids = _ids()
    with torch.no_grad(), quantize(m, method, protocol=protocol) as run:
        if protocol == "fake":
            out = m(ids).logits
        else:
            past = m(ids[:, :32]).past_key_values
            out = m(ids[:, 32:], past_key_values=past).logits
    assert torch.isfinite(out).all()
    s = run.summary()
    assert 0 < s["avg_bits"] <= 16.0 + 1e-6, s
    return s


@pytest.mark.parametrize("protocol", ["fake", "prefill-decode"])
@pytest.mark.parametrize("family", models.TINY_FAMILIES)
@pytest.mark.parametrize("spec", _one_preset_per_method())
def test_method_runs_on_family(spec, family, protocol):
    _run(models.tiny(family), spec, protocol)


@pytest.mark.parametrize("spec", sorted(PRESETS) if PRESETS else [])
def test_every_preset_runs_and_round_trips(spec):
    m = parse(spec)
    assert parse(m.spec) == m
    _run(models.tiny("llama"), spec, "fake")


@pytest.mark.parametrize("bad", ["int:bits=0", "int:group=0", "nosuch:bits=2", "int:bits=two", "int:colour=red"])
def test_invalid_spec_names_the_problem(bad):
    with pytest.raises(KVLabError):
        parse(bad)
