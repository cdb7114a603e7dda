#!/usr/bin/env bash
# One-shot GPU check, for a machine with a GPU and no network: the Pallas kernels against their references and
# dense attention (benchmarks/kernels.py), and the decode-step cost (benchmarks/step_cost.py) of a model with
# SmolLM2-135M-Instruct's exact shape and random weights, float32 and bfloat16.
#
#   bash benchmarks/gpu_check.sh                     # from the repository root, on the GPU machine
#   GPU_CHECK_EXTRAS=1 bash benchmarks/gpu_check.sh  # also the kernel tests there and int8 weights (+3.5 min)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh    # tiny shapes: the same steps end to end on a CPU
#
# On one H200 (jax 0.11.2) the kernels step took 79 s and the decode step's parts about 4 minutes, most of it
# XLA compiles of the 30-layer model (about 10 s per decode loop, 6 s per tree forward).
#
# Packages the machine lacks are installed from the wheels in .whl/ when that folder exists, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 gguf==0.19.0
# The project itself runs from the checkout (PYTHONPATH), not installed. Every step writes its log to $OUT
# (default /tmp/gpu_check) and has its own time limit inside a total of GPU_CHECK_BUDGET seconds (default 360,
# 560 with the extras); a failing step does not stop the next. The summary of every table is printed last.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
START=$(date +%s)
EXTRAS=${GPU_CHECK_EXTRAS:-0}
TINY=${GPU_CHECK_TINY:-0}
if [ "$EXTRAS" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-560}; else BUDGET=${GPU_CHECK_BUDGET:-360}; fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl || echo "wheel install failed"
  export PYTHONPATH="$ROOT:/tmp/gpu_check_site"
else
  export PYTHONPATH="$ROOT"
fi

# step NAME CAP_S CMD...: runs CMD with its output in $OUT/NAME.log, for at most CAP_S seconds and never past
# the total budget; prints one status line.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "== $name: skipped, budget spent" | tee "$OUT/$name.log"
    return
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s (limit $cap s)" | tee -a "$OUT/$name.log"
}

# The model section of SmolLM2-135M-Instruct's converted config (the zoo's workdir/config.json).
MODEL_JSON="$OUT/smollm2_135m_shape.json"
cat >"$MODEL_JSON" <<'EOF'
{"model": {"vocab_size": 49152, "d_model": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64,
 "d_ff": 1536, "d_ff_per_layer": [], "layer_pattern": "A", "layer_windows": [], "matformer_fractions": [1.0],
 "ffn_activation": "silu", "embed_scale": false, "qk_norm": false, "qkv_bias": false, "query_scale": 0.0,
 "rms_eps": 9.999999747378752e-06, "rope_theta": 100000.0, "rope_local_theta": 0.0, "sandwich_norms": false,
 "tie_embeddings": true, "max_len": 8192, "dtype": "float32",
 "attention": {"implementation": "xla", "prefill": "dense", "block_size": 64, "xattention_stride": 8,
               "xattention_threshold": 0.9}}}
EOF

if [ "$TINY" = 1 ]; then
  "$PY" - "$MODEL_JSON" <<'EOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["model"].update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                       max_len=512)
json.dump(config, open(path, "w"))
EOF
  KERNEL_ARGS=(--timings=on --cudnn=on --seq_lens=32 --densities=0.5 --cache_lens=32 --tree_sizes=1,4 --iters=2
               --warmup=1 --grad_check_max_len=32)
  STEP_ARGS=(--context=40 --new_tokens=8 --rounds=2 --bandwidth_mb=16)
  PYTEST_TARGET=tests/pallas_kernels/test_gpu_lowering.py
else
  KERNEL_ARGS=()
  STEP_ARGS=(--context=192 --new_tokens=128 --rounds=10 --bandwidth_mb=2048)
  PYTEST_TARGET=tests/pallas_kernels
fi

step env 60 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
  --format=csv; $PY -c 'import jax, jaxlib, flax, ml_collections; print(\"jax\", jax.__version__, \"jaxlib\", \
  jaxlib.__version__, \"flax\", flax.__version__); print(jax.devices()); from jax.experimental.pallas import triton; \
  print(\"pallas triton:\", triton.__name__)'"
# Essential decode figures first: the decode layout in float32 and bfloat16, AR step and whole tree forward.
step decode 250 "$PY" -m benchmarks.step_cost --model_config="$MODEL_JSON" --layouts=decode \
  --dtypes=float32,bfloat16 --sections=bandwidth,ar,curve --ks=1,2,4,8,16 --curve_parts=whole "${STEP_ARGS[@]}"
step kernels 100 "$PY" -m benchmarks.kernels "${KERNEL_ARGS[@]}"
if [ "$EXTRAS" = 1 ] || [ "$TINY" = 1 ]; then
  # The kernel tests with the kernels compiled for this machine's backend (implementation=None picks Pallas
  # here), float32 matmuls at full precision (the tests' tolerances are 1e-5; TF32 would miss them). Four tests
  # assume the CPU backend (block sizes below 16, the CPU's default implementation) and fail on a GPU.
  step pytest 75 env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q --tb=short -p no:cacheprovider \
    "$PYTEST_TARGET"
  # Weight-only int8 in float32 and bfloat16 (no bandwidth probe: its roofline columns stay empty).
  step decode_int8 125 "$PY" -m benchmarks.step_cost --model_config="$MODEL_JSON" --layouts=int8 \
    --dtypes=float32,bfloat16 --sections=ar,curve --ks=1,2,4,8,16 --curve_parts=whole "${STEP_ARGS[@]}"
fi

echo
echo "################ summary ($(($(date +%s) - START)) s; logs in $OUT)"
for name in env decode kernels pytest decode_int8; do
  log="$OUT/$name.log"
  [ -f "$log" ] || continue
  echo
  echo "#### $name"
  case $name in
    env) grep -v '^$' "$log" | head -12 ;;
    pytest) grep -E 'passed|failed|error|skipped|^FAILED|^ERROR|^== |Max absolute' "$log" | tail -25 ;;
    *) grep -E '^(#|\||Device|Roofline|FAILED|ms/token|[0-9]+ measurement|== |Traceback|[A-Za-z]*Error)' "$log" \
         | grep -v '^|---' | head -80 ;;
  esac
done
