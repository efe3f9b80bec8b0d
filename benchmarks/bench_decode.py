"""Decode overhead on the embedded model: per-token time and peak memory against a bare DynamicCache loop.

The deployed regime of the `decode` protocol (docs/design.md sections 3 and 7): prefill `--prefill`
wiki tokens (not timed; `logits_to_keep=1`, as a decoder needs only the last position), then feed
the next `--steps` tokens one per forward with `past_key_values`, and time only those steps.

    python benchmarks/bench_decode.py [--prefill 2048] [--steps 64] [--repeats 3] [--clock wall|cpu]
                                      [--memory-tokens 8192] [--threads N] [--model smollm2-135m]
                                      [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16|float16]

`--device` / `--dtype` default to kvlab's defaults (`kvlab.load`: cuda when visible, bf16 on such
GPUs, else cpu and float32); `benchmarks/gpu_check.sh` runs this with `--device cuda --dtype bfloat16`.

With the defaults and one thread, about 5 minutes for the times and 3 for the memory (a fresh
process and an 8k prefill per configuration, one per core at a time) on a 2-core CPU, measured
while other jobs ran; `--memory-tokens 0` skips the memory part.

Per-token time. Each configuration runs on its own twin of the model (the same weight tensors,
its own modules, so every kvlab block is open at once); after the prefills the decode steps go
round robin (bare, fp16, int4, kivi-2, stats, hf, then the order rotated by one at the next step), so a
change in machine load hits every configuration alike. Per repeat, a configuration's time per
token (the mean over the steps, flush steps included) is divided by bare's in the same repeat;
the line shows the median over `--repeats` repeats, the other clock's ratio in brackets and the
range over repeats. `--clock cpu` judges by this process's CPU time, steadier than the wall clock
on a loaded machine with `--threads 1` (with more threads it also counts their spin-waiting).

* `bare`             a plain transformers DynamicCache loop: the baseline;
* `fp16`   <= 1.10   kvlab's identity method under `kvlab.quantize(..., protocol="decode")`: what the
                     protocol itself costs per token (hooks, bookkeeping, the per-step bits record,
                     the finiteness check), since the method does nothing;
* `int4`   <= 1.20   uniform int4 per token, residual 0: every step quantizes the new token of every
                     layer (K and V), so this is the protocol plus one small method call per layer;
* `kivi-2` <= 1.20   KIVI 2-bit, the authors' flush: one value leaves the fp window every step, 128 keys
                     every 128 steps;
* `stats`  <= 1.20   an identity method that asks for attention statistics (`bench_hooks._StatsOnly`):
                     every step computes the new query's attention over the cache in fp32 beside the
                     model's kernel and slides the per-layer statistics (QAQ's attention window);
* `hf-quanto-int2`   HF's QuantizedCache (quanto backend), printed as a reference, no target: its
                     cost is HF's, not kvlab's.

attn_error is off (the default of `kvlab.quantize`); with it on, every attention call runs twice.

Peak memory at `--memory-tokens` tokens (prefill memory-tokens - 16, then 16 steps), each
configuration in a fresh process: the peak of torch's CPU allocations above what the loaded model
holds (the allocator's running total, which the profiler reports with `profile_memory=True`;
deterministic, unaffected by load; on CUDA, `torch.cuda.max_memory_allocated`), over the whole run
and, in brackets, while decoding (from the first decode step on: the cache plus what each step
and its flush allocate). Not the resident set (ru_maxrss, VmHWM): it also counts freed memory the C
allocator keeps and, here, the profiler's own buffers (at 8k tokens it read 0.8 GiB for bare and
1.8 GiB for fp16, whose torch allocations peaked within 240 bytes of bare's).
What is right: kvlab's cache stores what the method returns (dequantized values in the model's
dtype, the cost of a simulated cache), i.e. tensors of the same size as the bare cache, so the
ratio should be 1 plus kvlab's bookkeeping and the temporaries of one layer's flush (the first
decode step quantizes the whole prefill, one layer and one of K/V at a time). The run's peak is
the prefill's activations in every configuration; the decoding peak is where a method shows.
Targets, on the larger of the two ratios: `fp16` <= 1.05 (the identity writes nothing), `int4` and
`kivi-2` <= 1.10 (temporaries of a few copies of one layer's K or V, each 1/60 of the cache). A
ratio near 2 means a second copy of the cache (as `attn_error=True` keeps, on purpose).

The header prints torch's version, the threads, the CPU and the load average: on a loaded machine
absolute times mean little; the ratios, measured interleaved in the same run, are what to read.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers.cache_utils import DynamicCache

import kvlab
from kvlab.threads import pin_threads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hooks import _StatsOnly  # noqa: E402  (the identity that asks for attention statistics)

# (name, method spec or None for the bare loop, per-token target, memory target)
CONFIGS = [("bare", None, None, None), ("fp16", "fp16", 1.10, 1.05), ("int4", "int4", 1.20, 1.10),
           ("kivi-2", "kivi-2", 1.20, 1.10), ("stats", _StatsOnly(), 1.20, None),
           ("hf-quanto-int2", "hf-quanto-int2", None, None)]
MEMORY_CONFIGS = ("bare", "fp16", "kivi-2", "int4")
MEMORY_STEPS = 16
DECODE_MARK = "bench_decode.steps"


def _ids(lm, n: int) -> torch.Tensor:
    return kvlab.data.windows(lm, "wiki", n, n, None)[0][None].to(lm.device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _prefill_kwargs(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def decode(lm, ids: torch.Tensor, prefill: int, method: str | None, after_prefill=None) -> None:
    """Prefill `prefill` tokens, then the rest of `ids` one token per forward (the memory runs, warm-up);
    the steps run inside `record_function(DECODE_MARK)`, so a profile shows where they start."""
    model = lm.model
    block = kvlab.quantize(model, method, protocol="decode") if method else contextlib.nullcontext()
    with torch.no_grad(), block:
        cache = DynamicCache(config=model.config) if method is None else None
        past = model(ids[:, :prefill], past_key_values=cache, use_cache=True, **_prefill_kwargs(model)).past_key_values
        if after_prefill is not None:
            after_prefill()
        with torch.profiler.record_function(DECODE_MARK):
            for t in range(prefill, ids.shape[1]):
                past = model(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same weights: kvlab installs its hooks per module, so each
    configuration gets its own twin and all of them can hold a live cache at once."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def timed_decode(configs: list[tuple[str, str | None, torch.nn.Module]], ids: torch.Tensor, prefill: int,
                 device) -> dict[str, tuple[float, float]]:
    """One repeat: every configuration prefilled on its twin, then the decode steps round robin (the
    order rotated at every step), so a change of machine load hits every configuration alike.
    Returns {name: (wall seconds, process CPU seconds) per decode step}."""
    with torch.no_grad(), contextlib.ExitStack() as blocks:
        past = {}
        for name, method, model in configs:
            if method:
                blocks.enter_context(kvlab.quantize(model, method, protocol="decode"))
            cache = DynamicCache(config=model.config) if method is None else None
            past[name] = model(ids[:, :prefill], past_key_values=cache, use_cache=True,
                               **_prefill_kwargs(model)).past_key_values
        wall, cpu = dict.fromkeys(past, 0.0), dict.fromkeys(past, 0.0)
        for i, t in enumerate(range(prefill, ids.shape[1])):
            for j in range(len(configs)):
                name, _, model = configs[(i + j) % len(configs)]
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                past[name] = model(ids[:, t:t + 1], past_key_values=past[name], use_cache=True).past_key_values
                _sync(device)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
    n = max(ids.shape[1] - prefill, 1)
    return {name: (wall[name] / n, cpu[name] / n) for name in past}


# ----------------------------------------------------------------------------- memory (one child per config)
def _torch_cpu_peaks(prof) -> tuple[int, int]:
    """Peaks of the CPU allocator's running total in a `profile_memory=True` session, in bytes: over the
    whole run and over the decode steps (the `DECODE_MARK` range)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mark = next(e for e in events if e.get("name") == DECODE_MARK and e.get("ph") == "X")
    start, end = float(mark["ts"]), float(mark["ts"]) + float(mark["dur"])
    memory = [(float(e["ts"]), e["args"]["Total Allocated"]) for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
              and e["args"].get("Device Type", 0) == 0]
    before = [total for ts, total in memory if ts < start]
    during = [total for ts, total in memory if start <= ts <= end]
    return max(total for _, total in memory), max(during + before[-1:], default=0)


