#!/usr/bin/env bash
# GPU check of pamjax (issue 15, item 5): install with JAX's CUDA wheels, run the test
# subset that matters on a GPU, `pamjax bench` (PAM trace replay, per-phase step, leap,
# configuration batching) and one vmapped batch of 1,024 PAM configurations over the first
# 2,000 requests of the Azure conversation trace (synthetic when the trace is absent).
# Every figure goes to files under the output directory. Sized for < 8 minutes on one GPU.
#
#   experiments/device_check.sh [OUT_DIR]              # GPU: installs jax[cuda12]
#   experiments/device_check.sh --cpu-small [OUT_DIR]  # the same on CPU at a reduced size
#   PAMJAX_CPU_SMALL=1 experiments/device_check.sh      # same as --cpu-small
#
# OUT_DIR defaults to $OUT (the device machine's output folder), else ./device_check_out.
# The trace is read from $PAMJAX_TRACE or ../shared/traces/ (never copied here).
set -euo pipefail

small="${PAMJAX_CPU_SMALL:-0}"
if [[ "${1:-}" == "--cpu-small" ]]; then small=1; shift; fi
out="${1:-${OUT:-device_check_out}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PAMJAX_NO_CACHE=1
log() { echo "[device_check $(date -u +%H:%M:%S)] $*" | tee -a "$out/log.txt"; }

if [[ "$small" == 1 ]]; then
  log "CPU, reduced size (no install: the current Python environment)"
  export JAX_PLATFORMS=cpu
  tests=(tests/test_unit_sizing.py::test_fitted_run_equals_full_run)
  bench=(--quick --sections pam --pam-requests 20)
  vmapped=(--configs 8 --requests 40 --budget-s 20 --chunk 64)
else
  log "installing pamjax with jax[cuda12]"
  python -m pip install -q -e ".[test]" "jax[cuda12]" 2>&1 | tail -3 | tee -a "$out/log.txt"
  tests=(tests/test_engine.py tests/test_leap.py tests/test_unit_sizing.py
         tests/test_engine_reference.py)
  bench=(--quick --sections pam azure scaling --pam-requests 2000)
  vmapped=(--configs 1024 --requests 2000 --budget-s 150)
fi

python - <<'PY' 2>&1 | tee "$out/environment.txt"
import jax, subprocess, pamjax
print("pamjax", pamjax.__file__)
print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
try:
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout)
except OSError:
    print("no nvidia-smi")
PY
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || echo unknown > "$out/commit.txt"

status=0
log "tests: ${tests[*]}"
python -m pytest -q -x "${tests[@]}" --junitxml="$out/tests.xml" 2>&1 | tail -5 \
  | tee "$out/tests.txt" || status=1
log "pamjax bench ${bench[*]}"
python -m pamjax.cli bench "${bench[@]}" --quiet --json "$out/bench.json" \
  > "$out/bench.txt" 2>&1 || status=1
tail -20 "$out/bench.txt" | tee -a "$out/log.txt"
log "vmapped batch: ${vmapped[*]}"
python experiments/vmapped_batch.py "${vmapped[@]}" --out "$out/vmapped.json" \
  > "$out/vmapped.txt" 2>&1 || status=1
tail -20 "$out/vmapped.txt" | tee -a "$out/log.txt"
log "done (status $status); figures in $out"
exit $status
