"""The lm-evaluation-harness bridge: kvlab as an lm-eval model, so any lm-eval task runs under any
kvlab method and protocol (optional extra: `pip install -e ".[lmeval]"`, lm-eval 0.4.13).

    python -m kvlab.lmeval --model kvlab --model_args pretrained=smollm2-135m,method=kivi-2,protocol=decode \\
        --tasks cloze-wiki --limit 100            # lm_eval's own command line, kvlab registered first
    kvlab eval --task lm-eval:cloze-wiki --method fp16 --method kivi-2 --n 100    # the results store in front

    import lm_eval, kvlab.lmeval                  # importing kvlab.lmeval registers the model "kvlab"
    lm_eval.simple_evaluate(model="kvlab", model_args={"pretrained": "tiny-llama", "method": "int4"},
                            tasks=["cloze-wiki"], task_manager=kvlab.lmeval.task_manager())

How lm-eval finds the model: lm-eval 0.4.13 looks a `--model` name up in its own registry and has no
plugin discovery (no entry-point group; `--include_path` adds task YAMLs, and the `!function`s of
a task are imported only after the model was looked up), so the plain `lm_eval --model kvlab`
cannot find a third-party model. `python -m kvlab.lmeval ARGS` is lm_eval's command line with this
module imported first (`register_model("kvlab")` runs on import) and kvlab's task folder
(`kvlab/lmeval_tasks/`, the offline `cloze-wiki`) passed as `--include_path` unless one is given.
In Python, `import kvlab.lmeval` before `lm_eval.simple_evaluate(model="kvlab", ...)` is enough.

model_args: `pretrained` (a kvlab model name, HF id or folder; default smollm2-135m), `method` (a
spec or preset, default fp16; a spec with commas is quoted, `method='int:bits=4,group=128'`, or
written with `;`), `protocol` (fake (default), prefill-decode, decode), `device`, `dtype`,
`max_length` (default: the model's max_position_embeddings), `max_gen_toks` (default 256).

What each request does (the protocols keep their meaning, docs/design.md section 3):
* `loglikelihood(context, continuation)`: lm-eval's token split (trailing context whitespace moves to
  the continuation, the pair is tokenised whole), then `kvlab.choice.continuation_logits`, the same
  scoring `kvlab.choice` uses: fake scores context + continuation in one teacher-forced forward;
  prefill-decode stores the context under the method and scores the continuation against that cache in
  one call; decode scores it one token per forward. Each request is its own unpadded sequence, all of
  one call inside one `kvlab.quantize` session, so the numbers equal `kvlab.choice`'s exactly.
* `loglikelihood_rolling(text)`: lm-eval's rolling windows (`max_length`), each a (context,
  continuation) pair scored as above.
* `generate_until(context, gen_kwargs)`: greedy decoding, token by token, with
  `kvlab.retrieval.generate` under the method and protocol; `max_gen_toks` tokens are generated and
  the text is cut at the first EOS token and the first `until` string (greedy tokens do not depend on
  later ones, so this equals stopping early). Sampling (`do_sample=True`) is refused.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .errors import KVLabError

__all__ = ["LM_EVAL_VERSION", "TASKS_DIR", "INSTALL_HINT", "KVLabLM", "require", "task_manager", "run",
           "flatten_results", "evaluate_lmeval", "kvlab_tasks", "check_tasks", "cloze_wiki_jsonl", "cloze_wiki_dataset", "main"]

LM_EVAL_VERSION = "0.4.13"          # the version the bridge is written and tested against (pyproject's extra)
TASKS_DIR = Path(__file__).resolve().parent / "lmeval_tasks"
INSTALL_HINT = 'pip install -e ".[lmeval]" (or pip install lm-eval==0.4.13)'
MODEL_ARGS = ("pretrained", "method", "protocol", "device", "dtype", "max_length", "max_gen_toks", "lm",
              "progress", "batch_size", "max_batch_size")

try:                                 # the base class; without lm-eval the class exists but refuses to build
    from lm_eval.api.model import LM as _LMBase
except ImportError:                  # pragma: no cover - exercised through require()
    _LMBase = object


def require(what: str = "the lm-eval bridge (kvlab.lmeval)") -> str:
    """lm-eval's version, or a KVLabError naming the install command when it is not installed."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise KVLabError(f"{what} needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


