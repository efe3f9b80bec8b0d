"""What a new user ran into: sweep dry runs that accept wrong types, a `kvlab results --help` example
that fails, re-run notebook cells that cannot re-register a method, and a silent, noisy demo."""
from __future__ import annotations

import io
import json
import shlex
import shutil
import textwrap
import warnings
from pathlib import Path

import nbformat
import pytest
import yaml

from kvlab.errors import KVLabError
from kvlab.notebook import (TCP_WARNING, check_parameters, check_parameters_cell, parameter_types,
                            quiet_kernel_cmd, type_mismatch)

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "notebooks" / "00_quickstart.ipynb"
FIXTURE = Path(__file__).parent / "fixtures" / "sweep_fixture.ipynb"


# ---------------------------------------------------------------------------------------------
# 1. parameter types: one inference for the notebooks' check and `kvlab sweep --dry-run`
# ---------------------------------------------------------------------------------------------
def test_parameter_types_are_inferred_from_the_defaults():
    src = textwrap.dedent("""\
        %matplotlib inline
        n_tokens = 2048
        ratio = 0.5                      # a comment
        methods = ["fp16", "int4"]
        model: str = "smollm2-135m"
        store_path = None
        nuq = False
        shape = (1, 2)
        opts = {"a": 1}
        big = 2 ** 10                    # not a literal: anything
        a, b = 1, 2
        neg = -3
        count = 1
        count += 1                       # still an int parameter
        """)
    t = parameter_types(src)
    assert t == {"n_tokens": int, "ratio": float, "methods": list, "model": str, "store_path": None,
                 "nuq": bool, "shape": (tuple, list), "opts": dict, "big": None, "a": None, "b": None,
                 "neg": int, "count": int}
    with pytest.raises(KVLabError, match="not valid Python"):
        parameter_types("x = = 1")


@pytest.mark.parametrize("value, expected, bad", [
    (3, int, False), (True, int, True), (3.0, int, True), ("3", int, True),
    (3, float, False), (3.5, float, False), (False, float, True),
    (["a"], list, False), ("int4", list, True),
    ("x", str, False), (1, str, True),
    (True, bool, False), (1, bool, True),
    (None, None, False), ("anything", None, False), ([1], None, False),
    (None, (type(None), str), False), (3, (type(None), str), True),
])
def test_type_rule(value, expected, bad):
    assert type_mismatch(value, expected) is bad


def _quickstart_parameters_source() -> str:
    nb = nbformat.read(str(QUICKSTART), as_version=4)
    return next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def test_sweep_and_notebook_share_one_type_inference():
    from kvlab.sweep import notebook_parameter_types, notebook_parameters

    expected = parameter_types(_quickstart_parameters_source())
    assert notebook_parameter_types(QUICKSTART) == expected
    assert notebook_parameters(QUICKSTART) == list(expected)
    assert expected["n_tokens"] is int and expected["methods"] is list and expected["store_path"] is None


def _dry_run(tmp_path, **spec):
    from kvlab.sweep import run_sweep

    spec = {"name": "usability", "notebook": str(QUICKSTART), **spec}
    return run_sweep(spec, store=tmp_path / "results.sqlite", runs_dir=tmp_path / "runs", dry_run=True,
                     progress=False)


@pytest.mark.parametrize("param, value, want", [
    ("n_tokens", "lots", "int"),
    ("methods", "int4", "list"),
    ("window", 512.0, "int"),
    ("data", 3, "str"),
])
def test_dry_run_rejects_a_wrong_type(tmp_path, param, value, want):
    with pytest.raises(KVLabError) as err:
        _dry_run(tmp_path, parameters={param: value})
    msg = str(err.value)
    assert "config #0" in msg and f"parameter '{param}'" in msg and f"must be {want}" in msg
    assert f"{type(value).__name__} {value!r}" in msg and "00_quickstart.ipynb" in msg
    assert not (tmp_path / "runs").exists()


