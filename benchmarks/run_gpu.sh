#!/usr/bin/env bash
# ddpm_jax beside the PyTorch peer on one GPU, in one invocation; JSON results and the ratio table.
#
# Needs: a CUDA JAX, torch, and the wheels of what the GPU image lacks (ml_collections, diffusers,
# importlib_metadata), prepared once on a machine with network, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     -d .whl ml_collections==1.1.0 diffusers==0.42.1 importlib_metadata
# Usage (OUT: where results go, default ./bench_out):
#   OUT=/tmp/out bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

# The peer: bf16 autocast + torch.compile with CUDA graphs (its fastest configuration).
python3 benchmarks/peer_torch.py --compile_mode reduce-overhead --out "$OUT/peer.jsonl" || true

# ddpm_jax: first launch fills the persistent compilation cache, the second reuses it.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
python3 -m ddpm_jax.benchmark --config=configs/cifar10.py --out="$OUT/ddpm_jax.json" 2>"$OUT/ddpm_jax.log"
python3 -m ddpm_jax.benchmark --config=configs/cifar10.py --skip=sample,large --train_calls=5 \
  --out="$OUT/ddpm_jax_cached.json" 2>>"$OUT/ddpm_jax.log"
python3 benchmarks/compare.py "$OUT" | tee "$OUT/table.md"
