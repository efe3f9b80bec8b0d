"""kvlab.tasks (one entry point per task, the store in front) and `kvlab eval --task`, on a tiny model."""
import pytest

import kvlab
from kvlab.cli import main
from kvlab.errors import KVLabError
from kvlab.store import Store
from kvlab.tasks import TASKS, run_task, task_kind


@pytest.fixture(scope="module")
def lm():
    return kvlab.load("tiny-llama")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_task_names_and_options_are_checked(lm):
    assert [task_kind(t) for t in ("ppl", "cloze-wiki", "piqa", "lead-wiki", "xsum")] == \
        ["ppl", "choice", "choice", "summary", "summary"]
    with pytest.raises(KVLabError, match="unknown task 'wikitext'.*cloze-wiki"):
        run_task(lm, "wikitext", ["fp16"])
    with pytest.raises(KVLabError, match="no option 'n_shot'.*n, seed"):
        run_task(lm, "cloze-wiki", ["fp16"], n_shot=1)
    with pytest.raises(KVLabError, match="unknown method"):
        run_task(lm, "ppl", ["fp16", "nosuch-4"])
    assert set(TASKS) >= {"ppl", "cloze-wiki", "hellaswag", "piqa", "mathqa", "truthfulqa", "lead-wiki", "xsum"}


@pytest.mark.parametrize("task, kw, headline", [
    ("ppl", dict(n_tokens=128, window=64), "ppl"),
    ("cloze-wiki", dict(n=4), "acc"),
    ("lead-wiki", dict(n=2, max_new_tokens=4, max_context_tokens=96), "rougeL"),
])
def test_results_are_stored_and_read_back(lm, isolated, task, kw, headline):
    store = Store(isolated / "r.sqlite")
    first = run_task(lm, task, ["fp16", "int:bits=2"], store=store, progress=False, **kw)
    assert not first["cached"].any() and list(first["label"]) == ["fp16", "int:bits=2"]
    again = run_task(lm, task, ["fp16", "int:bits=2"], store=store, progress=False, **kw)
    assert again["cached"].all()
    assert again[headline].tolist() == pytest.approx(first[headline].tolist())      # the stored values
    redo = run_task(lm, task, ["int:bits=2"], store=store, progress=False, recompute=True, **kw)
    # recomputed by this process on the same inputs (deterministic kernels): equal up to rel 1e-6
    assert not redo["cached"].any() and redo[headline].iloc[0] == pytest.approx(first[headline].iloc[1])


def test_eval_cli_runs_a_task_and_reuses_the_store(isolated, capsys):
    args = ["eval", "--model", "tiny-llama", "--task", "cloze-wiki", "--n", "4", "--method", "fp16",
            "--method", "int:bits=2", "--store", str(isolated / "r.sqlite")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "agree_fp" in out and "choice:cloze-wiki:n=4,seed=0" in out and "False" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "True" in out and "False" not in out
    assert main(["eval", "--model", "tiny-llama", "--task", "nosuch", "--method", "fp16", "--no-store"]) == 2
