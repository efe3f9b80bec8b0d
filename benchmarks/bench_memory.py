"""Real bytes and cheap statistics on the embedded model: the packed cache's resident bytes, and memory that
grows linearly with the sequence.

    python benchmarks/bench_memory.py [--sections linear|resident|linear,resident] [--tokens 8192]
                                      [--lengths 2048,4096,8192] [--steps 16] [--kvquant SPEC]
                                      [--model smollm2-135m|tiny:llama] [--dtype bfloat16|float32] [--threads N]

Expected runtime, one thread, bfloat16, on a 2-core CPU with another job on the other core (measured):
the default (`--sections linear`, nine fresh processes at 2k/4k/8k) about 15 minutes;
`--sections resident` (six 8k runs) about 12 minutes, plus 1.6 minutes the first time to calibrate the
light KVQuant (cached on disk after). Each section takes up to ~15 minutes; both together ~28.

Section `resident` (kvlab.quantize(..., pack=True), docs/design.md): at `--tokens` tokens (prefill
tokens - steps, then `--steps` decode steps, one token per forward, protocol `decode`) each configuration
reports what its cache holds after the last step (`kvlab.core.cache.cache_resident_bytes`: the tensors'
storages, each counted once; for HF's QuantizedCache `ExternalCache.resident_bytes`, from its state):

* `fp16`                   kvlab's identity method, dense: the reference every ratio divides by;
* `kivi-2`, `kvquant`      dense (`pack=False`: the dequantized values in the model's dtype, the
                           simulation's cost) and packed (`pack=True`: Packed chunks + fp sink/window);
* `hf-quanto-int2`         HF's QuantizedCache, quanto backend, which packs itself.

Per line: resident bytes, the ratio to fp16's, the accounted bytes (`run.summary()["packed_bytes"]`,
bits / 8 of the cache the last step read) and, for packed caches, resident / accounted with its target
1.05 (the packed tensors are what the accounting books; the fp16 tokens are held at the model's dtype;
kvlab's own extras are printed apart as `aux` and left out of the check: the cos/sin table and the
pending pre-RoPE keys a pre-RoPE method needs to rotate its chunks, which a real kernel recomputes).
The model runs in bfloat16 by default so the dense caches are 16-bit, as the fp16 reference means.
The KVQuant spec defaults to kvquant-nuq2-1% calibrated on 2 x 2048 tokens (`calib_rows=2`, named in
the output; the authors' 16 x 2048 takes ~40 min here); `--kvquant kvquant-nuq2-1%` uses theirs.

Then the time per decode token, packed vs dense, over the steps after the first (the first decode step
quantizes the whole prefill: printed apart), and where it goes: `unpack` (rebuilding every layer's
dense K/V from its chunks, per call), `pack` (the second quantization that builds a flush's chunk) and
`attention` (the attention kernel, from a profile of one more step). Packed/dense has no target: the
packed cache dequantizes the whole cache on every call in Python-level torch ops, one chunk at a time,
where a real kernel fuses it into the attention.

Section `linear`: `fake`, `prefill-decode` and `decode` at each of `--lengths` with attention statistics
on (`qaq-high`: attention-aware, so every call computes the attention each key receives), each in a fresh
process, the peak measured as bench_decode.py does (the allocator's running total in a
`profile_memory=True` profile: torch's CPU allocations above the loaded model, deterministic); decode is
a prefill of L - steps tokens and `--steps` decode steps, prefill-decode the same prefill and the steps'
tokens in one call, fake one forward over L. Per line: peak over the run [while decoding], time per
token (fake: the forward / L; otherwise the continuation's tokens), the largest statistics tensor a layer
holds (T x T would be quadratic). Then, per protocol, the slopes: peak growth from L2 to L3 over that
from L1 to L2, target <= 1.1 x (L3 - L2) / (L2 - L1) (2.2 for 2k, 4k, 8k: linear gives 2, a T x T
tensor per layer 4), and the same for the time per token, target <= 1.5 x that (3.0: each token attends
to the whole cache, so its time grows linearly too; the clock is noisy on a loaded machine).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvlab  # noqa: E402
from bench_decode import _cpu_name, _prefill_kwargs, _torch_cpu_peaks  # noqa: E402
from kvlab.threads import pin_threads  # noqa: E402

DEFAULT_KVQUANT = "kvquant:bits=2,fisher=activation,outliers=0.01,calib_rows=2"
STATS_METHOD = "qaq-high"
PROTOCOLS = ("fake", "prefill-decode", "decode")
DECODE_MARK = "bench_decode.steps"           # the mark `_torch_cpu_peaks` looks for


def load(name: str, dtype: str | None):
    """The embedded model (`kvlab.load`) or `tiny:<family>` (a random tiny model, for tests)."""
    if name.startswith("tiny:"):
        lm = kvlab.tiny(name.split(":", 1)[1])
        if dtype:
            lm.model.to(getattr(torch, dtype))
        return lm
    return kvlab.load(name, device="cpu", dtype=dtype)


def token_ids(lm, n: int) -> torch.Tensor:
    return kvlab.data.windows(lm, "wiki", n, n, None)[0][None].to(lm.device)


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return "(reference, no target)"
    return f"target {target:.2f}  " + ("ok" if value <= target else "ABOVE")


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- section `resident`
def resident_run(lm, ids: torch.Tensor, steps: int, method, pack: bool) -> dict:
    """Prefill ids[:, :-steps], decode the rest one token per forward; what the cache holds at the end,
    the accounted bytes, and the time per token with its parts."""
    model = lm.model
    prefill = ids.shape[1] - steps
    with torch.no_grad(), kvlab.quantize(model, method, protocol="decode", pack=pack) as run:
        past = model(ids[:, :prefill], use_cache=True, **_prefill_kwargs(model)).past_key_values

        def seconds() -> dict:
            out = {"unpack": 0.0, "pack": 0.0}
            for layer in getattr(run.cache, "layers", []):
                st = getattr(layer, "packed", None)
                if st is not None:
                    for k in out:
                        out[k] += st.seconds[k]
            return out
        times = []
        for t in range(prefill, ids.shape[1] - 1):             # the last token: profiled below
            t0 = time.perf_counter()
            past = model(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
            times.append(time.perf_counter() - t0)
            if t == prefill:
                after_first = seconds()
        end = seconds()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model(ids[:, -1:], past_key_values=past, use_cache=True)
            profiled = time.perf_counter() - t0
        attn = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
        s = run.summary()
        if run.external is not None:
            resident = run.external.resident_bytes()
        else:
            resident = run.policy.resident_bytes()
    n = max(len(times) - 1, 1)
    return {"resident": resident, "accounted": s["packed_bytes"], "avg_bits_end": s.get("avg_bits_end"),
            "first_step": times[0], "per_token": sum(times[1:]) / n,
            "unpack": (end["unpack"] - after_first["unpack"]) / n, "pack": (end["pack"] - after_first["pack"]) / n,
            "profiled_step": profiled, "attention": attn / 1e6}


def resident_section(args, lm) -> list[tuple[str, float, float]]:
    from kvlab.calibration import calibrate

    ids = token_ids(lm, args.tokens)
    kvq_spec = args.kvquant
    t0 = time.perf_counter()
    kvq = calibrate(lm, kvq_spec)
    calib_s = time.perf_counter() - t0
    configs = [("fp16", "fp16", False), ("kivi-2", "kivi-2", False), ("kivi-2 packed", "kivi-2", True),
               ("kvquant", kvq, False), ("kvquant packed", kvq, True), ("hf-quanto-int2", "hf-quanto-int2", False)]
    print(f"resident bytes at {args.tokens} tokens (prefill {args.tokens - args.steps} + {args.steps} decode steps, "
          f"protocol decode, dtype {str(lm.model.dtype).removeprefix('torch.')}); kvquant = '{kvq.spec}' "
          f"(calibration {calib_s:.0f} s{', read from the cache' if calib_s < 5 else ''})")
    rows = {}
    for name, method, pack in configs:
        try:
            resident_run(lm, ids[:, :40], 4, method, pack)      # warm-up (imports, first calls)
            gc.collect()
            t0 = time.perf_counter()
            rows[name] = resident_run(lm, ids, args.steps, method, pack)
            print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        except Exception as e:                                  # e.g. quanto missing
            print(f"  {name}: skipped ({type(e).__name__}: {str(e)[:160]})")
    if "fp16" not in rows:
        return []
    ref = rows["fp16"]["resident"]["total"]
    results = []
    print(f"{'':>16}  {'resident':>11}  {'/fp16':>6}  {'accounted':>11}  {'packed':>10} {'fp':>10} {'aux':>9}  "
          f"(packed+fp)/accounted")
    for name, r in rows.items():
        res = r["resident"]
        held = res["packed"] + res["fp"]
        check = held / r["accounted"]
        judged = "packed" in name or name.startswith("hf-")
        target = 1.05 if judged else None
        print(f"{name:>16}  {_mib(res['total']):>11}  {res['total'] / ref:6.3f}  {_mib(r['accounted']):>11}  "
              f"{_mib(res['packed']):>10} {_mib(res['fp']):>10} {_mib(res['aux']):>9}  {check:.3f}  "
              + (_verdict(check, target) if judged else "(dense: the dequantized values in the model's dtype)"))
        if judged:
            results.append((f"resident {name}", check, target))
    print(f"time per decode token (steps 2..{args.steps - 1}; the first step, which quantizes the whole prefill, "
          f"apart; unpack / pack from the layers' timers, attention from a profile of the last step):")
    for name, r in rows.items():
        base = rows.get(name.replace(" packed", ""))
        ratio = f"{r['per_token'] / base['per_token']:.2f}x dense" if base is not r and base else ""
        print(f"{name:>16}  {r['per_token'] * 1000:8.1f} ms/token {ratio:>12}  unpack {r['unpack'] * 1000:7.1f} ms  "
              f"pack {r['pack'] * 1000:5.1f} ms  attention {r['attention'] * 1000:6.1f} ms of a {r['profiled_step'] * 1000:.1f}"
              f" ms profiled step  (first step {r['first_step']:.2f} s)" + ("  (reference, no target)" if ratio else ""))
    return results


# ----------------------------------------------------------------------------- section `linear`
def linear_child(model_name: str, dtype: str | None, protocol: str, length: int, steps: int) -> dict:
    """One configuration (run in a fresh process by `linear_section`): peaks, time per token, largest
    per-layer statistics tensor."""
    lm = load(model_name, dtype)
    model = lm.model
    ids = token_ids(lm, length)
    prefill = length - steps

    def once(ids, prefill, mark=True):
        with torch.no_grad(), kvlab.quantize(model, STATS_METHOD, protocol=protocol) as run:
            mark_ctx = torch.profiler.record_function(DECODE_MARK) if mark else contextlib.nullcontext()
            if protocol == "fake":
                with mark_ctx:
                    t0 = time.perf_counter()
                    model(ids, use_cache=True, **_prefill_kwargs(model))
                    seconds = (time.perf_counter() - t0) / ids.shape[1]
            else:
                past = model(ids[:, :prefill], use_cache=True, **_prefill_kwargs(model)).past_key_values
                with mark_ctx:
                    t0 = time.perf_counter()
                    if protocol == "prefill-decode":
                        model(ids[:, prefill:], past_key_values=past, use_cache=True)
                    else:
                        for t in range(prefill, ids.shape[1]):
                            past = model(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
                    seconds = (time.perf_counter() - t0) / (ids.shape[1] - prefill)
            largest = max((t.numel() for st in run.stats if st is not None
                           for t in vars(st).values() if torch.is_tensor(t)), default=0)
        return seconds, largest

    once(ids[:, :min(40, length)], min(40, length) - min(steps, 8), mark=False)      # warm-up
    gc.collect()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        seconds, largest = once(ids, prefill)
    peak, decode_peak = _torch_cpu_peaks(prof)
    return {"protocol": protocol, "length": length, "peak_bytes": peak, "decode_peak_bytes": decode_peak,
            "seconds_per_token": seconds, "largest_stats": largest}


def linear_section(args) -> list[tuple[str, float, float]]:
    lengths = args.lengths
    print(f"memory and time per token with attention statistics on ({STATS_METHOD}), a fresh process per "
          f"configuration; peak of torch's CPU allocations above the loaded model over the run [while "
          f"decoding: the continuation]; decode / prefill-decode: prefill L - {args.steps}, then {args.steps} tokens")
    rows = {}
    for protocol in PROTOCOLS:
        for L in lengths:
            cmd = [sys.executable, os.path.abspath(__file__), "--linear-child", f"{protocol}:{L}",
                   "--steps", str(args.steps), "--threads", str(args.threads), "--model", args.model]
            cmd += ["--dtype", args.dtype] if args.dtype else []
            with tempfile.TemporaryFile(mode="w+") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
                log.seek(0)
                text = log.read()
            lines = [ln for ln in text.splitlines() if ln.startswith('{"protocol"')]
            if proc.returncode or not lines:
                print(f"  {protocol} {L}: child failed (exit {proc.returncode}): {text.strip()[-400:]}")
                continue
            r = rows[(protocol, L)] = json.loads(lines[-1])
            print(f"{protocol:>15} {L:>6}: peak {_mib(r['peak_bytes']):>12} [{_mib(r['decode_peak_bytes']):>12}]  "
                  f"{r['seconds_per_token'] * 1000:8.2f} ms/token  largest statistics tensor per layer "
                  f"{r['largest_stats']:,} elements (T x T = {L * L:,})")
    results = []
    if len(lengths) < 3:
        return results
    l1, l2, l3 = lengths[:3]
    linear = (l3 - l2) / (l2 - l1)
    print(f"slopes: growth from {l2} to {l3} over growth from {l1} to {l2} (linear: {linear:.2f}; a T x T tensor: "
          f"{(l3 * l3 - l2 * l2) / (l2 * l2 - l1 * l1):.2f})")
    for protocol in PROTOCOLS:
        r = [rows.get((protocol, L)) for L in (l1, l2, l3)]
        if None in r:
            continue
        for what, key, factor in (("peak", "peak_bytes", 1.1), ("peak while decoding", "decode_peak_bytes", 1.1),
                                  ("time per token", "seconds_per_token", 1.5)):
            if protocol == "fake" and key == "decode_peak_bytes":
                continue
            a, b, c = (x[key] for x in r)
            slope = (c - b) / (b - a) if b != a else float("inf")
            target = factor * linear
            if slope < 0 or b < a:       # it shrank between two lengths: load noise, not a measurement
                print(f"{protocol + ' ' + what:>36}: {slope:6.2f}  ({a:.4g} -> {b:.4g} -> {c:.4g})  target "
                      f"{target:.2f}  UNRELIABLE (not increasing with length: load noise; rerun on an idle machine)")
                results.append((f"{protocol} {what} (unreliable)", float("inf"), target))
                continue
            print(f"{protocol + ' ' + what:>36}: {slope:6.2f}  ({a:.4g} -> {b:.4g} -> {c:.4g})  {_verdict(slope, target)}")
            results.append((f"{protocol} {what}", slope, target))
    return results


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a kvlab model, or tiny:<family> (tests)")
    ap.add_argument("--sections", default="linear", help="linear (default), resident, or both: linear,resident")
    ap.add_argument("--tokens", type=int, default=8192, help="resident: tokens per run")
    ap.add_argument("--lengths", default="2048,4096,8192", help="linear: three lengths")
    ap.add_argument("--steps", type=int, default=16, help="decode steps (resident, linear)")
    ap.add_argument("--kvquant", default=DEFAULT_KVQUANT, help="resident: the KVQuant spec (calibrated)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $KVLAB_THREADS, else 1)")
    ap.add_argument("--linear-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.threads = pin_threads(args.threads, default=1)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if args.linear_child:
        protocol, length = args.linear_child.rsplit(":", 1)
        print(json.dumps(linear_child(args.model, args.dtype, protocol, int(length), args.steps)))
        return
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"model {args.model}, torch {torch.__version__}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"CPU {_cpu_name()} ({os.cpu_count()} cores), load average {load_avg}")
    sections = args.sections.split(",")
    results = []
    if "resident" in sections:
        results += resident_section(args, load(args.model, args.dtype))
    if "linear" in sections:
        results += linear_section(args)
    above = [f"{k} {r:.3f} > {t:.2f}" for k, r, t in results if r > t]
    print(f"summary: {len(results) - len(above)}/{len(results)} within target"
          + (f"; ABOVE: {'; '.join(above)}" if above else ""))


if __name__ == "__main__":
    main()
