"""The lm-evaluation-harness bridge (kvlab.lmeval) on a tiny random model: the same log-likelihoods and
accuracy as kvlab.choice on cloze-wiki (fp and a quantized method in prefill-decode), generation and
rolling log-likelihood against plain HF, `kvlab eval --task lm-eval:...` writing the store, lm_eval's
own command line through `python -m kvlab.lmeval`, and errors naming the fix. Skipped without lm-eval
(`pip install -e ".[lmeval]"`), except the test of that error itself."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.errors import KVLabError
from kvlab.store import Store

needs_lmeval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                  reason='lm-eval not installed (optional extra: pip install -e ".[lmeval]")')


@pytest.fixture(scope="module")
def lm():
    return kvlab.tiny("llama")


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """This module's cache: kvlab.choice's fp references are compared exactly with this process's
    kernels (see tests/test_choice.py), and the cloze-wiki jsonl is written here."""
    return tmp_path_factory.mktemp("kvlab-cache")


@pytest.fixture
def cache(own_cache, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(own_cache))
    return own_cache


def _bridge_and_choice(lm, method, protocol, n):
    from kvlab.choice import evaluate_choice
    from kvlab.lmeval import run

    results, bridge = run(lm, method, "cloze-wiki", protocol=protocol, limit=n, log_samples=True, progress=False)
    ch = evaluate_choice(lm, method, n=n, protocol=protocol, progress=False)
    samples = sorted(results["samples"]["cloze-wiki"], key=lambda s: s["doc_id"])
    return results, bridge, samples, ch


@needs_lmeval
def test_fp_accuracy_and_logliks_equal_kvlab_choice(lm, cache):
    """fp16, fake: lm-eval's acc / acc_norm on the cloze-wiki task YAML equal kvlab.choice's on the same
    examples, because every (context, choice) log-likelihood is the same number."""
    results, bridge, samples, ch = _bridge_and_choice(lm, "fp16", "fake", 8)
    res = results["results"]["cloze-wiki"]
    assert [s["doc"]["id"] for s in samples] == ch.details["id"].tolist()      # the same examples, in order
    assert [s["target"] for s in samples] == ch.details["label"].tolist()
    assert [[ll for ll, _ in s["filtered_resps"]] for s in samples] == ch.details["loglik"].tolist()   # exact
    assert res["acc,none"] == ch.metrics["acc"] and res["acc_norm,none"] == ch.metrics["acc_norm"]
    assert results["n-samples"]["cloze-wiki"]["effective"] == 8 and bridge.avg_bits == 16.0
    # the jsonl the YAML reads holds kvlab.choice's examples
    from kvlab.choice import cloze_wiki
    from kvlab.lmeval import cloze_wiki_jsonl
    path = cloze_wiki_jsonl(0)
    assert path.is_relative_to(cache) and path.suffix == ".jsonl"
    import json
    first = [json.loads(line) for line in path.read_text().splitlines()[:8]]
    assert first == cloze_wiki(0, 8)


@needs_lmeval
def test_quantized_prefill_decode_logliks_equal_kvlab_choice(lm, cache):
    """A quantized method in prefill-decode: the context stored under the method, the continuation scored
    against it; per-example log-likelihoods and the bits equal kvlab.choice's under that protocol."""
    results, bridge, samples, ch = _bridge_and_choice(lm, "int:bits=2", "prefill-decode", 4)
    assert [[ll for ll, _ in s["filtered_resps"]] for s in samples] == ch.details["loglik"].tolist()
    assert ch.details["loglik"].tolist() != ch.details["loglik_fp"].tolist()       # it did quantize
    assert results["results"]["cloze-wiki"]["acc,none"] == ch.metrics["acc"]
    assert bridge.avg_bits == pytest.approx(ch.metrics["avg_bits"]) and bridge.avg_bits < 16


@needs_lmeval
def test_generate_until_and_rolling_match_plain_hf(lm):
    from lm_eval.api.instance import Instance

    from kvlab.lmeval import KVLabLM

    bridge = KVLabLM(lm=lm, method="fp16", progress=False)
    ids = torch.tensor([lm.tokenizer.encode("The cat sat on")])
    with torch.no_grad():
        ref = lm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    text = lm.tokenizer.decode(ref.tolist())
    req = lambda until: Instance("generate_until", {}, ("The cat sat on", {"until": until, "max_gen_toks": 12}), 0)  # noqa: E731
    assert bridge.generate_until([req([])]) == [text]
    stop = text[len(text) // 2:len(text) // 2 + 1]
    assert bridge.generate_until([req([stop])]) == [text.split(stop)[0]]
    with pytest.raises(KVLabError, match="greedily"):
        bridge.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])

    doc = "Hello world, this is a test of the rolling log-likelihood."
    t = [lm.tokenizer.bos_token_id] + lm.tokenizer.encode(doc)
    with torch.no_grad():
        logp = lm.model(torch.tensor([t[:-1]])).logits[0].float().log_softmax(-1)
    plain = float(logp.gather(-1, torch.tensor(t[1:])[:, None]).sum())
    assert bridge.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)]) == [plain]
    bridge.max_length = 16               # several windows: each token still scored once
    assert bridge.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])[0] == \
        pytest.approx(plain, rel=0.05)


