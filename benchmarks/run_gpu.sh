#!/usr/bin/env bash
# ddpm_jax beside the PyTorch peer on one GPU, in one invocation: JSON results, a kernel-time table of
# a profiled train step, and the side-by-side table (table.md). About 8-9 minutes on an H100/H200,
# inside one 600 s device call: the table is written before the variants, and a variant starts only
# while BUDGET_S seconds (default 450; each variant costs ~110 s, mostly its compile) have not passed.
#
# Needs: a CUDA JAX, torch, and the wheels of what the GPU image lacks (ml_collections, diffusers,
# importlib_metadata), prepared once on a machine with network, from the repository root:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     -d .whl ml_collections==1.1.0 diffusers==0.42.1 importlib_metadata
# Usage (OUT: where results go, default ./bench_out; at most 8 files land there):
#   OUT=/tmp/out bash benchmarks/run_gpu.sh
#   VARIANTS="cudnn:--config.model.attention=cudnn rbg:JAX_DEFAULT_PRNG_IMPL=rbg" bash benchmarks/run_gpu.sh
#   SKIP=large bash benchmarks/run_gpu.sh   # also time forward and forward+backward alone (+75 s)
#   SMOKE=1 bash benchmarks/run_gpu.sh   # the same steps at toy sizes: checks the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
LOG="$OUT/ddpm_jax.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader >"$LOG" 2>&1 || true

# Variants, space-separated: name:--one.benchmark.flag or name:ONE_ENV_VAR=value (XLA_FLAGS, JAX_*).
# Each costs a train-step and a sampler compile and run: keep the list short.
if [ "${SMOKE:-0}" = 1 ]; then
  CONFIG=configs/tiny.py BUDGET_S=${BUDGET_S:-300}
  SIZES=(--train_calls=2 --sample_batch=8 --sample_steps=4 --large_batch=16 --large_steps=2)
  PEER=(--batch 4 --steps 2 --warmup 1 --sample_n 2 --sample_steps 3 --no_compile --no_bf16)
  VARIANTS=${VARIANTS-"rbg:JAX_DEFAULT_PRNG_IMPL=rbg"}  # cuDNN attention needs a GPU
else
  CONFIG=configs/cifar10.py BUDGET_S=${BUDGET_S:-450}
  SIZES=()
  PEER=(--compile_mode reduce-overhead)  # the peer's fastest: bf16 autocast, torch.compile, CUDA graphs
  # k steps per call: one launch of the program per k steps, for a host slower than the device
  VARIANTS=${VARIANTS-"spc4:--config.training.steps_per_call=4"}
fi
setting=()  # a variant's environment setting
bench() { env "${setting[@]}" python3 -m ddpm_jax.benchmark --config=$CONFIG "${SIZES[@]}" "$@" 2>>"$LOG"; }

# The peer, then ddpm_jax (first launch fills the persistent compilation cache, the second reuses it).
python3 benchmarks/peer_torch.py "${PEER[@]}" --out "$OUT/peer.jsonl" >>"$LOG" 2>&1 || echo "peer failed" >>"$LOG"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
bench --skip="${SKIP-parts}" --out="$OUT/ddpm_jax.json" --profile_dir=/tmp/ddpm_jax_profile >/dev/null || echo "ddpm_jax failed" >>"$LOG"
bench --skip=parts,sample,large --out="$OUT/ddpm_jax_cached.json" >/dev/null \
  || echo "cached launch failed" >>"$LOG"
python3 benchmarks/trace_summary.py /tmp/ddpm_jax_profile >"$OUT/trace.md" 2>>"$LOG"
python3 benchmarks/compare.py "$OUT" >"$OUT/table.md"  # again below with the variants, if they finish
for variant in $VARIANTS; do
  name=${variant%%:*} body=${variant#*:}
  if ((SECONDS > BUDGET_S)); then echo "variant $name skipped: ${BUDGET_S} s budget spent" >>"$LOG"; continue; fi
  case $body in --*) setting=(); flag=("$body") ;; *) setting=("$body"); flag=() ;; esac
  bench --skip=parts,large "${flag[@]}" --out="$OUT/ddpm_jax_variant_$name.json" >/dev/null \
    || echo "variant $name failed" >>"$LOG"
done
python3 benchmarks/compare.py "$OUT" | tee "$OUT/table.md"
