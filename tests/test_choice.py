"""Multiple-choice log-likelihood accuracy (kvlab.choice) on a tiny random model (seconds), the HF task
conversions on fake rows, and one integration test on the embedded SmolLM2-135M."""
import sys
import types

import pytest
import torch

import kvlab
from kvlab import choice, data
from kvlab.choice import evaluate_choice, examples
from kvlab.errors import KVLabError
from kvlab.store import Store


@pytest.fixture(scope="module")
def lm():
    return kvlab.load("tiny-llama")


def _plain_logliks(lm, ex) -> list[float]:
    """Independent reference: one plain forward over context + choice, log_softmax, sum over the choice."""
    out = []
    for c in ex["choices"]:
        n = len(lm.tokenizer.encode(ex["context"]))
        ids = torch.tensor([lm.tokenizer.encode(ex["context"] + c)])
        with torch.no_grad():
            logp = lm.model(ids, use_cache=False).logits[0].float().log_softmax(-1)
        out.append(float(logp[n - 1:-1].gather(-1, ids[0, n:, None]).sum()))
    return out


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """A cache folder for this module's fp references. The fp16 runs below are compared *exactly* with
    their reference, which is valid only when this process's kernels computed it: a shared or older
    cache (`data/cache/`, a prepared cache mounted on several machines) can hold a reference written
    with another BLAS/SIMD path, a few ulp off (ll_delta 1e-5 measured: AVX2 kernels against an
    AVX-512 reference of the same weights)."""
    return tmp_path_factory.mktemp("kvlab-cache")


@pytest.fixture(scope="module")
def fp_runs(lm, own_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLAB_CACHE", str(own_cache))
        return {p: evaluate_choice(lm, "fp16", n=3, protocol=p, progress=False) for p in ("fake", "prefill-decode")}


# ----------------------------------------------------------------------------- cloze-wiki examples
def test_cloze_examples_are_deterministic_and_well_formed():
    a, b = examples("cloze-wiki", 30, seed=0), examples("cloze-wiki", 30, seed=0)
    assert a == b and examples("cloze-wiki", 10, seed=0) == a[:10]
    assert [e["id"] for e in examples("cloze-wiki", 30, seed=1)] != [e["id"] for e in a]
    docs = data.documents("wiki")
    labels = set()
    for e in a:
        i = int(e["id"].rsplit("-", 1)[1])
        assert i >= choice.CLOZE_FIRST_DOC
        assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4
        assert all(c.startswith(" ") and not c.startswith("  ") for c in e["choices"])
        doc = docs[i]
        assert doc.startswith(e["context"]) and len(choice._sentences(e["context"])) >= 2
        assert doc[len(e["context"]):].lstrip().startswith(e["choices"][e["label"]].lstrip())    # the true sentence
        for j, c in enumerate(e["choices"]):
            if j != e["label"]:
                assert c.strip() not in doc                                                  # from other articles
        labels.add(e["label"])
    assert labels == {0, 1, 2, 3}


def test_unknown_task_and_bad_n():
    with pytest.raises(KVLabError, match="cloze-wiki.*hellaswag.*piqa.*mathqa.*truthfulqa"):
        examples("winogrande", 5)
    for n in (0, -3, 2.5):
        with pytest.raises(KVLabError, match="positive int"):
            examples("cloze-wiki", n)
    with pytest.raises(KVLabError, match="has .* examples; ask for n <="):
        examples("cloze-wiki", 10**6)


# ----------------------------------------------------------------------------- online tasks on fake rows
FAKE_ROWS = {
    "hellaswag": [{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                   "ctx_b": "he", "label": "3",
                   "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing [title] on a roof.",
                               "is ripping level tiles off.", "is holding a rubik's cube."]}],
    "piqa": [{"goal": "How do I ready a guinea pig cage?", "sol1": "Provide hay.", "sol2": "Provide sand.",
              "label": 0}],
    "mathqa": [{"Problem": "what is 6 + 32 ?", "correct": "a",
                "options": "a ) 38 , b ) 27.675 , c ) 1,500 , d ) data inadequate , e ) none"}],
    "truthfulqa": [{"question": "What is the capital of France?",
                    "mc1_targets": {"choices": ["Lyon.", "Paris.", "Nice."], "labels": [0, 1, 0]}}],
}