@needs_lmeval
def test_kvlab_eval_lm_eval_task_writes_the_store(tmp_path, cache, capsys):
    store = tmp_path / "r.sqlite"
    args = ["eval", "--model", "tiny-llama", "--task", "lm-eval:cloze-wiki", "--n", "4", "--method", "fp16",
            "--method", "int:bits=2", "--protocol", "prefill-decode", "--store", str(store)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "lm-eval:cloze-wiki:n=4,fewshot=default,v=0.4.13" in out and "False" in out
    df = Store(store).load()
    rows = df[df["metric"] == "acc"]
    assert sorted(rows["method"]) == ["fp16", "int:bits=2"] and set(rows["protocol"]) == {"prefill-decode"}
    assert {"acc", "acc_stderr", "acc_norm", "n_examples", "avg_bits"} <= set(df["metric"])
    assert main(args) == 0                                    # read back from the store
    out = capsys.readouterr().out
    assert "True" in out and "False" not in out


@needs_lmeval
def test_lm_eval_command_line_through_the_wrapper(tmp_path):
    """`python -m kvlab.lmeval` is lm_eval's CLI with the model registered; plain lm-eval does not know it."""
    env = {**os.environ, "KVLAB_CACHE": str(tmp_path / "cache"), "KVLAB_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    plain = subprocess.run([sys.executable, "-c", "from lm_eval.api.registry import get_model; get_model('kvlab')"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode != 0 and "no model for this name" in plain.stderr
    cmd = [sys.executable, "-m", "kvlab.lmeval", "--model", "kvlab", "--model_args",
           "pretrained=tiny-llama,method=kivi-2,protocol=prefill-decode", "--tasks", "cloze-wiki", "--limit", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cloze-wiki" in out.stdout and "acc_norm" in out.stdout and "'method': 'kivi-2'" in out.stdout


@needs_lmeval
def test_bad_inputs_name_the_fix(lm, tmp_path, capsys):
    from kvlab.lmeval import KVLabLM
    from kvlab.tasks import task_spec

    with pytest.raises(KVLabError, match="method='nosuch-4'.*unknown method"):
        KVLabLM(lm=lm, method="nosuch-4")
    with pytest.raises(KVLabError, match="unknown protocol 'sideways'.*fake, prefill-decode, decode"):
        KVLabLM(lm=lm, protocol="sideways")
    with pytest.raises(KVLabError, match="unknown model_args 'group'.*quoted"):     # a spec split at its comma
        KVLabLM(lm=lm, method="int:bits=4", group=32)
    assert KVLabLM(lm=lm, method="int:bits=4;group=32").method.spec.startswith("int:bits=4")
    with pytest.raises(KVLabError, match="unknown lm-eval task 'no-such-task'.*cloze-wiki"):
        task_spec("lm-eval:no-such-task")
    with pytest.raises(KVLabError, match="name the lm-eval task"):
        task_spec("lm-eval:")
    with pytest.raises(KVLabError, match="no option 'seed'.*n, num_fewshot"):
        task_spec("lm-eval:cloze-wiki", seed=1)
    assert main(["eval", "--model", "tiny-llama", "--task", "lm-eval:no-such-task", "--method", "fp16",
                 "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err and not (tmp_path / "r.sqlite").exists()


def test_missing_lm_eval_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)        # `import lm_eval` raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    from kvlab import lmeval
    from kvlab.tasks import task_spec

    with pytest.raises(KVLabError, match=r'needs lm-evaluation-harness.*pip install -e "\.\[lmeval\]"'):
        lmeval.require()
    with pytest.raises(KVLabError, match="lmeval"):
        task_spec("lm-eval:cloze-wiki")
    with pytest.raises(KVLabError, match="lmeval"):
        lmeval.KVLabLM(method="fp16")
    assert main(["eval", "--model", "tiny-llama", "--task", "lm-eval:cloze-wiki", "--method", "fp16",
                 "--no-store"]) == 2
    assert "pip install" in capsys.readouterr().err
    assert lmeval.main(["--model", "kvlab", "--tasks", "cloze-wiki"]) == 2