def memory_child(args) -> None:
    """Runs in a fresh process: one configuration at `--memory-tokens`; prints one JSON line."""
    method = dict((c[0], c[1]) for c in CONFIGS)[args.memory_child]
    lm = kvlab.load(args.model, device=args.device, dtype=args.dtype)
    ids = _ids(lm, args.memory_tokens)
    prefill = args.memory_tokens - MEMORY_STEPS
    decode(lm, ids[:, :36], 32, method)           # first calls (imports, lazily made state) before measuring
    gc.collect()
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prefill_peak = []

        def after_prefill():
            prefill_peak.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        decode(lm, ids, prefill, method, after_prefill)
        during = torch.cuda.max_memory_allocated()
        peak, decode_peak = max(prefill_peak[0], during) - base, during - base
        measure = "CUDA allocations"
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            decode(lm, ids, prefill, method)
        (peak, decode_peak), measure = _torch_cpu_peaks(prof), "torch CPU allocations"
    print(json.dumps({"config": args.memory_child, "peak_bytes": peak, "decode_peak_bytes": decode_peak,
                      "measure": measure}))


def run_memory(args) -> dict[str, dict]:
    """One child process per configuration, as many at once as the cores hold `--threads` each
    (allocations do not depend on the load)."""
    out, jobs = {}, max(1, (os.cpu_count() or 1) // args.threads)
    names = list(MEMORY_CONFIGS)
    while names:
        batch, names = names[:jobs], names[jobs:]
        running = []
        for name in batch:
            log = tempfile.TemporaryFile(mode="w+")              # a file, not a pipe: no child can block on it
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--memory-tokens",
                   str(args.memory_tokens), "--threads", str(args.threads), "--model", args.model]
            cmd += (["--device", args.device] if args.device else []) + (["--dtype", args.dtype] if args.dtype else [])
            running.append((name, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)))
        for name, log, proc in running:
            proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
            lines = [ln for ln in text.splitlines() if ln.startswith('{"config"')]
            if proc.returncode or not lines:
                print(f"  memory {name}: child failed (exit {proc.returncode}): {text.strip()[-400:]}")
                continue
            out[name] = json.loads(lines[-1])
    return out