# ----------------------------------------------------------------------------- the model
class KVLabLM(_LMBase):
    """lm-eval's `LM` interface over a kvlab model, a method and a protocol (see the module docstring).

    `lm` takes an already loaded `kvlab.LoadedModel` (then `pretrained`, `device`, `dtype` are unused).
    `batch_size` / `max_batch_size` are accepted and ignored: every request is its own unpadded sequence.
    """

    def __init__(self, pretrained: str = "smollm2-135m", method: Any = "fp16", protocol: str = "fake",
                 device: str | None = None, dtype: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, lm: Any = None, progress: bool = True, batch_size: Any = None,
                 max_batch_size: Any = None, **unknown: Any) -> None:
        require()
        super().__init__()
        from .calibration import TASK_TOKENS, calibrate
        from .protocols import PROTOCOLS, check_protocol
        from .quant.registry import parse

        if unknown:
            raise KVLabError(f"kvlab lm-eval model: unknown model_args {', '.join(map(repr, sorted(unknown)))}; "
                             f"accepted: {', '.join(MODEL_ARGS[:8])}. A method spec with commas must be quoted "
                             "(method='int:bits=4,group=128') or written with ';' (method=int:bits=4;group=128), "
                             "since lm-eval splits model_args at commas")
        from .quant.base import Method
        if not isinstance(method, Method):
            method = str(method).replace(";", ",")
        try:
            self.method = parse(method)
        except KVLabError as exc:
            raise KVLabError(f"kvlab lm-eval model: method={method!r}: {exc}") from None
        if protocol not in PROTOCOLS:
            raise KVLabError(f"kvlab lm-eval model: unknown protocol {protocol!r}; use protocol= one of "
                             f"{', '.join(PROTOCOLS)}")
        check_protocol(self.method, protocol)      # e.g. HF QuantizedCache comparators refuse fake
        self.protocol = protocol
        if lm is None:
            from .models import load
            lm = load(str(pretrained), device=device, dtype=dtype)
        if lm.tokenizer is None:
            raise KVLabError("the kvlab lm-eval model needs a model with a tokenizer")
        self.lm = lm
        self._device = lm.device
        self.method = calibrate(lm, self.method, n_tokens=TASK_TOKENS)   # as kvlab.choice does; no-op if none
        self.max_length = int(max_length or lm.max_context)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = bool(progress)
        self.bits: list[tuple[float, int]] = []    # (avg_bits of a loglikelihood session, its requests)

    # -- helpers
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "name_or_path", self.lm.name)).replace("/", "__")

    @property
    def prefix_token_id(self) -> int:
        tok = self.lm.tokenizer
        for tid in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
            if tid is not None:
                return int(tid)
        return 0

    @property
    def avg_bits(self) -> float | None:
        """Average stored bits per K/V element over the log-likelihood requests scored so far (None: none)."""
        n = sum(k for _, k in self.bits)
        return sum(b * k for b, k in self.bits) / n if n else None

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.lm.device)

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's (TemplateLM) split, with kvlab.choice's tokenisation; the context is cut from the left
        so that context + continuation fit `max_length + 1` tokens, as lm-eval's HF model does."""
        from .choice import _encode_pair
        from .data import _encode

        if context == "":
            cont = _encode(self.lm.tokenizer, continuation)
            ctx, cont = ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        else:
            ctx, cont = _encode_pair(self.lm.tokenizer, context, continuation)
        if not cont:
            raise KVLabError(f"empty continuation after tokenisation: {continuation!r}")
        if len(cont) > self.max_length:
            raise KVLabError(f"a continuation of {len(cont)} tokens is longer than max_length={self.max_length}")
        return ctx[max(0, len(ctx) + len(cont) - self.max_length - 1):], cont

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of every (context ids, continuation ids) in one quantize session."""
        from tqdm.auto import tqdm

        from .choice import continuation_logits
        from .hooks import quantize

        out = []
        with quantize(self.lm.model, self.method, protocol=self.protocol) as run:
            for ctx, cont in tqdm(pairs, desc=desc, disable=not self.progress, leave=False):
                c = self._tensor(cont)
                logp = continuation_logits(self.lm, self._tensor(ctx), c, self.protocol).float().log_softmax(-1)
                ll = logp.gather(-1, c[..., None]).sum()
                out.append((float(ll), bool((logp.argmax(-1) == c).all())))
        if pairs:
            self.bits.append((float(run.summary()["avg_bits"]), len(pairs)))
        return out

    # -- lm-eval's interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [r.args for r in requests]
        out = self._score([self._encode(c, t) for c, t in args], f"{self.method.spec} loglikelihood")
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from .data import _encode

        out = []
        for req in requests:
            (text,) = req.args[:1]
            tokens = _encode(self.lm.tokenizer, text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._score(windows, f"{self.method.spec} rolling"))
            out.append(float(total))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), float(total))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        from .data import _encode
        from .retrieval import generate

        out = []
        eos = getattr(self.lm.tokenizer, "eos_token_id", None)
        for req in tqdm(requests, desc=f"{self.method.spec} generate", disable=not self.progress, leave=False):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            if gen_kwargs.pop("do_sample", False):
                raise KVLabError("the kvlab lm-eval model decodes greedily; this task asks for do_sample=True")
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = _encode(self.lm.tokenizer, context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - n_new):]
            new = generate(self.lm, self.method, self._tensor(ids), n_new, protocol=self.protocol)[0].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            text = self.lm.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def _register() -> None:
    """`register_model("kvlab")`: run on import when lm-eval is installed."""
    if _LMBase is object:
        return
    from lm_eval.api.registry import model_registry, register_model

    if model_registry.get("kvlab", None) not in (None, KVLabLM):    # a reloaded module: the new class wins
        model_registry._objs.pop("kvlab", None)
    if "kvlab" not in model_registry:
        register_model("kvlab")(KVLabLM)


_register()


# ----------------------------------------------------------------------------- running tasks
def task_manager(include_path: str | Path | None = None, metadata: dict | None = None,
                 include_defaults: bool = True):
    """lm-eval's TaskManager with kvlab's task folder (and `include_path`, when given) added.
    `include_defaults=False` leaves lm-eval's own tasks out (indexing them takes ~10 s)."""
    require()
    if include_path is None and not metadata:
        return _task_manager(include_defaults)
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    return TaskManager(include_path=paths, metadata=metadata or {}, include_defaults=include_defaults)


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR)], include_defaults=include_defaults)


