"""Every notebook runs top to bottom under papermill with small parameters and writes its figures."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

SMALL = {
    "00_quickstart": dict(model="tiny-llama", n_tokens=256, window=128, methods=["fp16", "int4", "kivi-2"]),
    "01_kv_statistics": dict(model="tiny-llama", n_tokens=256, window=128),
    "02_sensitivity": dict(model="tiny-llama", n_tokens=128, window=64, bits=[2, 4]),
    "03_outliers": dict(model="tiny-llama", n_tokens=128, window=64, calib_tokens=64, bits=[2, 4],
                        ratios=[0.0, 0.01]),
    "04_attention_aware": dict(model="tiny-llama", map_tokens=64, n_tokens=128, window=64, eps_aware=[0.03],
                               eps_unaware=[10.0]),
    "05_method_comparison": dict(model="tiny-llama", n_tokens=128, window=64, calib_tokens=64,
                                 methods=["fp16", "int4", "kivi-2", "qaq-low", "hf-quanto-int2"],
                                 store_path="{figures}/results.sqlite"),
    "06_long_context": dict(model="tiny-llama", context_lengths=[300], depths=[0.0, 1.0], methods=["fp16", "kivi-2"],
                            calib_tokens=128, pm_method="pmkvq:budget=3.0,max_tokens=256,residual=16",
                            pm_max_tokens=400, pm_step=25, pm_measured=[100, 200]),
    "07_explorer": dict(model="tiny-llama", n_tokens=128, window=64, calib_tokens=64),
    "08_downstream_tasks": dict(model="tiny-llama", methods=["fp16", "int4", "kivi-2"], n_choice=4, n_summary=2,
                                max_new_tokens=4, max_context_tokens=96, n_tokens=128, window=64, calib_tokens=64,
                                store_path="{figures}/results.sqlite"),
    "09_deployed_decode": dict(model="tiny-llama", n_tokens=128, window=64, prefill=32, calib_tokens=64, smooth=4,
                               methods=["fp16", "int4", "kivi:bits=2,group=8,residual=16", "hf-quanto-int2"],
                               pm_method="pmkvq:budget=3.0,max_tokens=64,residual=16",
                               store_path="{figures}/results.sqlite"),
}


def _run(name, tmp_path, **params):
    import papermill as pm
    out = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=params, cwd=str(ROOT),
                        progress_bar=False, kernel_name="python3")
    return out


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_and_saves_figures(name, tmp_path):
    figs = tmp_path / "figures"
    _run(name, tmp_path, figures=str(figs), **SMALL[name])
    pngs, pdfs = list(figs.glob("*.png")), list(figs.glob("*.pdf"))
    assert pngs and len(pngs) == len(pdfs)


def test_every_notebook_is_covered_and_stripped():
    import json
    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(SMALL), "add small parameters for every notebook to SMALL"
    for name in names:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), name
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), f"{name} has outputs"


@pytest.mark.notebook
def test_wrong_parameter_stops_in_first_cell(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="unknown notebook parameter.*n_token"):
        _run("00_quickstart", tmp_path, model="tiny-llama", n_token=256)
    with pytest.raises(pm.PapermillExecutionError, match="parameter 'window' must be int"):
        _run("00_quickstart", tmp_path, model="tiny-llama", window="big")
