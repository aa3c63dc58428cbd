#!/usr/bin/env bash
# Before a run on a lent NVIDIA GPU (the `device` tool; README "On a lent GPU"): everything the run needs that
# the device machine cannot build or fetch quickly, in .gpu/ (git-ignored, carried by the run, ~10 MiB; the
# build itself in .gpu-build/, also ignored, not carried).
#   * _C for the device's Python 3.12 with the CUDA kernels for sm_90 (H100 / H200) only: a build there would
#     spend minutes of the 15-minute device budget. _C links no torch, so it does not care that the device's
#     torch (2.11, cu130) is not ours.
#   * the wheels its image lacks: diffusers (this machine's version) and importlib_metadata.
# Needs a CUDA compiler and a Python 3.12 here (PY312, else python3.12 on PATH, else pyenv's 3.12.x).
set -euo pipefail
cd "$(dirname "$0")/.."
for cand in ${PY312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$(command -v "$cand"); break; fi
done
[ -n "${PY312:-}" ] || { echo "gpu-prepare: no runnable Python 3.12 here (set PY312)" >&2; exit 1; }
for d in /.gpu/ /.gpu-build/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
rm -rf .gpu/whl && mkdir -p .gpu/whl
cmake -S . -B .gpu-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY312" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DSVDQUANT_CUDA=ON -DSVDQUANT_CUDA_ARCHS=90 >.gpu/cmake.log
cmake --build .gpu-build >.gpu/build.log
cp .gpu-build/diffusers_svdquant/_C.cpython-312-x86_64-linux-gnu.so .gpu/
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  "diffusers==$(python -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata
git rev-parse HEAD >.gpu/commit
echo "ready: .gpu/ ($(du -sh .gpu | cut -f1) to carry) for $(cat .gpu/commit)"