def kvlab_tasks() -> tuple[str, ...]:
    """The tasks kvlab ships for lm-eval (`kvlab/lmeval_tasks/*.yaml`)."""
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def check_tasks(tasks: list[str]):
    """The TaskManager that knows `tasks`, or a KVLabError naming the unknown ones (lm-eval missing: its
    install command). Only kvlab's own tasks: lm-eval's ~10 s index of its tasks is skipped."""
    require("lm-eval tasks")
    tm = task_manager(include_defaults=not set(tasks) <= set(kvlab_tasks()))
    missing = [t for t in tasks if not tm.match_tasks([t]) and not Path(t).exists()]
    if missing:
        raise KVLabError(f"unknown lm-eval task {', '.join(map(repr, missing))}: not one of lm-eval's tasks nor "
                         f"kvlab's ({', '.join(kvlab_tasks())}); `python -m kvlab.lmeval ls tasks` lists them")
    return tm


def run(lm, method: Any = "fp16", tasks: str | list[str] = "cloze-wiki", protocol: str = "fake",
        limit: int | None = None, num_fewshot: int | None = None, log_samples: bool = False,
        progress: bool = True, **model_args: Any) -> tuple[dict, KVLabLM]:
    """lm-eval's `simple_evaluate` on `tasks` with `lm` (a LoadedModel) under `method` and `protocol`.
    Returns (lm-eval's results dict, the bridge model)."""
    require()
    import lm_eval

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    tm = check_tasks(tasks)
    bridge = KVLabLM(lm=lm, method=method, protocol=protocol, progress=progress, **model_args)
    results = lm_eval.simple_evaluate(model=bridge, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      log_samples=log_samples, task_manager=tm, verbosity="WARNING")
    return results, bridge