def test_dry_run_names_the_failing_config_of_a_grid(tmp_path):
    with pytest.raises(KVLabError, match=r"config #1 .*parameter 'n_tokens' must be int.*str 'lots'"):
        _dry_run(tmp_path, grid={"n_tokens": [1024, "lots"]})


def test_dry_run_accepts_right_types(tmp_path, capsys):
    # int for a float default, anything for a None default, a list for a list default
    s = _dry_run(tmp_path, parameters={"methods": ["fp16", "int4"], "store_path": "x.sqlite", "device": "cpu"},
                 grid={"n_tokens": [512, 1024]})
    assert len(s["planned"]) == 2 and "2 configs valid" in capsys.readouterr().out
    from kvlab.sweep import run_sweep

    s = run_sweep({"name": "fx", "notebook": str(FIXTURE), "grid": {"sleep": [0, 0.5]}},
                  store=tmp_path / "r.sqlite", runs_dir=tmp_path / "runs", dry_run=True, verbose=False)
    assert len(s["planned"]) == 2


def test_cli_dry_run_exits_2_with_the_error(tmp_path, capsys):
    from kvlab.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"notebook": str(QUICKSTART), "parameters": {"n_tokens": "lots"}}))
    assert main(["sweep", str(path), "--dry-run", "--store", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "parameter 'n_tokens' must be int" in err and "'lots'" in err and "configs valid" not in err


def test_every_shipped_sweep_passes_the_type_checks(tmp_path):
    from kvlab.sweep.spec import expand, find_notebook, load_spec, notebook_parameter_types, validate

    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        validate(spec, expand(spec), notebook_parameter_types(find_notebook(spec)), check_methods=False)


def test_check_parameters_cell_reads_the_parameters_cell_from_history():
    params = "n_tokens = 2048\nmethods = ['fp16']\nstore_path = None\n"
    before = {"_ih", "In", "_nb"}
    history = ["", "import kvlab.notebook as _nb\n_before = _nb.names_before()", params,
               "# Parameters\nn_tokens = 'lots'\n", "_nb.check_parameters_cell(globals(), _before)"]
    ns = {"_ih": history, "_nb": object(), "n_tokens": "lots", "methods": ["fp16"], "store_path": 3}
    with pytest.raises(KVLabError, match=r"parameter 'n_tokens' must be int, got str 'lots'"):
        check_parameters_cell(ns, before)
    check_parameters_cell(dict(ns, n_tokens=512), before)          # store_path: None default, anything goes
    with pytest.raises(KVLabError, match="unknown notebook parameter.*n_token"):
        check_parameters_cell(dict(ns, n_tokens=512, n_token=5), before)
    with pytest.raises(KVLabError, match="names_before"):
        check_parameters_cell({"_ih": ["", params, "check"]}, set())
    with pytest.raises(KVLabError, match="input history"):
        check_parameters_cell({}, set())
    # the explicit form still works and uses the same rule
    check_parameters({"x": 3}, set(), x=float)
    with pytest.raises(KVLabError, match="parameter 'x' must be float, got bool True"):
        check_parameters({"x": True}, set(), x=float)


# ---------------------------------------------------------------------------------------------
# 2. every example of `kvlab results --help` runs
# ---------------------------------------------------------------------------------------------
def _results_help() -> str:
    from kvlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["results"].format_help()


def _small_store(path: Path) -> None:
    """What `kvlab eval` / the notebooks write: one row per metric, config without a `bits` field."""
    from kvlab.store import Store

    st = Store(path)
    for method, bits, ppl, kl in [("fp16", 16.0, 14.79, 0.0), ("int:bits=8", 8.5, 14.77, 0.0004),
                                  ("int:bits=4", 4.5, 16.17, 0.12), ("kivi:bits=2,group=32,residual=128", 3.0, 27.3, 0.66)]:
        metrics = dict(model="smollm2", data="wiki:2048x512", label=method, method=method, protocol="fake",
                       avg_bits=bits, ppl=ppl, kl=kl)
        st.put_result("smollm2", "wiki:2048x512", method, "fake", metrics,
                      {"n_tokens": 2048, "window": 512, "stride": None, "corpus": "wiki"})
    st.record_run("a" * 64, "notebooks/x.ipynb", {"x": 1}, "ok", sweep="s")
    st.record_run("b" * 64, "notebooks/x.ipynb", {"x": -1}, "failed", error="ValueError: x", sweep="s")
    st.close()


def test_results_help_examples_all_run(tmp_path, monkeypatch, capsys):
    from kvlab.cli import main

    help_text = _results_help()
    examples = [line.strip() for line in help_text.splitlines() if line.strip().startswith("kvlab results ")]
    assert any("--where \"metric=='ppl' and bits<=4\"" in e for e in examples), help_text
    store = tmp_path / "results.sqlite"
    _small_store(store)
    monkeypatch.chdir(tmp_path)
    for example in examples:
        argv = shlex.split(example, comments=True)[1:] + ["--store", str(store)]
        assert main(argv) == 0, example
        out = capsys.readouterr().out
        assert "no results" not in out and "no runs" not in out, (example, out)
        if "bits<=4" in example:
            assert "int:bits=4" in out and "kivi:bits=2" in out and "fp16" not in out and "bits=8" not in out
            assert "2 results" in out


def test_where_can_name_spec_fields_and_same_result_metrics(tmp_path):
    from kvlab.store import load

    store = tmp_path / "results.sqlite"
    _small_store(store)
    df = load("metric == 'ppl' and bits <= 4", path=store)
    assert sorted(df["method"]) == ["int:bits=4", "kivi:bits=2,group=32,residual=128"]
    assert "bits" not in df.columns                                  # query-only names, not columns
    df = load("metric == 'kl' and avg_bits <= 3", path=store)
    assert df["method"].tolist() == ["kivi:bits=2,group=32,residual=128"] and df["value"].tolist() == [0.66]
    assert load("metric == 'ppl' and group == 32", path=store)["value"].tolist() == [27.3]
    with pytest.raises(KVLabError, match=r"bitz.*also usable: bits, group, residual, avg_bits"):
        load("metric == 'ppl' and bitz <= 4", path=store)


# ---------------------------------------------------------------------------------------------
# 3. re-registering a method from a re-run cell
# ---------------------------------------------------------------------------------------------
_CELL = '''
from dataclasses import dataclass
from kvlab.quant.base import Method
from kvlab.quant.registry import register

@register
@dataclass(frozen=True)
class {cls}(Method):
    name = "{name}"
    bits: int = {bits}
'''


def _run_cell(name: str, bits: int = 4, cls: str = "MyMethod", module: str = "__main__") -> type:
    ns = {"__name__": module}
    exec(compile(_CELL.format(name=name, bits=bits, cls=cls), "<cell>", "exec", dont_inherit=True), ns)
    return ns[cls]


@pytest.fixture
def registry():
    from kvlab.quant import registry

    registry._import_methods()
    saved = dict(registry.METHODS)
    yield registry
    registry.METHODS.clear()
    registry.METHODS.update(saved)


def test_rerun_cell_replaces_the_method_with_a_notice(registry):
    first = _run_cell("usability-mine", bits=4)
    with pytest.warns(UserWarning, match="method 'usability-mine': replacing"):
        second = _run_cell("usability-mine", bits=3)
    assert second is not first and registry.METHODS["usability-mine"] is second
    assert registry.parse("usability-mine").bits == 3
    # an interactive class with another class name replaces a user method too
    with pytest.warns(UserWarning, match="usability-mine"):
        third = _run_cell("usability-mine", cls="Renamed")
    assert registry.METHODS["usability-mine"] is third


def test_same_qualified_name_from_a_module_is_replaced(registry):
    a = _run_cell("usability-mod", module="mylab.methods")
    with pytest.warns(UserWarning, match="mylab.methods.MyMethod"):
        b = _run_cell("usability-mod", module="mylab.methods")
    assert registry.METHODS["usability-mod"] is b and b is not a


def test_a_different_class_cannot_take_a_builtin_name(registry):
    builtin = registry.METHODS["int"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KVLabError) as err:
            _run_cell("int", cls="MyInt")
    msg = str(err.value)
    assert f"{builtin.__module__}.{builtin.__qualname__}" in msg and "__main__.MyInt" in msg and "'int'" in msg
    assert registry.METHODS["int"] is builtin
    _run_cell("usability-other", module="lab_a")
    with pytest.raises(KVLabError, match=r"lab_a\.MyMethod.*lab_b\.Other"):
        _run_cell("usability-other", cls="Other", module="lab_b")


# ---------------------------------------------------------------------------------------------
# 4. the demo says what it does, without the kernel's TCP warning, and states its units
# ---------------------------------------------------------------------------------------------
def test_quiet_kernel_cmd_replaces_only_the_ipykernel_launcher():
    cmd = ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "/tmp/k.json"]
    quiet = quiet_kernel_cmd(cmd)
    assert quiet[0] == cmd[0] and quiet[1] == "-c" and quiet[-2:] == ["-f", "/tmp/k.json"]
    assert TCP_WARNING in quiet[2] and "launch_new_instance" in quiet[2]
    other = ["julia", "-i", "kernel.jl", "{connection_file}"]
    assert quiet_kernel_cmd(other) == other


def _tiny_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import sys\nprint('first line')\nprint(f'x is {x}')\n"
                                          "print('to stderr', file=sys.stderr)\n42")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


