"""Every registered method runs both protocols on every tiny family through the interception core."""
import pytest
import torch

from kvlab import KVLabError, models
from kvlab.calibration import calibrate
from kvlab.hooks import quantize
from kvlab.protocols import supports
from kvlab.quant import parse
from kvlab.quant.registry import PRESETS, representatives


def _ids(t=48):
    return torch.randint(3, 300, (2, t), generator=torch.Generator().manual_seed(0))


def _run(lm, spec, protocol):
    method = parse(spec)
    m = lm.model
    if not supports(method, protocol):
        pytest.skip(f"{spec} does not run in the {protocol} protocol (kvlab.protocols.check_protocol says why)")
    backend = getattr(method, "backend", None)
    if backend is not None:
        from kvlab.quant.methods.hf_cache import backend_available
        ok, why = backend_available(backend)
        if not ok:
            pytest.skip(why)
        from kvlab.quant.methods.hf_cache import sliding_layers
        if sliding_layers(m.config):       # transformers' QuantizedCache refuses them: a clear error instead
            with pytest.raises(KVLabError, match="sliding-window layers"):
                with quantize(m, method, protocol=protocol):
                    m(_ids())
            return None
    method = calibrate(lm, method, ids=_ids(64))       # a fitted copy (the method itself if nothing to fit)
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
@pytest.mark.parametrize("spec", representatives())
def test_method_runs_on_family(spec, family, protocol):
    _run(models.tiny(family), spec, protocol)


@pytest.mark.parametrize("spec", sorted(PRESETS) if PRESETS else [])
def test_every_preset_runs_and_round_trips(spec):
    m = parse(spec)
    assert parse(m.spec) == m
    _run(models.tiny("llama"), spec, "fake" if supports(m, "fake") else "prefill-decode")


@pytest.mark.parametrize("bad", ["int:bits=0", "int:group=0", "nosuch:bits=2", "int:bits=two", "int:colour=red"])
def test_invalid_spec_names_the_problem(bad):
    with pytest.raises(KVLabError):
        parse(bad)
