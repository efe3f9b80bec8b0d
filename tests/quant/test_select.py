"""kvlab.quant.methods.select: an inner method on chosen layers and K/V; spec round-trips, errors, what changes."""
import pytest
import torch

import kvlab
from kvlab.errors import KVLabError
from kvlab.quant import parse
from kvlab.quant.methods.select import parse_layers, select_spec


@pytest.mark.parametrize("spec, canonical", [
    ("select:inner=int2,layers=3+1,kind=k", "select:inner=int:bits=2,layers=1+3,kind=k"),
    ("select:inner=kvquant:bits=3;outliers=0.01,layers=0-2+10,kind=kv",
     "select:inner=kvquant:bits=3;fisher=activation;outliers=0.01;kmeans_impl=sklearn;kmeans_points=None,layers=0+1+2+10,kind=kv"),
    ("select:inner=kivi-2,layers=all,kind=v", "select:inner=kivi:bits=2;flush=authors,layers=all,kind=v"),
])
def test_select_spec_round_trips(spec, canonical):
    m = parse(spec)
    assert m.spec == canonical
    assert parse(m.spec) == m and parse(m.spec).spec == canonical
    assert hash(parse(canonical)) == hash(m)


def test_select_spec_builder_encodes_commas_and_mirrors_the_inner_method():
    s = select_spec("kvquant:bits=2,outliers=0.01,nuq=false", [5, 2], "k")
    assert s == "select:inner=kvquant:bits=2;nuq=false;fisher=activation;outliers=0.01,layers=2+5,kind=k"
    m = parse(s)
    assert m.inner_method == parse("kvquant:bits=2,outliers=0.01,nuq=false")
    assert (m.key_site, m.sink_tokens, m.needs_calibration, m.selected_layers) == ("pre_rope", 1, True, {2, 5})
    kivi = parse(select_spec("kivi:bits=2,group=32,residual=128", "all", "kv"))
    assert (kivi.token_group, kivi.residual_tokens, kivi.key_site, kivi.scope) == (32, 128, "post_rope", "layer")
    assert kivi.selected_layers is None and not kivi.needs_attention
    assert parse_layers([3, 3, 1]) == (1, 3) and parse_layers("all") is None


@pytest.mark.parametrize("bad, msg", [
    ("select:inner=nope", "invalid inner method 'nope'"),
    ("select:inner=int2,layers=x", "'layers' must be"),
    ("select:inner=int2,layers=4-2", "runs backwards"),
    ("select:inner=int2,kind=q", "'kind' must be one of"),
    ("select:inner=select:inner=int2", "may not itself be a select"),
    ("select:inner=kvquant:bits=2,outliers=0.01", "unknown field 'outliers'"),    # unencoded comma
])
def test_select_errors_name_the_problem(bad, msg):
    with pytest.raises(KVLabError, match=msg):
        parse(bad)


@pytest.mark.parametrize("inner", ["int2", "kvquant:bits=2;nuq=false;k_scale=online"])
def test_select_changes_only_the_chosen_layer(inner):
    lm = kvlab.tiny("llama", num_hidden_layers=4)
    ids = torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with kvlab.capture(lm, what=("k", "v")) as cap:
            lm.model(ids)
        fp = {w: cap[w] for w in ("k", "v")}
        with kvlab.quantize(lm, f"select:inner={inner},layers=2,kind=k", protocol="fake") as run:
            out = lm.model(ids)
        report = run.layer_report()
    cache = out.past_key_values
    for layer in range(4):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        if layer < 2:            # upstream of the selected layer: bit-identical K and V
            assert torch.equal(keys, fp["k"][layer]) and torch.equal(values, fp["v"][layer])
        elif layer == 2:         # its V untouched, its K quantized
            assert torch.equal(values, fp["v"][layer])
            assert not torch.equal(keys, fp["k"][layer])
    assert report.loc[report.layer != 2, "k_bits"].eq(16.0).all()
    assert report["v_bits"].eq(16.0).all() and report["v_rel_err"].eq(0.0).all()
    assert report.loc[report.layer == 2, "k_bits"].item() < 16.0
    assert report.loc[report.layer == 2, "k_rel_err"].item() > 0.0
    assert report.loc[report.layer != 2, "k_rel_err"].eq(0.0).all()


def test_select_refuses_a_layer_the_model_lacks():
    lm = kvlab.tiny("llama")
    with pytest.raises(KVLabError, match=r"layer\(s\) \[7\] do not exist"):
        with torch.no_grad(), kvlab.quantize(lm, "select:inner=int2,layers=7,kind=v"):
            lm.model(torch.randint(3, 259, (1, 16)))
