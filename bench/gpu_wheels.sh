#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh: the packages the lent GPU machine (Python 3.12, no network)
# lacks, for the versions installed in .venv here, into .whl/ (ignored by git through
# .git/info/exclude). Carry .whl along with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
for pkg in netCDF4 cftime mido dask partd locket; do
  version=$($PY -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$pkg${version:+==$version}"
done
du -sh .whl
