#!/usr/bin/env bash
# GPU check: the suite and the benchmarks on CUDA with the embedded model in bf16, everything they print
# written to a log. Only for a machine with an NVIDIA GPU and a CUDA build of torch in .venv (README,
# Setup: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"); no CI
# job runs it. Without a usable CUDA device it stops at once with exit status 2.
#
#   bash benchmarks/gpu_check.sh [--quick | --full] [--log FILE]
#
# Steps (each one's exit status is in the summary at the end; the script exits 1 if any failed):
#   1. device:     torch, CUDA and the GPU (nvidia-smi), `kvlab info`
#   2. readiness:  tests/test_gpu_readiness.py with KVLAB_TEST_DEVICE=cuda: identity bit-exact in bf16 and fp16
#                  in the fake, prefill-decode and decode protocols, every method in bf16/fp16, the shared
#                  quantizers on the GPU, a tiny model split between the GPU and CPU offload
#   3. suite:      default: pytest -m "not notebook and not browser and not ray" (the core, methods, the
#                  embedded model's integration tests; those run on CPU as in CI, now with a CUDA torch);
#                  --full: make test (the whole suite, notebooks included); --quick: tests/core and tests/quant
#   4. bench_hooks:  benchmarks/bench_hooks.py --device cuda --dtype bfloat16 (hook overhead, 2048 tokens)
#   5. bench_decode: benchmarks/bench_decode.py --device cuda --dtype bfloat16 (per-token decode overhead,
#                    peak CUDA memory at 8k tokens)
# Not yet run on a GPU, so no GPU times. On the 2-core CPU machine tests/core + tests/quant took 27 s and
# tests/test_gpu_readiness.py 24 s; the benchmarks load the embedded model and run minutes, so choose --quick
# (memory section skipped) for a short GPU loan. The log defaults to runs/gpu_check-<date>.log (runs/ is
# not tracked).
set -u
cd "$(dirname "$0")/.."

MODE=default
LOG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --log) LOG="$2"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (use --quick, --full, --log FILE)" >&2; exit 64 ;;
  esac
  shift
done

PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY; run make setup TORCH=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128\" first (or set PYTHON)" >&2
  exit 2
fi

# 0. a usable CUDA device, or stop here: no GPU means nothing below would test what this script is for
if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.backends.cuda.is_built():
    sys.exit(f"gpu_check: FAILED, no CUDA: this torch ({torch.__version__}) is a CPU-only build. Install a CUDA "
             "build: make setup TORCH=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128\"")
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    sys.exit(f"gpu_check: FAILED, no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
             "check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES")
torch.zeros(1, device="cuda").add_(1)          # a kernel really runs
print(f"gpu_check: {torch.cuda.device_count()} CUDA device(s), cuda:0 = {torch.cuda.get_device_name(0)}, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
EOF
then
  exit 2
fi

if [ -z "$LOG" ]; then
  mkdir -p runs
  LOG="runs/gpu_check-$(date +%Y%m%d-%H%M%S).log"
fi
: > "$LOG"
echo "gpu_check: mode $MODE, log $LOG"

export TOKENIZERS_PARALLELISM=false
STATUS=()
step() {   # step NAME COMMAND...: run, print and log everything, remember the exit status
  local name="$1"; shift
  echo "===== $name: $* ($(date +%H:%M:%S))" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "===== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  STATUS+=("$name=$rc")
}

device_info() {
  nvidia-smi || echo "(nvidia-smi not found)"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"
  "$PY" -c "import sys; from kvlab.cli import main; sys.exit(main(['info']))"
}

step device device_info
step readiness env KVLAB_TEST_DEVICE=cuda "$PY" -m pytest -q tests/test_gpu_readiness.py
case "$MODE" in
  quick) step suite "$PY" -m pytest -q tests/core tests/quant ;;
  full) step suite make test ;;
  *) step suite "$PY" -m pytest -q -m "not notebook and not browser and not ray" ;;
esac
step bench_hooks "$PY" benchmarks/bench_hooks.py --device cuda --dtype bfloat16
if [ "$MODE" = quick ]; then
  step bench_decode "$PY" benchmarks/bench_decode.py --device cuda --dtype bfloat16 --memory-tokens 0
else
  step bench_decode "$PY" benchmarks/bench_decode.py --device cuda --dtype bfloat16
fi

echo "gpu_check summary: ${STATUS[*]} (log $LOG)" | tee -a "$LOG"
for s in "${STATUS[@]}"; do
  [ "${s##*=}" = 0 ] || exit 1
done
exit 0