@pytest.mark.notebook
def test_execute_echoes_prints_and_drops_only_the_tcp_warning(tmp_path, capfd):
    from kvlab.notebook import execute

    echo = io.StringIO()
    out = tmp_path / "out.ipynb"
    execute(_tiny_notebook(tmp_path / "nb.ipynb"), out, {"x": 7}, cwd=tmp_path, echo=echo)
    assert echo.getvalue() == "  first line\n  x is 7\n"
    captured = capfd.readouterr()
    assert TCP_WARNING not in captured.err and TCP_WARNING not in captured.out
    outputs = json.loads(out.read_text())["cells"][-1]["outputs"]
    assert any(o.get("name") == "stderr" for o in outputs)          # the notebook keeps its own stderr


@pytest.mark.notebook
def test_demo_reports_progress_and_units(tmp_path, monkeypatch, capfd):
    import kvlab.paths
    from kvlab.cli import main

    (tmp_path / "notebooks").mkdir()
    shutil.copy(QUICKSTART, tmp_path / "notebooks" / QUICKSTART.name)
    monkeypatch.setattr(kvlab.paths, "REPO_ROOT", tmp_path)        # runs/ and figures/ go to tmp_path
    assert main(["demo", "--model", "tiny-llama", "--methods", "fp16,int4"]) == 0
    captured = capfd.readouterr()
    out = captured.out
    assert TCP_WARNING not in out + captured.err
    lines = out.splitlines()
    assert lines[0].startswith("[kvlab demo] running notebooks/00_quickstart.ipynb on tiny-llama")
    assert any(line.strip().startswith("[1/2] fp16") for line in lines)
    assert any(line.strip().startswith("[2/2] int4") for line in lines)
    legend = [line for line in lines if line.startswith("units:")]
    assert len(legend) == 1
    for unit in ("avg_bits", "bits per K/V element", "nats per token", "ppl", "top1", "fraction",
                 "k/v_rel_err", "relative Frobenius error"):
        assert unit in legend[0], unit
    assert (tmp_path / "figures" / "00_quickstart" / "results.csv").exists()
    assert max(len(line) for line in lines if not line.startswith("units:")) <= 160
