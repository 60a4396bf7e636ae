#!/usr/bin/env bash
# run_gpu_checks.sh [--wheelhouse DIR] [--no-install] [--budget SECONDS] [PYTEST_ARGS...]
#
# Runs the GPU verifications (tests/gpu, marked gpu) on a machine with >= 2 NVIDIA GPUs, in one go,
# from the repository root:
#   1. installs the offline SGLang 0.5.17 wheelhouse into $SITE (default /tmp/site) with
#      DIR/bin/install-wheelhouse.sh DIR --require-complete (skip with --no-install, or when DIR
#      does not exist). On the device machine DIR/a and DIR/b arrive in two transfers: install a/
#      with `bash DIR/bin/install-wheelhouse.sh DIR` first, then run this with b/ (docs/gpu.md);
#   2. sets CUDA_HOME (SGLang's JIT kernels need the toolkit root), PYTHONPATH=$SITE, offline HF,
#      NCCL_CUMEM_ENABLE=0 (trainer side of the NCCL weight sync);
#   3. makes `miles` importable with its mapped folders (miles.launchers, miles.kernels): an editable
#      install (pip -e . --no-deps --no-build-isolation) when `import miles.launchers.local` fails;
#   4. runs python3 -m pytest -m gpu -s -v [PYTEST_ARGS or the four GPU test files, most important
#      first] under `timeout --budget` (default 560 s, SIGINT so fixtures stop the servers);
#   5. writes into $OUT_DIR (LOG_DIR, else $OUT, else ./gpu-results): env.txt (GPUs, versions),
#      pytest.log, results.json (the numbers each test recorded), junit.xml, logs.tar.gz (server
#      and driver logs), summary.txt (one line per test and the numbers).
# Env: SITE=/tmp/site PY=python3 PER_TEST_TIMEOUT=480 (s)  MILES_GPU_REHEARSAL=1 (CPU rehearsal)
# Exit status: pytest's (0 = all selected tests passed or were skipped), 3 = setup failed, 2 = usage.
set -uo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 3
WH=.wheelhouse; INSTALL=1; BUDGET=560; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) [ $# -ge 2 ] || usage; WH=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
    -h|--help) usage ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
SITE=${SITE:-/tmp/site}; PY=${PY:-python3}; PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-480}
OUT_DIR=${LOG_DIR:-${OUT:-$REPO/gpu-results}}
SERVER_LOGS=$(mktemp -d /tmp/miles-gpu-logs.XXXXXX)
mkdir -p "$OUT_DIR"
T0=$(date +%s)
log() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# -- 1. wheelhouse ------------------------------------------------------------------------------
if [ "$INSTALL" = 1 ] && [ -d "$WH" ]; then
  log "install $WH -> $SITE"
  SITE=$SITE PY=$PY bash "$WH/bin/install-wheelhouse.sh" "$WH" --require-complete || { log "wheelhouse install failed"; exit 3; }
fi

# -- 2. environment -----------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
    [ -x "$c/bin/nvcc" ] && { CUDA_HOME=$c; break; }
  done
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
if [ -n "${CUDA_HOME:-}" ]; then export CUDA_HOME; PATH="$CUDA_HOME/bin:$PATH"; fi
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NCCL_CUMEM_ENABLE=0
export MILES_GPU_LOG_DIR=$SERVER_LOGS MILES_GPU_RESULTS=$OUT_DIR/results.json

# -- 3. miles importable ------------------------------------------------------------------------
# `miles.launchers` and `miles.kernels` are folders mapped by setup.py's package_dir: a plain
# PYTHONPATH=repo does not see them. An editable install adds setuptools' import hook for the map.
if ! "$PY" -c 'import miles.launchers.local' >/dev/null 2>&1; then
  log "miles.launchers not importable: pip install -e . (no deps, no index)"
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . \
      >"$SERVER_LOGS/pip-miles.log" 2>&1; then
    tail -n 5 "$SERVER_LOGS/pip-miles.log"
    log "editable install failed; linking miles/launchers and miles/kernels instead (untracked links)"
    for d in launchers kernels; do [ -e "miles/$d" ] || ln -s "../$d" "miles/$d"; done
  fi
fi
"$PY" -c 'import miles.launchers.local, miles.engines.sglang' || { log "miles still not importable"; exit 3; }

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
  echo "command: $0 ${ARGS[*]:-}"
  echo "CUDA_HOME=${CUDA_HOME:-unset} nvcc=$(command -v nvcc || echo missing)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: none"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "tokenizers", "sglang", "megatron.core", "triton", "flashinfer"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report and go on: the tests say what they need
        print(f"{name} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
EOF
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# -- 4. the checks ------------------------------------------------------------------------------
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=(tests/gpu/test_sglang_logprobs.py tests/gpu/test_sglang_weight_sync.py
        tests/gpu/test_gpu_grpo_step.py tests/gpu/test_sglang_routed_experts.py
        tests/gpu/test_megatron_parallel.py tests/gpu/test_kernel_parity.py)
fi
log "pytest (budget ${BUDGET} s, ${PER_TEST_TIMEOUT} s per test): ${ARGS[*]}"
timeout -s INT -k 30 "$BUDGET" "$PY" -m pytest -m gpu -s -v -p no:cacheprovider --timeout "$PER_TEST_TIMEOUT" \
  --junitxml "$OUT_DIR/junit.xml" "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/pytest.log"
RC=${PIPESTATUS[0]}
log "pytest exit code $RC"

# -- 5. summary and logs --------------------------------------------------------------------------
{
  echo "exit code: $RC ($( [ "$RC" = 124 ] && echo "budget of $BUDGET s ran out" || echo pytest))"
  "$PY" - "$OUT_DIR/junit.xml" <<'EOF' || true
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    print(f"{outcome.upper():8s} {case.get('classname')}::{case.get('name')} ({float(case.get('time', 0)):.1f} s)")
EOF
  grep -E '^RESULT ' "$OUT_DIR/pytest.log" || true
  tail -n 1 "$OUT_DIR/pytest.log"
} >"$OUT_DIR/summary.txt"
tar -C "$SERVER_LOGS" -czf "$OUT_DIR/logs.tar.gz" . 2>/dev/null || true
log "outputs in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit "$RC"
