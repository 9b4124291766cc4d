#!/usr/bin/env bash
# The whole course at full size on one GPU in one call of at most 10 minutes; the same steps at tiny sizes
# on the CPU with --tiny (CI: tests/test_gpu_course.py). What each step does: .ci/gpu_course.py's docstring.
#
#   bash .ci/gpu_prepare.sh        # HERE, with PyPI: wheels into .whl/, the JPEG tar into .gpu-data/
#   bash .ci/gpu_course.sh         # on the GPU machine (no network): figures.json + notebooks.tar.gz in $OUT
#   bash .ci/gpu_course.sh --tiny  # on any CPU, ~2 minutes
#   options: --budget S (all steps, default 540), --steps bench,schedule,... , --parallel N (notebooks at once)
#
# It installs the carried wheels (if .whl/ holds any) into output/gpu-course-work/site — never touching
# the preinstalled torch/torchvision — and puts them and this checkout (course_utils) on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
WORK=${GPU_COURSE_WORK:-output/gpu-course-work}  # data, kernel, carried packages, logs
mkdir -p "$WORK"
missing() {
  "$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("papermill", "nbclient", "nbformat", "ipykernel", "jupyter_client", "ipywidgets",
                           "matplotlib", "tqdm", "torch", "torchvision") if importlib.util.find_spec(m) is None))
PY
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$(missing)" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $WORK/site"
  rm -rf "$WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$PWD/$WORK/site"  # none of them is preinstalled (gpu_prepare.sh)
fi
if [ -n "$(missing)" ]; then
  echo "missing Python packages: $(missing) — run 'bash .ci/gpu_prepare.sh' where PyPI is reachable and carry .whl" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec "$PY" .ci/gpu_course.py --work "$WORK" "$@"
