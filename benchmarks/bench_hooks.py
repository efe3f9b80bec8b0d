"""Hook overhead on the embedded model: forward-time ratios against the bare model (docs/design.md section 7).

Prints, for one forward of `--tokens` tokens, the median of interleaved repeats against the bare model:

* `identity` <= 1.02  kvlab's identity method in the fake protocol (the hooks alone);
* `int4`     <= 1.05  uniform int4 per token in the fake protocol;
* `capture-stats` <= 1.5  attention statistics alone (`kvlab.capture(model, what=("attn",))`, no
                      quantization): one forward plus kvlab's fp32 softmax beside the model's kernel;
* `aware-fake` <= 2.0 an attention-aware method in the fake protocol (an identity that asks for
                      statistics): an fp statistics pass + the quantized pass is the floor (2.0 less the LM
                      head the statistics pass skips); the statistics pass takes its attention output from
                      the same fp32 probabilities as the statistics (`attention_with_stats`), so it runs one
                      softmax per layer, not the model's kernel and a second one;
* `plain-hook-int4`   a plain forward hook doing per-token int4 on k_proj/v_proj outputs: the floor.

    python benchmarks/bench_hooks.py [--tokens 2048] [--repeats 5] [--model smollm2-135m]
                                     [--threads N] [--clock wall|cpu]
                                     [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16|float16]

`--clock cpu` judges by this process's CPU time (steadier than the wall clock on a loaded machine with
`--threads 1`; with more threads it also counts their spin-waiting).

`--device` / `--dtype` default to kvlab's defaults (`kvlab.load`: cuda when visible, bf16 on such GPUs,
else cpu and float32); `benchmarks/gpu_check.sh` runs this with `--device cuda --dtype bfloat16`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

import kvlab
from kvlab.quant.base import LayerContext, Method, Quantized
from kvlab.quant.primitives import quantize_uniform


@dataclass(frozen=True)
class _StatsOnly(Method):
    """Identity that asks for attention statistics (measures the statistics path alone)."""
    name: ClassVar[str] = "bench-stats"
    needs_attention: ClassVar[bool] = True

    def quantize(self, x, ctx: LayerContext) -> Quantized:
        return Quantized(x, torch.tensor(16.0 * x.numel(), device=x.device))


def _plain_hooks(model):
    def hook(mod, inp, out):
        b, t, _ = out.shape
        xh, _ = quantize_uniform(out.view(b, t, -1, 64), 4, dim=-1)
        return xh.view(b, t, -1)
    return [layer.self_attn.k_proj.register_forward_hook(hook) for layer in model.model.layers] + \
        [layer.self_attn.v_proj.register_forward_hook(hook) for layer in model.model.layers]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: kvlab's default device)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="model dtype (default: float32 on CPU, bfloat16 on GPUs that support it)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    lm = kvlab.load(args.model, device=args.device, dtype=args.dtype)
    model = lm.model
    ids = kvlab.data.tokens(lm.tokenizer, "wiki", args.tokens)[None].to(lm.device) if lm.tokenizer is not None \
        else torch.randint(3, 300, (1, args.tokens)).to(lm.device)

    def bare():
        model(ids)

    def with_method(m):
        def f():
            with kvlab.quantize(model, m, protocol="fake"):
                model(ids)
        return f

    def plain():
        hs = _plain_hooks(model)
        try:
            model(ids)
        finally:
            for h in hs:
                h.remove()

    def capture_stats():
        with kvlab.capture(model, what=("attn",)):
            model(ids)

    cases = {"bare": bare, "identity": with_method("fp16"), "int4": with_method("int4"),
             "capture-stats": capture_stats, "aware-fake": with_method(_StatsOnly()), "plain-hook-int4": plain}
    times = {k: [] for k in cases}
    with torch.no_grad():
        for f in cases.values():       # warm-up
            f()
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every case alike
            for k, f in cases.items():
                t0 = clock()
                f()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[k].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {lm.name}, {args.tokens} tokens, {args.repeats} interleaved repeats, device {lm.device}, "
          f"dtype {str(model.dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, clock {args.clock}; "
          f"bare forward {med['bare'] * 1000:.0f} ms")
    targets = {"identity": 1.02, "int4": 1.05, "capture-stats": 1.5, "aware-fake": 2.0, "plain-hook-int4": None}
    for k, target in targets.items():
        ratio = med[k] / med["bare"]
        verdict = "" if target is None else ("  ok" if ratio <= target else f"  ABOVE target {target}")
        print(f"{k + '/bare':>22}: {ratio:.3f}{verdict}")


if __name__ == "__main__":
    main()
