"""The one compare loop: every task, every method, with the results store in front of it.

    from kvlab.tasks import run_task
    df = run_task(lm, "cloze-wiki", ["fp16", "int4", "kivi-2"], n=100, store=Store())
    df = run_task(lm, Perplexity(EvalSpec(n_tokens=2048, window=512)), ["fp16", "int4"], store=store)

A task is a small frozen dataclass that owns what it evaluates on and how its results are stored:
`key` (the store's `data` column), `config` (one store column per field), `required` (the metrics
whose presence in the store means "already computed": the one rule, `Store.get_result`) and
`evaluate(lm, method)`. `task_spec(name, protocol, **options)` builds one from a name:

| task                                               | evaluator            | default protocol | required        |
|----------------------------------------------------|----------------------|------------------|-----------------|
| `ppl` (perplexity, KL, top-1 on `data`)            | `kvlab.evaluate`     | fake             | ppl, kl, top1   |
| `cloze-wiki`, `hellaswag`, `piqa`, `mathqa`, `truthfulqa` (multiple choice) | `kvlab.choice.evaluate_choice` | fake | acc |
| `lead-wiki`, `xsum` (one-sentence summaries, ROUGE) | `kvlab.summarize.evaluate_summaries` | prefill-decode | rougeL |
| `passkey` (retrieval over context length x depth)  | `kvlab.retrieval.passkey_accuracy` | prefill-decode | passkey_exact |
| `lm-eval:<task>` (any lm-evaluation-harness task, e.g. `lm-eval:cloze-wiki`) | `kvlab.lmeval.evaluate_lmeval` | fake | n_examples |

With a store, a method whose required metrics are stored for (model, task key, method, protocol)
is read back instead of recomputed, so a notebook or sweep re-run costs nothing; new results are
written as each method finishes (one transaction each, `Store.put_result`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from .errors import KVLabError
from .evaluation import METRICS, EvalSpec
from .models import LoadedModel
from .quant.base import Method
from .quant.registry import parse

CHOICE_TASKS = ("cloze-wiki", "hellaswag", "piqa", "mathqa", "truthfulqa")
SUMMARY_TASKS = ("lead-wiki", "xsum")
TASKS = ("ppl", *CHOICE_TASKS, *SUMMARY_TASKS, "passkey")
LMEVAL_PREFIX = "lm-eval:"        # `lm-eval:<task>`: an lm-evaluation-harness task through kvlab.lmeval


@dataclass(frozen=True)
class Task:
    """What a method is evaluated on, and how its result is keyed in the store."""

    kind: ClassVar[str] = "base"
    required: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...] | None] = None       # metrics written (None: every number)
    protocol: str = field(default="fake", kw_only=True)

    @property
    def key(self) -> str:
        raise NotImplementedError

    @property
    def config(self) -> dict:
        raise NotImplementedError

    def evaluate(self, lm: LoadedModel, method: Method, progress: bool = True) -> dict:
        """The metrics of one method (a dict with model, data, method, protocol and numbers)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity, KL and top-1 agreement with the fp model on corpus windows (`kvlab.evaluate`)."""

    kind: ClassVar[str] = "ppl"
    stored: ClassVar[tuple[str, ...] | None] = METRICS
    spec: EvalSpec = field(default_factory=EvalSpec)
    # how the run stores the cache, not what is evaluated (neither changes a logit, neither is in the key):
    # `measure_bytes` packs every stored span to measure its bytes; `pack` (prefill-decode / decode) keeps
    # the cache packed between calls and measures what it holds (`kvlab.evaluate`)
    measure_bytes: bool = field(default=False, kw_only=True)
    pack: bool = field(default=False, kw_only=True)

    def __post_init__(self):
        if not isinstance(self.spec, EvalSpec):
            raise KVLabError(f"Perplexity takes an EvalSpec, got {type(self.spec).__name__}")
        object.__setattr__(self, "protocol", self.spec.protocol)   # the spec's protocol is the task's
        if self.pack and self.spec.protocol == "fake":
            raise KVLabError("pack=True keeps a cache packed between calls, and the fake protocol keeps no cache: "
                             "use protocol prefill-decode or decode, or measure_bytes=True to measure the packed "
                             "bytes in fake")

    @property
    def required(self) -> tuple[str, ...]:
        """The quality metrics; with measured bytes asked for, also those (never stored: such a run always runs)."""
        return ("ppl", "kl", "top1") + (("avg_bits_measured",) if self.measure_bytes or self.pack else ())

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def config(self) -> dict:
        s = self.spec
        return {"n_tokens": s.n_tokens, "window": s.window, "stride": s.stride, "prefill": s.prefill, "corpus": s.data,
                **({"decode_chunk": s.decode_chunk} if s.protocol == "decode" else {})}

    def evaluate(self, lm, method, progress=True) -> dict:
        from .evaluation import evaluate
        result = evaluate(lm, method, self.spec, progress=progress, measure_bytes=self.measure_bytes, pack=self.pack)
        return {**result.metrics, "trace": result.trace}


@dataclass(frozen=True)
class Choice(Task):
    """Multiple-choice log-likelihood accuracy (`kvlab.choice`)."""

    kind: ClassVar[str] = "choice"
    required: ClassVar[tuple[str, ...]] = ("acc",)
    task: str = "cloze-wiki"
    n: int | None = 100
    seed: int = 0

    @property
    def key(self) -> str:
        from .choice import data_key
        return data_key(self.task, self.n, self.seed)

    @property
    def config(self) -> dict:
        return {"task": self.task, "n": self.n, "seed": self.seed}

    def evaluate(self, lm, method, progress=True) -> dict:
        from .choice import evaluate_choice
        return evaluate_choice(lm, method, task=self.task, n=self.n, seed=self.seed, protocol=self.protocol,
                               progress=progress).metrics


@dataclass(frozen=True)
class Summary(Task):
    """One-sentence summaries scored with ROUGE against the reference and the fp model (`kvlab.summarize`)."""

    kind: ClassVar[str] = "summary"
    required: ClassVar[tuple[str, ...]] = ("rougeL",)
    protocol: str = field(default="prefill-decode", kw_only=True)
    task: str = "lead-wiki"
    n: int | None = 50
    seed: int = 0
    n_shot: int = 0
    max_new_tokens: int = 64
    max_context_tokens: int = 512
    template: str = "kvlab"
    batch_size: int = 16

    @property
    def key(self) -> str:
        from .summarize import data_key
        return data_key(self.task, self.n, self.seed, self.n_shot, self.max_context_tokens, self.max_new_tokens,
                        self.template)

    @property
    def config(self) -> dict:
        return {"task": self.task, "n": self.n, "seed": self.seed, "n_shot": self.n_shot,
                "max_new_tokens": self.max_new_tokens, "max_context_tokens": self.max_context_tokens,
                "template": self.template}

    def evaluate(self, lm, method, progress=True) -> dict:
        from .summarize import evaluate_summaries
        return evaluate_summaries(lm, method, task=self.task, n=self.n, seed=self.seed, n_shot=self.n_shot,
                                  max_new_tokens=self.max_new_tokens, protocol=self.protocol, progress=progress,
                                  max_context_tokens=self.max_context_tokens, template=self.template,
                                  batch_size=self.batch_size).metrics


@dataclass(frozen=True)
class Passkey(Task):
    """Passkey retrieval accuracy over a (context length x needle depth) grid (`kvlab.retrieval`)."""

    kind: ClassVar[str] = "passkey"
    required: ClassVar[tuple[str, ...]] = ("passkey_exact",)
    protocol: str = field(default="prefill-decode", kw_only=True)
    context_lengths: tuple[int, ...] = (512, 1024)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_per_cell: int = 1
    seed: int = 0
    haystack: str = "paulgraham"

    @property
    def key(self) -> str:
        ctx = "+".join(map(str, self.context_lengths))
        depth = "+".join(f"{d:g}" for d in self.depths)
        return f"passkey:{self.haystack}:ctx={ctx},depth={depth},n={self.n_per_cell},seed={self.seed}"

    @property
    def config(self) -> dict:
        return {"context_lengths": list(self.context_lengths), "depths": list(self.depths),
                "n_per_cell": self.n_per_cell, "seed": self.seed, "corpus": self.haystack}

    def evaluate(self, lm, method, progress=True) -> dict:
        from .retrieval import passkey_accuracy
        df = passkey_accuracy(lm, method, self.context_lengths, self.depths, n_per_cell=self.n_per_cell,
                              seed=self.seed, protocol=self.protocol, haystack=self.haystack, progress=progress)
        return {"model": lm.model_id, "data": self.key, "method": method.spec, "protocol": self.protocol,
                "passkey_exact": float(df["exact"].mean()), "passkey_digits": float(df["digits"].mean()),
                "n_examples": int(len(df))}


@dataclass(frozen=True)
class LMEval(Task):
    """An lm-evaluation-harness task run through the bridge (`kvlab.lmeval`): its metrics as lm-eval
    reports them (`acc,none` -> `acc`, other filters as `metric:filter`, subtasks as `subtask/metric`),
    n_examples, avg_bits (log-likelihood requests) and seconds. `n` is lm-eval's `limit` (the first n
    documents; None: all), `num_fewshot` None keeps the task's default. The store key names the
    lm-eval version, whose task definitions the numbers depend on."""

    kind: ClassVar[str] = "lmeval"
    required: ClassVar[tuple[str, ...]] = ("n_examples",)
    task: str = "cloze-wiki"
    n: int | None = None
    num_fewshot: int | None = None

    def __post_init__(self):
        from .lmeval import check_tasks
        if self.n is not None and (not isinstance(self.n, int) or self.n < 1):
            raise KVLabError(f"n must be a positive int (or None for the whole task), got {self.n!r}")
        from .protocols import PROTOCOLS
        if self.protocol not in PROTOCOLS:
            raise KVLabError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        check_tasks([self.task])      # lm-eval missing or an unknown task: before any model work

    @property
    def version(self) -> str:
        from .lmeval import require
        return require()

    @property
    def key(self) -> str:
        shots = "default" if self.num_fewshot is None else self.num_fewshot
        return f"{LMEVAL_PREFIX}{self.task}:n={self.n or 'all'},fewshot={shots},v={self.version}"

    @property
    def config(self) -> dict:
        return {"task": self.task, "n": self.n, "num_fewshot": self.num_fewshot, "lm_eval": self.version}

    def evaluate(self, lm, method, progress=True) -> dict:
        from .lmeval import evaluate_lmeval
        return evaluate_lmeval(lm, method, self.task, protocol=self.protocol, limit=self.n,
                               num_fewshot=self.num_fewshot, key=self.key, progress=progress)


DEFAULT_PROTOCOL = {"ppl": "fake", "choice": "fake", "summary": "prefill-decode", "passkey": "prefill-decode",
                    "lmeval": "fake"}
_CLASSES = {"ppl": Perplexity, "choice": Choice, "summary": Summary, "passkey": Passkey, "lmeval": LMEval}
OPTIONS = {"ppl": tuple(f.name for f in dataclasses.fields(EvalSpec) if f.name != "protocol") + ("measure_bytes", "pack"),
           "choice": ("n", "seed"),
           "summary": ("n", "seed", "n_shot", "max_new_tokens", "max_context_tokens", "template", "batch_size"),
           "passkey": ("context_lengths", "depths", "n_per_cell", "seed", "haystack"),
           "lmeval": ("n", "num_fewshot")}


def task_kind(task: str) -> str:
    """"ppl", "choice", "summary", "passkey" or "lmeval" (`lm-eval:<task>`); a KVLabError listing the tasks
    for an unknown name."""
    if isinstance(task, str) and task.startswith(LMEVAL_PREFIX):
        if not task[len(LMEVAL_PREFIX):]:
            raise KVLabError(f"name the lm-eval task after '{LMEVAL_PREFIX}', e.g. {LMEVAL_PREFIX}cloze-wiki")
        return "lmeval"
    if task in ("ppl", "passkey"):
        return task
    if task in CHOICE_TASKS:
        return "choice"
    if task in SUMMARY_TASKS:
        return "summary"
    raise KVLabError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}, or {LMEVAL_PREFIX}<task> for any "
                     "lm-evaluation-harness task (e.g. lm-eval:cloze-wiki; needs the lmeval extra)")


def task_spec(task: str | Task, protocol: str | None = None, **options: Any) -> Task:
    """A `Task` from a name and its options (a `Task` is returned as it is)."""
    if isinstance(task, Task):
        if protocol is not None and protocol != task.protocol or options:
            raise KVLabError("pass a Task object alone: its protocol and options are its fields")
        return task
    kind = task_kind(task)
    bad = [k for k in options if k not in OPTIONS[kind]]
    if bad:
        raise KVLabError(f"task {task!r} takes no option {', '.join(map(repr, bad))}; its options: "
                         f"{', '.join(OPTIONS[kind])}")
    protocol = protocol or DEFAULT_PROTOCOL[kind]
    if kind == "ppl":
        run = {k: options.pop(k) for k in ("measure_bytes", "pack") if k in options}
        return Perplexity(spec=EvalSpec(protocol=protocol, **options), **run)
    if kind == "passkey":
        options = {k: tuple(v) if k in ("context_lengths", "depths") else v for k, v in options.items()}
        return Passkey(protocol=protocol, **options)
    if kind == "lmeval":
        return LMEval(protocol=protocol, task=task[len(LMEVAL_PREFIX):], **options)
    return _CLASSES[kind](protocol=protocol, task=task, **options)


def run_task(lm: LoadedModel, task: str | Task, methods: Iterable[Method | str], store=None,
             protocol: str | None = None, progress: bool = True, recompute: bool = False, **options: Any):
    """Evaluate `methods` on `task`; one DataFrame row per method: its metrics, `label` (the spec as
    given) and `cached` (read from the store). Every spec is parsed before any model work. Perplexity
    rows also carry `trace`, the per-position / per-step dict of `kvlab.evaluate` (stored beside the
    metrics, `Store.get_trace`).

    `task` is a name (options as keyword arguments: `ppl` takes `EvalSpec` fields; multiple choice n,
    seed; summaries n, seed, n_shot, max_new_tokens, max_context_tokens, template, batch_size;
    passkey context_lengths, depths, n_per_cell, seed, haystack; `lm-eval:<task>` n, num_fewshot) or a `Task`. With `store`, stored
    results are read back unless `recompute=True`, and new ones are written as each method finishes.
    """
    import pandas as pd

    spec = task_spec(task, protocol, **options)
    methods = list(methods)
    if not methods:
        raise KVLabError("run_task needs at least one method, e.g. ['fp16', 'int4']")
    parsed = [parse(m) for m in methods]         # an invalid spec fails before any model work
    rows = []
    for given, method in zip(methods, parsed):
        label = given if isinstance(given, str) else method.spec
        hit = None if store is None or recompute else store.get_result(
            lm.model_id, spec.key, method.spec, spec.protocol, spec.required)
        if hit is not None:
            trace = store.get_trace(lm.model_id, spec.key, method.spec, spec.protocol)
            rows.append({"model": lm.model_id, "data": spec.key, "method": method.spec, "protocol": spec.protocol,
                         **hit, **({"trace": trace} if trace is not None else {}), "label": label, "cached": True})
            continue
        metrics = dict(spec.evaluate(lm, method, progress=progress))
        if store is not None:
            store.put_result(lm.model_id, spec.key, method.spec, spec.protocol, metrics, spec.config,
                             names=spec.stored)
            if metrics.get("trace"):
                store.put_trace(lm.model_id, spec.key, method.spec, spec.protocol, metrics["trace"], spec.config)
        rows.append({**metrics, "label": label, "cached": False})
    return pd.DataFrame(rows)


def compare(lm: LoadedModel, methods: Iterable[Method | str], spec: EvalSpec | None = None, progress: bool = True,
            store=None, **spec_kwargs: Any):
    """`kvlab.compare`: the perplexity task for several methods on the same windows (`run_task` with
    `Perplexity(spec)`); one DataFrame row per method."""
    return run_task(lm, Perplexity(EvalSpec.from_args(spec, spec_kwargs)), methods, store=store, progress=progress)
