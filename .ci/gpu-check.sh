#!/usr/bin/env bash
# The one run on a lent NVIDIA GPU, prepared here by .ci/gpu-prepare.sh (README "On a lent GPU"):
#   device run(command="bash .ci/gpu-check.sh", carry=[".gpu"], timeout_s=540)
# Puts the carried wheels beside the device image's packages and the carried _C into the package, then runs the
# GPU tests and benchmarks; each step's log and a summary land in $OUT (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="/tmp/site:$PWD"
if [ "$(git rev-parse HEAD 2>/dev/null)" != "$(cat .gpu/commit 2>/dev/null)" ]; then
  echo "warning: .gpu/ was prepared at $(cat .gpu/commit 2>/dev/null), the tree is at $(git rev-parse HEAD 2>/dev/null)"
fi | tee "$OUT/summary.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
cp .gpu/_C.cpython-312-x86_64-linux-gnu.so diffusers_svdquant/
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s; $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
}
step env 60 bash -c 'nvidia-smi; python3 -c "import torch, diffusers; from diffusers_svdquant import ops; \
print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name(), ops.cuda_kernels_available())"'
step tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_w4a16.py \
  tests/test_gptq.py tests/test_fixedpoint.py tests/test_fixed_point_op.py \
  tests/test_calibration_passes.py::test_a_model_on_a_gpu_adds_each_call_in_fixed_point
step bench_linear_cuda 150 python3 benchmarks/bench_linear_cuda.py
step bench_xtx 60 python3 benchmarks/bench_xtx.py
exit 0