@pytest.mark.parametrize("task", list(FAKE_ROWS))
def test_online_task_conversion(monkeypatch, task):
    monkeypatch.setattr(choice, "_load_rows", lambda t: FAKE_ROWS[t])
    (e,) = examples(task, 1)
    assert e["id"].startswith(task) and all(c.startswith(" ") for c in e["choices"])
    if task == "hellaswag":
        assert e["context"] == "Roof shingle removal: A man is sitting on a roof. He"
        assert e["choices"][1] == " starts pulling up roofing. on a roof." and e["label"] == 3
    elif task == "piqa":
        assert e["context"] == "Question: How do I ready a guinea pig cage?\nAnswer:"
        assert e["choices"] == [" Provide hay.", " Provide sand."] and e["label"] == 0
    elif task == "mathqa":
        assert e["context"] == "Question: what is 6 + 32 ?\nAnswer:"
        assert e["choices"] == [" 38", " 27.675", " 1,500", " data inadequate", " none"] and e["label"] == 0
    else:
        assert e["context"].startswith("Q: What is human life expectancy") and e["context"].endswith(
            "\n\nQ: What is the capital of France?\nA:")
        assert e["choices"][e["label"]] == " Paris." and e["label"] == 1
    with pytest.raises(KVLabError, match="has 1 examples"):
        examples(task, 2)


def test_online_task_format_variants_and_bad_rows(monkeypatch):
    rows = {"mathqa": [{"Problem": "p", "options": "['a ) 38', 'b ) rs . 2 , 500', 'c ) 3', 'd ) 4', 'e ) 5']",
                        "correct": "b"}],
            "truthfulqa": [{"question": "q", "mc1_targets": {"choices": ["x", "y"], "labels": [0, 0]}}]}
    monkeypatch.setattr(choice, "_load_rows", lambda t: rows[t])
    (e,) = examples("mathqa", 1)
    assert e["choices"] == [" 38", " rs . 2 , 500", " 3", " 4", " 5"] and e["label"] == 1
    with pytest.raises(KVLabError, match="truthfulqa-0 .* label outside"):
        examples("truthfulqa", 1)


def test_missing_datasets_and_offline_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)      # `import datasets` raises ImportError
    with pytest.raises(KVLabError, match="pip install datasets"):
        examples("piqa", 5)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'ybisk/piqa' on the Hub (LocalEntryNotFoundError)")

    fake = types.ModuleType("datasets")
    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(KVLabError) as err:
        examples("hellaswag", 5)
    msg = str(err.value)
    assert "offline" in msg and "cloze-wiki" in msg and "hellaswag" in msg and "ConnectionError" in msg


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("protocol", ["fake", "prefill-decode"])
def test_fp16_logliks_equal_a_plain_forward(lm, fp_runs, protocol):
    res = fp_runs[protocol]
    m = res.metrics
    # exact: fp16 runs the bare model's kernels, and its reference was computed in this process (own_cache)
    assert m["agree_fp"] == 1.0 and m["ll_delta"] == 0.0 and m["n_examples"] == 3
    assert m["data"] == choice.data_key("cloze-wiki", 3, 0) == "choice:cloze-wiki:n=3,seed=0"
    assert m["method"] == m["label"] == "fp16"
    for ex, got, fp in zip(examples("cloze-wiki", 3), res.details["loglik"], res.details["loglik_fp"]):
        want = _plain_logliks(lm, ex)
        assert got == fp
        # an independent forward (no cache, other shapes): fp32 log-probs of 50-130 choice tokens summed
        # to -190 .. -720, so rounding scales with the sum (worst case n * 1.2e-7 ~ 1e-5 relative; 6e-5
        # absolute = 1 ulp of 720 measured in prefill-decode). A wrong token moves the sum by nats.
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4), (got, want)
    d = res.details
    assert (d["pred"] == d["pred_fp"]).all() and (d["correct"] == (d["pred"] == d["label"])).all()
    assert m["acc"] == d["correct"].mean()


def test_harsh_method_changes_logliks(lm, fp_runs, own_cache, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(own_cache))       # the references fp_runs computed
    for protocol in ("fake", "prefill-decode"):
        m = evaluate_choice(lm, "int:bits=2", n=3, protocol=protocol, progress=False)
        assert m.metrics["ll_delta"] > 1e-3 and m.metrics["avg_bits"] < 16     # measured 0.50 / 0.23
        # exact: the stored reference read back, equal to the fp16 run (same process, same kernels)
        assert m.details["loglik_fp"].tolist() == fp_runs[protocol].details["loglik"].tolist()


def test_ci_contains_acc_and_narrows_with_n(lm, fp_runs):
    small = fp_runs["fake"].metrics
    large = evaluate_choice(lm, "fp16", n=12, progress=False).metrics
    for m in (small, large):
        assert 0 <= m["acc_ci_low"] <= m["acc"] <= m["acc_ci_high"] <= 1
    assert large["acc_ci_high"] - large["acc_ci_low"] < small["acc_ci_high"] - small["acc_ci_low"]