def flatten_results(results: dict, task: str) -> dict[str, float]:
    """lm-eval's per-task metrics as one flat dict: `acc,none` -> `acc`, `exact_match,strict-match` ->
    `exact_match:strict-match`; subtasks of a group prefixed `subtask/`; non-numbers (stderr "N/A") dropped."""
    out: dict[str, float] = {}
    for name, metrics in results.get("results", {}).items():
        prefix = "" if name == task else f"{name}/"
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            out[prefix + (metric if filt in ("", "none") else f"{metric}:{filt}")] = float(value)
    return out


def evaluate_lmeval(lm, method: Any, task: str, protocol: str = "fake", limit: int | None = None,
                    num_fewshot: int | None = None, key: str | None = None, progress: bool = True) -> dict:
    """One results-store row for lm-eval task `task` (what `kvlab.tasks.LMEval` stores): the flattened
    metrics, n_examples (documents evaluated), avg_bits (log-likelihood requests; absent for generation
    only), seconds, and model / data / method / protocol."""
    t0 = time.perf_counter()
    results, bridge = run(lm, method, task, protocol=protocol, limit=limit, num_fewshot=num_fewshot,
                          progress=progress)
    n = sum(int(v.get("effective", 0)) for v in results.get("n-samples", {}).values())
    row = {"model": lm.model_id, "data": key or f"lm-eval:{task}", "method": bridge.method.spec,
           "protocol": protocol, **flatten_results(results, task), "n_examples": n}
    if bridge.avg_bits is not None:
        row["avg_bits"] = bridge.avg_bits
    row["seconds"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- cloze-wiki as an lm-eval task
def cloze_wiki_jsonl(seed: int = 0) -> Path:
    """Every `cloze-wiki` example of `seed` (`kvlab.choice.cloze_wiki`) as a jsonl file, one
    {"id", "context", "choices", "label"} per line, written once under the kvlab cache (`lmeval/`,
    named by its content digest; a temporary folder when the cache is read-only)."""
    from .choice import cloze_wiki
    from .paths import atomic_write, cache_dir, write_problem

    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in cloze_wiki(seed)).encode()
    folder = cache_dir("lmeval")
    if write_problem(folder) is not None:
        folder = Path(tempfile.gettempdir()) / "kvlab-lmeval"
    path = folder / f"cloze-wiki-seed{seed}-{hashlib.sha256(text).hexdigest()[:16]}.jsonl"
    if not path.exists():
        atomic_write(path, lambda fh: fh.write(text), "the cloze-wiki lm-eval task")
    return path


def cloze_wiki_dataset(cloze_seed: int = 0, **_: Any):
    """The `custom_dataset` of `kvlab/lmeval_tasks/cloze-wiki.yaml`: {"test": the jsonl as a Dataset}.
    lm-eval passes its metadata (the model_args and `--metadata`) as keyword arguments; `cloze_seed`
    (`--metadata '{"cloze_seed": 1}'`) picks another seed."""
    import datasets

    path = cloze_wiki_jsonl(int(cloze_seed))
    # datasets' arrow copy goes beside the jsonl (the kvlab cache), not to ~/.cache/huggingface
    return {"test": datasets.load_dataset("json", data_files=str(path), split="train",
                                          cache_dir=str(path.parent / "hf-datasets"))}


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """`python -m kvlab.lmeval ARGS`: lm_eval's command line with the model `kvlab` registered, kvlab's
    task folder as `--include_path` and `--device` cuda when there is a GPU, else cpu (unless ARGS name
    them; lm-eval's own default device is cuda:0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        require("python -m kvlab.lmeval")
    except KVLabError as exc:
        print(f"kvlab: error: {exc}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    from .threads import configured_threads, pin_threads
    if configured_threads() is not None:
        pin_threads()
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in argv)  # noqa: E731
    if argv and argv[0] not in ("-h", "--help"):
        if not given("--include_path"):
            argv += ["--include_path", str(TASKS_DIR)]
        if argv[0] not in ("ls", "validate") and not given("--device"):
            # lm-eval's run defaults to cuda:0; kvlab's default is the GPU when there is one, else the CPU
            argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except KVLabError as exc:
        print(f"kvlab: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":          # run the importable module, so the registered class is kvlab.lmeval's
    from kvlab.lmeval import main as _main
    sys.exit(_main())
