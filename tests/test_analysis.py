"""KV statistics (kvlab.analysis), sensitivity sweeps and the explorer's compute (`select`: tests/quant/test_select.py)."""
import pytest
import torch

import kvlab
from kvlab import analysis
from kvlab.errors import KVLabError
from kvlab.evaluation import EvalSpec, evaluate
from kvlab.quant import parse


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
    # fp32 rounding of 50 products summed (worst ~50 * 1.2e-7 = 6e-6; measured <= 1.3e-6) against
    # assert_close's fp32 default atol=1e-5 + rtol=1.3e-6
    torch.testing.assert_close((dens * (edges[1:] - edges[:-1])).sum(1), torch.ones(2))


def test_axis_error_per_channel_wins_on_outlier_channels():
    x = torch.randn(2, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    x[:, 1, :, 5] += 20.0                 # a channel with a large, steady magnitude (keys' outlier channels)
    e = analysis.axis_error([x], bits=2)
    assert e["channel"][0] < e["token"][0] / 2     # measured ratio 0.35 on this seeded, matmul-free tensor
    g = torch.Generator().manual_seed(0)
    two_levels = torch.randint(0, 2, (1, 2, 8, 4), generator=g).float() * 3.0   # exact at 1 bit per token
    assert float(analysis.axis_error([two_levels], bits=1)["token"][0]) == 0.0   # exact: levels {0, 3}, fp16-exact
    tab = analysis.axis_error_table({"k": [_planted()], "v": [_planted(1)]}, bits=(2, 4))
    assert len(tab) == 2 * 2 * 2 and set(tab.axis) == {"per token", "per channel"}


def test_stack_layers_rejects_ragged_layers():
    with pytest.raises(KVLabError, match="differ in shape"):
        analysis.stack_layers([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4)])


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
    assert df.ppl_fp.iloc[0] == pytest.approx(fp)           # both from fp16 runs in this process
    k_rows, v_rows = df[df.kind == "k"], df[df.kind == "v"]
    assert (k_rows.avg_bits_k < 16).all() and (k_rows.avg_bits_v == 16).all()
    assert (v_rows.avg_bits_v < 16).all() and (v_rows.avg_bits_k == 16).all()
    assert (df.delta_ppl == df.ppl - df.ppl_fp).all()        # exact: the same float64 subtraction
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
    from kvlab.calibration import calibrate, calibrate_many, calibration_ids, missing_fits
    from kvlab.sensitivity import outlier_grid

    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    lm = kvlab.load("tiny-llama")
    spec = EvalSpec(n_tokens=64, window=32, calib_tokens=64)
    evaluator_text = "calib_rows=none,calib_len=none"        # KVQuant calibrates on the evaluator's text, not its 16 x 2048
    methods = [f"kvquant:bits=2,outliers=0.01,nuq=false,{evaluator_text}", f"kvquant:bits=2,fisher=false,{evaluator_text}",
               f"kvquant:bits=3,outliers=0.02,{evaluator_text}",
               f"select:inner=kvquant:bits=4;fisher=false;{evaluator_text.replace(',', ';')},layers=1,kind=k", "int2"]
    ids = calibration_ids(lm, spec.data, spec.calib_tokens, spec.window, skip=spec.n_tokens)
    assert missing_fits(lm, methods, ids) == 4
    captures = []
    real_capture = kvlab.calibration.capture_for
    monkeypatch.setattr("kvlab.calibration.capture_for", lambda *a: captures.append(a[2]) or real_capture(*a))
    fitted = calibrate_many(lm, methods, ids=ids)
    assert len(captures) == 2                      # one capture per distinct needs (with / without gradients)
    assert missing_fits(lm, methods, ids) == 0
    assert fitted[-1] is not None and fitted[-1].state is None and fitted[3].inner_method.state is not None
    with monkeypatch.context() as m:
        m.setattr("kvlab.calibration.capture_for", lambda *a: pytest.fail("evaluate recalibrated"))
        for spec_str in methods:
            evaluate(lm, spec_str, spec, progress=False)
    shared = fitted[2]
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "fresh"))
    own = calibrate(lm, methods[2], data=spec.data, n_tokens=spec.calib_tokens, window=spec.window,
                    skip=spec.n_tokens)                # calibrates itself (Fisher-weighted k-means)
    assert own.state.keys() == shared.state.keys()
    for k in own.state:
        # the same capture (with gradients) and the same fit on the same ids: identical numbers
        assert torch.equal(own.state[k], shared.state[k])

    grid = outlier_grid(lm, bits=(2, 4), ratios=(0.0, 0.01), nuq=(False, True), spec=spec, extra=f"fisher=false,{evaluator_text}",
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
    assert ex.last["metrics"]["kl"] > first["metrics"]["kl"]     # measured 4.4e-4 (2 bits) vs 2.0e-5 (4 bits)
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