def test_reference_is_cached_on_disk(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    calls = []
    real = choice._all_logliks

    def spy(lm_, method, *a, **k):
        calls.append(method)
        return real(lm_, method, *a, **k)

    monkeypatch.setattr(choice, "_all_logliks", spy)
    first = evaluate_choice(lm, "fp16", n=2, progress=False)
    assert calls.count(None) == 1 and list(tmp_path.glob("reference/*.pt"))
    second = evaluate_choice(lm, "int4", n=2, progress=False)
    assert calls.count(None) == 1                                     # same (model, task data, protocol)
    assert second.details["loglik_fp"].tolist() == first.details["loglik_fp"].tolist()
    evaluate_choice(lm, "fp16", n=2, protocol="prefill-decode", progress=False)
    assert calls.count(None) == 2                                     # another protocol: its own reference


def test_bad_inputs(lm):
    with pytest.raises(KVLabError, match="protocol must be one of"):
        evaluate_choice(lm, "fp16", n=2, protocol="teacher", progress=False)
    with pytest.raises(KVLabError):
        evaluate_choice(lm, "int:bits=11", n=2, progress=False)
    with pytest.raises(KVLabError, match="positive int"):
        evaluate_choice(lm, "fp16", n=0, progress=False)


def test_hf_cache_comparator_is_prefill_decode_only(lm, monkeypatch):
    pytest.importorskip("optimum.quanto")
    with pytest.raises(KVLabError, match="prefill-decode"):
        evaluate_choice(lm, "hf-quanto-int4", n=2, protocol="fake", progress=False)
    # quanto's per-token groups of 64 need heads * tokens * head_dim (2 * T * 16 here) divisible by 64: even T
    exs = examples("cloze-wiki", 2)
    for e in exs:
        while len(lm.tokenizer.encode(e["context"])) % 2:
            e["context"] = e["context"][1:]
    monkeypatch.setattr(choice, "examples", lambda task, n, seed: exs)
    res = evaluate_choice(lm, "hf-quanto-int4", n=2, protocol="prefill-decode", progress=False)
    assert res.metrics["ll_delta"] > 0 and res.metrics["avg_bits"] < 16      # measured 0.010


def test_run_task_writes_the_store_and_reads_it_back(lm, tmp_path):
    store = Store(tmp_path / "results.sqlite")
    df = kvlab.run_task(lm, "cloze-wiki", ["fp16", "int:bits=2"], n=2, store=store, progress=False)
    assert not df["cached"].any()
    assert list(df["method"]) == ["fp16", "int:bits=2"] and list(df["label"]) == ["fp16", "int:bits=2"]
    got = store.load()
    assert set(got["method"]) == {"fp16", "int:bits=2"} and set(got["data"]) == {"choice:cloze-wiki:n=2,seed=0"}
    acc = got[got["metric"] == "acc"].set_index("method")["value"]
    assert acc["fp16"] == df.set_index("method").loc["fp16", "acc"]
    assert {"acc", "acc_norm", "acc_ci_low", "acc_ci_high", "agree_fp", "ll_delta", "n_examples"} <= set(got["metric"])
    assert (got["task"] == "cloze-wiki").all() and (got["n"] == 2).all()
    again = kvlab.run_task(lm, "cloze-wiki", ["fp16", "int:bits=2"], n=2, store=store, progress=False)
    assert again["cached"].all() and list(again["acc"]) == list(df["acc"])   # read back, not recomputed


# ----------------------------------------------------------------------------- embedded model
@pytest.mark.integration
def test_embedded_model_beats_chance_on_cloze_wiki(embedded, tmp_path, monkeypatch):
    # measured (fp32, 2 threads, idle 2-core machine): acc 0.68 [0.54, 0.79], acc_norm 0.70, chance 0.25;
    # 53 s (two passes over 200 sequences). The fp reference is computed here, not read from the shared
    # cache: agree_fp and ll_delta are compared exactly, which holds only for a reference computed by
    # this process's kernels (a cached one from another machine or BLAS path is a few ulp off)
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))         # after `embedded` is loaded from the cache
    m = evaluate_choice(embedded, "fp16", n=50, progress=False).metrics
    assert m["acc_ci_low"] > 0.4 and m["acc"] >= 0.55 and m["acc_norm"] >= 0.55
    assert m["agree_fp"] == 1.0 and m["ll_delta"] == 0.0 and m["n_examples"] == 50
