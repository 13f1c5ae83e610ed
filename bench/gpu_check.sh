#!/usr/bin/env bash
# The GPU check: run from the repository root on a bare CUDA machine that has torch but no
# network (the lent H200 has CUDA torch, xarray, h5py, pluggy, tensorboard, scikit-learn,
# pytest-xdist; not netCDF4, cftime, mido, dask).
#
#   here (network):  bench/gpu_wheels.sh            # wheels into .whl/ (git-ignored)
#   there:           bash bench/gpu_check.sh        # with .whl carried along
#
# It installs the wheels and this repository (no network), then runs, each under its own
# time limit: the test suite with CUDA visible, the demo pipeline on CUDA, and the GPU
# benchmarks; bench/gpu_check.py writes gpu_check.json (device named) into $OUT, or
# bench/results/ when OUT is unset. About 5-6 minutes in all (each step capped: 150 + 90 + 120
# + 110 + 60 s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/mi-site}
mkdir -p "$SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || { echo "gpu_check: installing .whl failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # the repository first
# this repository and its plugin packages, for their entry points (built offline)
for d in . plugins/*/; do
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
      --upgrade --target "$SITE" "$d" >/dev/null || { echo "gpu_check: installing $d failed" >&2; exit 1; }
done
exec env PYTHONUNBUFFERED=1 $PY -m bench.gpu_check "$@"
