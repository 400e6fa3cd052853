#!/usr/bin/env bash
# Issue #17's train-step levers on one GPU, each measured beside the baseline in one invocation: a
# fresh process per variant (its own XLA_FLAGS, PRNG), the train step only; the baseline also times
# the parts and sampling and dumps its optimized HLO (for benchmarks/kernel_sources.py), every run is
# profiled, and the baseline runs again at the end (from the compilation cache). About 7 minutes on
# an H100. BASELINE=0 runs the variants alone (their device time against an earlier call's baseline).
#
# Needs the wheels of run_gpu.sh in .whl/ (ml_collections at least). Usage (at most 8 files land in OUT):
#   OUT=/tmp/out bash benchmarks/gpu_levers.sh
#   VARIANTS="spc4:--config.training.steps_per_call=4 both:--config.training.steps_per_call=4+JAX_DEFAULT_PRNG_IMPL=rbg" ...
#   SMOKE=1 bash benchmarks/gpu_levers.sh   # toy sizes: checks the script on a CPU
# A variant is NAME:SETTING[+SETTING...], each setting a --benchmark.flag or an ENV=value; BASE is
# added to every run (the baseline included); variants start only while BUDGET_S seconds have not passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out} WORK=${WORK:-/tmp/ddpm_jax_levers}
rm -rf "$WORK"  # a warm machine keeps the last call's files
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
LOG="$WORK/levers.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader >"$LOG" 2>&1 || true
if [ "${SMOKE:-0}" = 1 ]; then
  CONFIG=configs/tiny.py BASE=${BASE-} BUDGET_S=${BUDGET_S:-300}
  SIZES=(--train_calls=2 --sample_batch=8 --sample_steps=4)
  VARIANTS=${VARIANTS-"spc5:--config.training.steps_per_call=5 rbg_nodrop:JAX_DEFAULT_PRNG_IMPL=rbg+--config.model.dropout=0.0"}
else
  CONFIG=configs/cifar10.py BASE=${BASE-} BUDGET_S=${BUDGET_S:-330}
  SIZES=(--train_calls=100)
  VARIANTS=${VARIANTS-"cudnn:--config.model.attention=cudnn nodrop:--config.model.dropout=0.0 \
b256:--config.training.batch_size=256 \
cbwhile:--config.training.steps_per_call=4+XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}
fi

# bench NAME SETTINGS EXTRA_FLAGS...: one process, its JSON at $WORK/NAME.json.
bench() {
  local name=$1 settings=$2 envs=() flags=() s
  shift 2
  IFS='+' read -ra parts <<<"$BASE${settings:++$settings}"
  for s in "${parts[@]}"; do case $s in --*) flags+=("$s") ;; ?*) envs+=("$s") ;; esac; done
  echo "== $name: ${envs[*]} ${flags[*]}" >>"$LOG"
  env "${envs[@]}" python3 -m ddpm_jax.benchmark --config=$CONFIG "${SIZES[@]}" "$@" "${flags[@]}" \
    --out="$WORK/$name.json" >/dev/null 2>>"$LOG" || echo "$name failed" >>"$LOG"
}
start=$SECONDS
if [ "${BASELINE:-1}" = 1 ]; then
  # The baseline's optimized HLO (its fusions' op_name metadata) lets benchmarks/kernel_sources.py
  # trace each profiled kernel to the model part it comes from.
  dump=(--xla_dump_to="$WORK/hlo" --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit__fun)
  XLA_FLAGS="${XLA_FLAGS:-} ${dump[*]}" bench ddpm_jax "" --skip="${BASE_SKIP:-large}" --profile_dir="$WORK/profile_baseline"
fi
for variant in $VARIANTS; do
  name=${variant%%:*}
  if ((SECONDS - start > BUDGET_S)); then echo "$name skipped: ${BUDGET_S} s budget spent" >>"$LOG"; continue; fi
  bench "ddpm_jax_variant_$name" "${variant#*:}" --skip=parts,sample,large --profile_dir="$WORK/profile_$name"
done
# The baseline again (compiled from the cache): two launches of one program have differed by 40% here.
[ "${BASELINE:-1}" = 1 ] && bench ddpm_jax_variant_baseline_again "" --skip=parts,sample,large
echo "total ${SECONDS} s" >>"$LOG"
# Every run is profiled: its device-busy time per step does not move with the host's launch spread.
for d in "$WORK"/profile_*; do
  [ -d "$d" ] || continue  # no run was profiled
  python3 benchmarks/trace_summary.py --top 40 "$d" >"$WORK/trace_${d##*/profile_}.md" 2>>"$LOG"
done
{ [ -f "$WORK/ddpm_jax.json" ] && python3 benchmarks/compare.py "$WORK"
  for f in "$WORK"/trace_*.md; do n=${f##*/trace_}; echo "- ${n%.md}: $(head -1 "$f")"; done; } >"$WORK/table.md" 2>>"$LOG"
tar czf "$OUT/levers.tgz" -C "$WORK" --exclude='profile_*' --exclude=hlo .
tar czf "$OUT/traces_hlo.tgz" -C "$WORK" $(cd "$WORK" && find profile_* -name perfetto_trace.json.gz; \
  ls hlo/*after_optimizations.txt 2>/dev/null)
cp "$WORK/table.md" "$LOG" "$OUT/"
cat "$WORK/table.md"
