#!/usr/bin/env bash
# Prepare, on a machine with network, what benchmarks/gpu_run.sh carries to the bare GPU machine (git-ignored):
#   .whl/       the Python packages the GPU image lacks (its python3 is 3.12 with torch 2.11 and triton 3.6)
#   .fixtures/  the tiny fixtures and key manifests the stages read (<= 40 MiB)
# and keep .gpucache/ (the last run's gpu-cache.tar.gz.NN, copied from its $OUT) if there is one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FIX="${TRITONSD_FIXTURES:-$ROOT/../shared/fixtures}"

# diffusers for the peer rows; ftfy (a tritonsd dependency) and wcwidth (ftfy's); importlib_metadata (diffusers');
# pytest and its dependencies for stages 2-3 (the image is not known to have it; carried, it cannot be missing)
WHEELS="diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0
pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 packaging==26.2 pygments==2.20.0"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS

FILES="sd1-tiny.safetensors sd1-tiny.yaml sd1-tiny.reference.safetensors sd1-tiny.reference.json
lora-sd1-tiny.safetensors controlnet-sd1-tiny.safetensors manifests/sd15.json manifests/sd21-v.json manifests/sdxl-base.json manifests/README.md"
mkdir -p .fixtures/manifests
for f in $FILES; do cp "$FIX/$f" ".fixtures/$f"; done
size=$(du -sm .fixtures | cut -f1)
echo ".whl: $(ls .whl | tr '\n' ' ')"
echo ".fixtures: ${size} MiB"
[ "$size" -le 40 ] || { echo "gpu_prepare.sh: error: .fixtures is over 40 MiB" >&2; exit 1; }
# .whl/, .fixtures/ and .gpucache/ are in .gitignore (a worktree's .git is a file: no .git/info/exclude to edit)
mkdir -p .gpucache
echo "run on the device: bash benchmarks/gpu_run.sh --git-commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
