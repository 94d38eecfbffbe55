#!/usr/bin/env bash
# The prepared GPU run of issue 11: one command on a bare H100 / H200 machine (see benchmarks/README.md).
#
#   bash benchmarks/gpu_run.sh [--budget SECONDS] [--only STAGES] [--dry-run] [--git-commit SHA]
#
# From the repository root. Brings its own Python packages as wheels in .whl/ and its fixtures in .fixtures/
# (both git-ignored; benchmarks/README.md names them), and restores the compile and tuning caches of an earlier run
# from .gpucache/gpu-cache.tar.gz.NN when present. Stages run in priority order (python3 benchmarks/gpu_plan.py);
# a stage that would not finish within the budget, or lacks a package or fixture file, is skipped and named; one
# that fails says why in one line and the next one runs (no step here aborts the run: no `set -e`). Writes to
# $OUT (default ./gpu-out): gpu-run.json (every stage's status and its JSON, rewritten after each stage; the
# stage files also go to benchmarks/results/) and gpu-cache.tar.gz.NN (the caches, split under 16 MiB) for the next
# window: few files, as at most 8 come back from the device machine.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu-out}"
COMMIT="${TRITONSD_GIT_COMMIT:-}"
PLAN_ARGS=()
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget|--only) [ $# -ge 2 ] || { echo "gpu_run.sh: error: $1 needs a value" >&2; exit 2; }
                     PLAN_ARGS+=("$1" "$2"); shift ;;
    --git-commit) [ $# -ge 2 ] || { echo "gpu_run.sh: error: $1 needs a value" >&2; exit 2; }
                  COMMIT="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$COMMIT" ]; then COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"; fi
export TRITONSD_GIT_COMMIT="$COMMIT"

# the package: a `tritonsd` link to this tree on PYTHONPATH, carried wheels (diffusers & co.) beside it
PP="/tmp/tritonsd-pp-$(printf %s "$ROOT" | cksum | cut -d' ' -f1)"  # one per checkout
mkdir -p "$PP" && ln -sfn "$ROOT" "$PP/tritonsd"
if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  PIP=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
  if ! "${PIP[@]}" .whl/*.whl > /tmp/pip-install.log 2>&1; then
    # then one at a time: a wheel that does not install costs only the stages that need it (they say so)
    for whl in .whl/*.whl; do
      "${PIP[@]}" "$whl" > /tmp/pip-install.log 2>&1 || echo "gpu_run.sh: note: $(basename "$whl") not installed:" \
        "$(grep -m1 -i error /tmp/pip-install.log || tail -n1 /tmp/pip-install.log)" >&2
    done
  fi
  export PYTHONPATH="/tmp/site:$PP${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRITONSD_FIXTURES="${TRITONSD_FIXTURES:-$ROOT/.fixtures}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

# the caches: Triton's compiled kernels and our tuning table, restored from the last run's archive if carried
CACHE=/tmp/tritonsd-gpu-cache/cache
export TRITON_CACHE_DIR="$CACHE/triton" TRITONSD_CACHE="$CACHE/tritonsd" TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor"
WARM=()
if [ "$DRY" = 0 ]; then
  mkdir -p "$TRITON_CACHE_DIR" "$TRITONSD_CACHE" "$TORCHINDUCTOR_CACHE_DIR" "$OUT"
  # exit 1: no archive carried; 2: an unusable one (gpu_plan says why in one line): either way a cold start
  if python3 benchmarks/gpu_plan.py restore --from .gpucache --to "$CACHE"; then
    echo "restored the compile and tuning caches from .gpucache/"; WARM=(--warm)
  fi
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
    || echo "gpu_run.sh: note: nvidia-smi did not answer" >&2
  exec python3 benchmarks/gpu_plan.py run ${PLAN_ARGS[@]+"${PLAN_ARGS[@]}"} ${WARM[@]+"${WARM[@]}"} --out "$OUT" \
    --fixtures "$TRITONSD_FIXTURES" --cache-root "$CACHE" --git-commit "$COMMIT"
fi
compgen -G ".gpucache/gpu-cache.tar.gz.[0-9][0-9]" > /dev/null && WARM=(--warm)
# the dry run also names the stages that would be skipped for want of a carried wheel or fixture file
exec python3 benchmarks/gpu_plan.py plan ${PLAN_ARGS[@]+"${PLAN_ARGS[@]}"} ${WARM[@]+"${WARM[@]}"} \
  --fixtures "$TRITONSD_FIXTURES" --wheels .whl
