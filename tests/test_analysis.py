"""KV statistics (kvlab.analysis), the `select` method, sensitivity sweeps and the explorer's compute."""
import pytest
import torch

import kvlab
from kvlab import analysis
from kvlab.errors import KVLabError
from kvlab.evaluate import EvalSpec, evaluate
from kvlab.quant import parse
from kvlab.quant.methods.select import Select, parse_layers, select_spec


def _planted(seed: int = 0, channel: tuple[int, int] = (1, 5)) -> torch.Tensor:
    """[batch 2, heads 2, tokens 64, head_dim 16] Gaussian with one channel scaled by 25."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 64, 16, generator=g)
    x[:, channel[0], :, channel[1]] *= 25.0
    return x


# ----------------------------------------------------------------------------- statistics
def test_planted_outlier_channel_is_found():
    xs = [_planted(0), 0.5 * _planted(1)]
    mask = analysis.outlier_channels(xs, factor=4.0)
    assert mask.shape == (2, 32)
    assert mask.nonzero().tolist() == [[0, 21], [1, 21]]          # channel = head * head_dim + dim
    assert (analysis.outlier_score(xs) > 10).all()
    g = torch.Generator().manual_seed(2)
    plain = [torch.randn(2, 2, 64, 16, generator=g) for _ in range(2)]
    table = analysis.outlier_table({"k": xs, "v": plain}, factor=4.0)
    k, v = table[table.tensor == "K post-RoPE"], table[table.tensor == "V"]
    assert k.n_outliers.tolist() == [1, 1] and k.channels.tolist() == [[21], [21]]
    assert (v.n_outliers == 0).all() and (v.score < 4).all()


def test_channel_absmax_map_matches_a_loop():
    x = torch.randn(3, 2, 10, 4)
    ref = torch.tensor([[x[:, h, :, d].abs().max() for h in range(2) for d in range(4)]])
    torch.testing.assert_close(analysis.channel_absmax_map([x]), ref)
    torch.testing.assert_close(analysis.channel_absmax(x), ref.view(2, 4))


def test_per_token_ranges_are_exact():
    t = torch.arange(5, dtype=torch.float32)
    d = torch.arange(8, dtype=torch.float32)
    x = ((t[:, None] + 1) * d[None, :]).expand(2, 3, 5, 8).clone()   # token t: 0 .. 7(t+1)
    x[1] *= -2.0
    r = analysis.token_ranges(x)
    torch.testing.assert_close(r[0], (7 * (t + 1)).expand(3, 5))
    torch.testing.assert_close(r[1], (14 * (t + 1)).expand(3, 5))
    torch.testing.assert_close(analysis.token_range_profile(x), 10.5 * (t + 1))
    tab = analysis.token_range_table({"v": [x, 2 * x]}, qs=(0.5, 1.0))
    assert tab["q1"].tolist() == pytest.approx([70.0, 140.0])
    assert tab["tensor"].tolist() == ["V", "V"]


def test_abs_quantiles_match_torch_quantile():
    xs = [torch.randn(1, 2, 50, 8) for _ in range(3)]
    qs = (0.1, 0.5, 0.99, 1.0)
    q = analysis.abs_quantiles(xs, qs)
    for layer, x in enumerate(xs):
        torch.testing.assert_close(q[layer], torch.quantile(x.abs().flatten(), torch.tensor(qs)))
    tab = analysis.magnitude_table({"k_pre": xs}, qs=(0.5, 1.0))
    assert len(tab) == 6 and set(tab.tensor) == {"K pre-RoPE"}


def test_histograms_are_densities():
    x = torch.randn(1, 1, 1000, 4)
    edges, dens = analysis.histograms([x, 2 * x], bins=50)
    assert dens.shape == (2, 50) and edges.shape == (51,)
    torch.testing.assert_close((dens * (edges[1:] - edges[:-1])).sum(1), torch.ones(2))


def test_axis_error_per_channel_wins_on_outlier_channels():
    x = torch.randn(2, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    x[:, 1, :, 5] += 20.0                 # a channel with a large, steady magnitude (keys' outlier channels)
    e = analysis.axis_error([x], bits=2)
    assert e["channel"][0] < e["token"][0] / 2
    g = torch.Generator().manual_seed(0)
    two_levels = torch.randint(0, 2, (1, 2, 8, 4), generator=g).float() * 3.0   # exact at 1 bit per token
    assert float(analysis.axis_error([two_levels], bits=1)["token"][0]) == 0.0
    tab = analysis.axis_error_table({"k": [_planted()], "v": [_planted(1)]}, bits=(2, 4))
    assert len(tab) == 2 * 2 * 2 and set(tab.axis) == {"per token", "per channel"}


def test_stack_layers_rejects_ragged_layers():
    with pytest.raises(KVLabError, match="differ in shape"):
        analysis.stack_layers([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4)])


# ----------------------------------------------------------------------------- the select method
@pytest.mark.parametrize("spec, canonical", [
    ("select:inner=int2,layers=3+1,kind=k", "select:inner=int:bits=2,layers=1+3,kind=k"),
    ("select:inner=kvquant:bits=3;outliers=0.01,layers=0-2+10,kind=kv",
     "select:inner=kvquant:bits=3;outliers=0.01,layers=0+1+2+10,kind=kv"),
    ("select:inner=kivi-2,layers=all,kind=v", "select:inner=kivi:bits=2,layers=all,kind=v"),
])
def test_select_spec_round_trips(spec, canonical):
    m = parse(spec)
    assert m.spec == canonical
    assert parse(m.spec) == m and parse(m.spec).spec == canonical
    assert hash(parse(canonical)) == hash(m)


def test_select_spec_builder_encodes_commas_and_mirrors_the_inner_method():
    s = select_spec("kvquant:bits=2,outliers=0.01,nuq=false", [5, 2], "k")
    assert s == "select:inner=kvquant:bits=2;nuq=false;outliers=0.01,layers=2+5,kind=k"
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


# ----------------------------------------------------------------------------- sensitivity sweeps
def test_layer_sensitivity_returns_the_grid_and_reuses_the_store(tmp_path):
    from kvlab.sensitivity import layer_sensitivity, sensitivity_matrix
    from kvlab.store import Store

    lm = kvlab.load("tiny-llama")
    spec = EvalSpec(n_tokens=128, window=64)
    store = Store(tmp_path / "results.sqlite")
    df = layer_sensitivity(lm, bits=(2, 4), kinds=("k", "v"), spec=spec, store=store, progress=False)
    assert len(df) == 2 * 2 * 2
    assert sorted(zip(df.kind, df.layer, df.bits)) == [(k, l, b) for k in "kv" for l in (0, 1) for b in (2, 4)]
    assert df.method.is_unique and all(parse(m).spec == m for m in df.method)
    assert (df.kl >= 0).all() and df.ppl_fp.nunique() == 1 and not df.cached.any()
    fp = evaluate(lm, "fp16", spec, progress=False).metrics["ppl"]
    assert df.ppl_fp.iloc[0] == pytest.approx(fp)
    k_rows, v_rows = df[df.kind == "k"], df[df.kind == "v"]
    assert (k_rows.avg_bits_k < 16).all() and (k_rows.avg_bits_v == 16).all()
    assert (v_rows.avg_bits_v < 16).all() and (v_rows.avg_bits_k == 16).all()
    assert (df.delta_ppl == df.ppl - df.ppl_fp).all()
    again = layer_sensitivity(lm, bits=(2, 4), kinds=("k", "v"), spec=spec, store=store, progress=False)
    assert again.cached.all()
    assert again.kl.tolist() == pytest.approx(df.kl.tolist())
    mat = sensitivity_matrix(df, "kl", "v")
    assert mat.shape == (2, 2) and list(mat.index) == [2, 4]
    one = layer_sensitivity(lm, bits=(3,), kinds=("v",), spec=spec, layers=[1], progress=False)
    assert list(zip(one.kind, one.layer, one.bits)) == [("v", 1, 3)]
    with pytest.raises(KVLabError, match=r"layers \[5\] do not exist"):
        layer_sensitivity(lm, bits=(2,), spec=spec, layers=[5], progress=False)
    with pytest.raises(KVLabError, match="must contain"):
        layer_sensitivity(lm, bits=(2,), spec=spec, inner="int2", progress=False)


def test_outlier_grid_and_shared_calibration(tmp_path, monkeypatch):
    from kvlab.quant.methods.kvquant import KVQuant
    from kvlab.sensitivity import calibrate_kvquant, outlier_grid

    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    lm = kvlab.load("tiny-llama")
    spec = EvalSpec(n_tokens=64, window=32, calib_tokens=64)
    methods = ["kvquant:bits=2,outliers=0.01,nuq=false", "kvquant:bits=2,fisher=false",
               "kvquant:bits=3,outliers=0.02", "select:inner=kvquant:bits=4;fisher=false,layers=1,kind=k", "int2"]
    assert calibrate_kvquant(lm, methods, spec) == 4
    assert calibrate_kvquant(lm, methods, spec) == 0
    shared = parse(methods[2])
    with monkeypatch.context() as m:
        m.setattr(KVQuant, "_compute_calibration", lambda *a, **k: pytest.fail("evaluate recalibrated"))
        for spec_str in methods:
            evaluate(lm, spec_str, spec, progress=False)
        evaluate(lm, shared, spec, progress=False)
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "fresh"))
    own = parse(methods[2])
    evaluate(lm, own, spec, progress=False)            # calibrates itself (Fisher-weighted k-means)
    assert own._calib.keys() == shared._calib.keys()
    for k in own._calib:
        torch.testing.assert_close(own._calib[k], shared._calib[k])

    grid = outlier_grid(lm, bits=(2, 4), ratios=(0.0, 0.01), nuq=(False, True), spec=spec, extra="fisher=false",
                        progress=False)
    assert len(grid) == 2 * 2 * 2 + 2
    assert list(grid.family.unique()) == ["int", "nuq", "baseline"]
    kvq = grid[grid.family != "baseline"].set_index(["family", "bits", "outliers"])
    for fam in ("int", "nuq"):
        for b in (2, 4):
            assert kvq.loc[(fam, b, 0.01), "avg_bits"] > kvq.loc[(fam, b, 0.0), "avg_bits"] + 0.3   # 48 bits per outlier
    assert grid.method[grid.family == "baseline"].tolist() == ["int:bits=2", "int:bits=4"]


# ----------------------------------------------------------------------------- the explorer, without a browser
def test_explorer_compute_and_update_without_a_browser():
    from kvlab.widgets import METHODS, explorer

    lm = kvlab.load("tiny-llama")
    ui = explorer(lm, spec=EvalSpec(n_tokens=64, window=32, calib_tokens=32), bits=4)
    ex = ui.explorer
    first = ex.last
    assert first["spec"] == "int:bits=4" and first["channel_err"]["k"].shape == (32,)
    fig = ex.update(bits=2)
    assert fig is ex.figure and ex.last["spec"] == "int:bits=2"
    assert ex.last["metrics"]["kl"] > first["metrics"]["kl"]
    ex.controls["method"].value = "KVQuant"                      # the widget path: an observer recomputes
    assert ex.last["spec"].startswith("kvquant:bits=2,outliers=0.01")
    assert not ex.controls["outliers"].disabled
    ex.update(only_layer=True, layer=1, protocol="prefill-decode")
    assert ex.last["spec"].startswith("select:inner=kvquant") and ex.last["protocol"] == "prefill-decode"
    assert len(ex.history()) == 4
    r = ex.compute(method="KIVI", bits=3, outliers=0.0, layer=0, protocol="fake")
    assert r["layers"]["k_rel_err"].gt(0).all() and set(METHODS) >= {"KIVI", "KVQuant"}
    with pytest.raises(KVLabError, match="layer must be in 0..1"):
        ex.compute(method="KIVI", bits=3, layer=9)