# ----------------------------------------------------------------------------- main
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "(reference, no target)"
    return f"target {target:.2f}  " + ("ok" if ratio <= target else "ABOVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-tokens", type=int, default=8192, help="0 skips the memory section")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: $KVLAB_THREADS, else every core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time judged against the targets: wall clock, or this process's CPU time (steadier on "
                         "a loaded machine with --threads 1; with more threads it counts their spinning too)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: kvlab's default device)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="model dtype (default: float32 on CPU, bfloat16 on GPUs that support it)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = pin_threads(args.threads, default=os.cpu_count() or 1)
    if args.memory_child:
        memory_child(args)
        return

    lm = kvlab.load(args.model, device=args.device, dtype=args.dtype)
    ids = _ids(lm, args.prefill + args.steps)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"model {lm.name}, torch {torch.__version__}, device {lm.device}, "
          f"dtype {str(lm.model.dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
          f"CPU {_cpu_name()} ({os.cpu_count()} cores), load average {load}")
    configs, targets = [], {}
    for name, method, target, _ in CONFIGS:
        try:
            decode(lm, ids[:, :36], 32, method)                  # warm-up (imports, first calls)
        except Exception as e:                                   # e.g. the HF comparator's backend missing
            print(f"  {name}: skipped ({type(e).__name__}: {str(e)[:120]})")
            continue
        configs.append((name, method, lm.model if method is None else twin(lm.model)))
        targets[name] = target
    wall = {name: [] for name, _, _ in configs}
    cpu = {name: [] for name, _, _ in configs}
    for _ in range(args.repeats):
        for name, (w, c) in timed_decode(configs, ids, args.prefill, lm.device).items():
            wall[name].append(w)
            cpu[name].append(c)
    judged, other = (cpu, wall) if args.clock == "cpu" else (wall, cpu)
    bare = statistics.median(judged["bare"])
    print(f"decode: prefill {args.prefill}, {args.steps} steps one token per forward, round robin over the "
          f"configurations, {args.repeats} repeats; {args.clock} time per token relative to bare in the same "
          f"repeat, median [the other clock]; bare {bare * 1000:.1f} ms "
          f"[{statistics.median(other['bare']) * 1000:.1f}]")
    results = []
    for name, _, _ in configs[1:]:
        target = targets[name]
        per_repeat = [x / b for x, b in zip(judged[name], judged["bare"])]
        ratio = statistics.median(per_repeat)
        ratio_other = statistics.median(x / b for x, b in zip(other[name], other["bare"]))
        print(f"{name + '/bare':>22}: {ratio:.3f} [{ratio_other:.3f}]  ({statistics.median(judged[name]) * 1000:.1f} "
              f"ms; repeats {min(per_repeat):.3f}..{max(per_repeat):.3f})  {_verdict(ratio, target)}")
        if target is not None:
            results.append((f"decode {name}", ratio, target))

    if args.memory_tokens:
        mem = run_memory(args)
        if "bare" in mem:
            mb = mem["bare"]
            print(f"memory at {args.memory_tokens} tokens (prefill {args.memory_tokens - MEMORY_STEPS} + "
                  f"{MEMORY_STEPS} steps, a fresh process each): peak {mb['measure']} above the loaded model, "
                  f"over the run [while decoding]; bare {mb['peak_bytes'] / 2**20:.1f} MiB "
                  f"[{mb['decode_peak_bytes'] / 2**20:.1f}]")
            mem_targets = {c[0]: c[3] for c in CONFIGS}
            for name in MEMORY_CONFIGS[1:]:
                if name not in mem:
                    continue
                m, target = mem[name], mem_targets[name]
                ratio = m["peak_bytes"] / mb["peak_bytes"]
                ratio_decode = m["decode_peak_bytes"] / mb["decode_peak_bytes"]
                print(f"{name + '/bare':>22}: {ratio:.3f} [{ratio_decode:.3f}]  ({m['peak_bytes'] / 2**20:.1f} MiB "
                      f"[{m['decode_peak_bytes'] / 2**20:.1f}])  " + _verdict(max(ratio, ratio_decode), target))
                results.append((f"memory {name}", max(ratio, ratio_decode), target))
    above = [f"{k} {r:.3f} > {t:.2f}" for k, r, t in results if r > t]
    print(f"summary: {len(results) - len(above)}/{len(results)} within target"
          + (f"; ABOVE: {'; '.join(above)}" if above else "")
          + f" (bare {bare * 1000:.1f} ms/token {args.clock} at prefill {args.prefill}, threads "
            f"{torch.get_num_threads()})")


if __name__ == "__main__":
    main()
