#!/usr/bin/env bash
# The GPU acceptance run (issue 11): the Ray-free training loop with NCCL on one GPU (NF4 + ZeRO-2,
# kernels off and on, eval, a checkpoint and a resume), the GPU tests of tests/test_gpu_path.py, the
# kernel benchmark and the tokens/s + MFU benchmark; one report, gpu_acceptance.md, under $OUT (or --out).
# At most 8 minutes on one H200 with no network and no Ray.
#
#   bash tests/benchmarks/gpu_acceptance.sh --dry-run   # here, on a CPU machine WITH PyPI access: download the
#                                                       # wheels of tests/benchmarks/gpu_wheels.txt into .whl/,
#                                                       # check their size with the working tree (<= 64 MiB),
#                                                       # and run the whole loop plumbing on CPU without Ray
#   bash tests/benchmarks/gpu_acceptance.sh             # on the GPU machine, with .whl carried (device tool:
#                                                       # carry [".whl"]); writes $OUT/gpu_acceptance.md
# --no-wheels (with --dry-run): skip the download and size check (no network needed; what the test runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
DRY=0 WHEELS=1 OUTDIR="${OUT:-$REPO/runs/gpu_acceptance}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-wheels) WHEELS=0 ;;
    --out) OUTDIR="$2"; shift ;;
    *) echo "gpu_acceptance.sh: unknown argument $1 (use --dry-run, --no-wheels, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}

# raysft.pipeline / raysft.kernels from this checkout, without installing it (no pip install -e).
SHIM=$(mktemp -d /tmp/raysft-shim.XXXXXX)
mkdir -p "$SHIM/raysft"
ln -s "$REPO/pipeline" "$SHIM/raysft/pipeline"
ln -s "$REPO/kernels" "$SHIM/raysft/kernels"
trap 'rm -rf "$SHIM"' EXIT

WHEEL_DIR="$REPO/.whl"   # ignored by git (.gitignore)
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

if [ "$DRY" = 1 ]; then
  if [ "$WHEELS" = 1 ]; then
    mkdir -p "$WHEEL_DIR"
    grep -v '^#' tests/benchmarks/gpu_wheels.txt | grep -v '^$' | while read -r spec kind; do
      if [ "$kind" = sdist ]; then
        $PY -m pip download -q --no-deps --no-binary=:all: -d "$WHEEL_DIR" "$spec"
      else
        # shellcheck disable=SC2086
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          $PLATFORMS -d "$WHEEL_DIR" "$spec"
      fi
    done
    CHECK="--wheels $WHEEL_DIR"
  else
    CHECK="--no-wheels"
  fi
  # shellcheck disable=SC2086
  PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" $PY tests/benchmarks/gpu_acceptance.py --dry-run $CHECK --out "$OUTDIR"
  exit $?
fi

SITE=/tmp/raysft-site
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl
DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
  --target "$SITE" "$WHEEL_DIR"/deepspeed-*.tar.gz
PYTHONPATH="$SHIM:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  $PY tests/benchmarks/gpu_acceptance.py --out "$OUTDIR"
