#!/usr/bin/env bash
# On a machine with a CUDA GPU: builds fusedclr in place with its CUDA kernels,
# runs the GPU tests (pytest -m gpu) and the GPU benchmark, and writes the
# results into one folder:
#   env.json          torch / CUDA / GPU versions
#   build.log         the in-place build
#   junit_gpu.xml     the GPU tests (pytest -m gpu), JUnit
#   junit_triton.xml  tests/test_triton.py with compiled kernels (its own process:
#                     the interpreter is chosen per process), JUnit
#   gpu_tests.json    both, summarized (counts, failures)
#   bench_cuda.json   the benchmark (and bench_cuda.png), when `fusedclr bench` exists
#   summary.json      what ran and how it ended
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default: $OUT, else fusedclr-out/gpu)
# Exit status: non-zero when the build or a GPU test failed; a missing or
# failing benchmark is recorded in summary.json but does not fail the script.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-fusedclr-out/gpu}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=$(command -v python3 || command -v python)
fi

# torch derives CUDA_HOME from `which nvcc`, which is wrong when nvcc is a
# wrapper script outside the toolkit (/usr/local/bin/nvcc -> exec .../cuda/bin/nvcc).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

"$PY" - "$OUT_DIR/env.json" <<'PY'
import json, subprocess, sys
import torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except OSError:
    info["nvcc"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PY

build_rc=0
tests_rc=-1
bench_status="not run"

echo "== build (in place, CUDA required)"
FUSEDCLR_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1 || build_rc=$?
tail -n 5 "$OUT_DIR/build.log"
if [ "$build_rc" -eq 0 ]; then
  "$PY" -c "import fusedclr.ops as o; assert o.cuda_kernels_registered(), o.extension_error()" || build_rc=1
fi

if [ "$build_rc" -eq 0 ]; then
  echo "== GPU tests"
  "$PY" -m pytest -m gpu tests/ --ignore=tests/test_triton.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT_DIR/junit_gpu.xml"
  tests_rc=$?
  echo "== Triton tests on the GPU (compiled kernels)"
  TRITON_INTERPRET=0 "$PY" -m pytest tests/test_triton.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT_DIR/junit_triton.xml"
  triton_rc=$?
  if [ "$tests_rc" -eq 0 ] && [ "$triton_rc" -ne 0 ]; then tests_rc=$triton_rc; fi
  "$PY" - "$OUT_DIR/gpu_tests.json" "$OUT_DIR/junit_gpu.xml" "$OUT_DIR/junit_triton.xml" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
out = {}
for path in sys.argv[2:]:
    if not os.path.exists(path):
        out[os.path.basename(path)] = "missing"
        continue
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    part = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    part["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 2)
    part["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                      if c.find("failure") is not None or c.find("error") is not None]
    out[os.path.basename(path)] = part
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps({f: {k: v for k, v in p.items() if k != "failed"} if isinstance(p, dict) else p
                  for f, p in out.items()}))
PY

  echo "== GPU benchmark"
  if "$PY" -m fusedclr bench --help >/dev/null 2>&1; then
    if "$PY" -m fusedclr bench --device cuda --json "$OUT_DIR/bench_cuda.json" --plot "$OUT_DIR/bench_cuda.png"; then
      bench_status="ok"
    else
      bench_status="failed (exit $?)"
    fi
  else
    bench_status="unavailable: 'python -m fusedclr bench' is not in this checkout"
  fi
  echo "bench: $bench_status"
fi

"$PY" - "$OUT_DIR/summary.json" "$build_rc" "$tests_rc" "$bench_status" <<'PY'
import json, sys
path, build_rc, tests_rc, bench = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
summary = {"build_ok": build_rc == 0, "tests_exit": None if tests_rc < 0 else tests_rc, "bench": bench}
json.dump(summary, open(path, "w"), indent=2)
print(json.dumps(summary))
PY

if [ "$build_rc" -ne 0 ]; then
  echo "error: the in-place CUDA build failed; see $OUT_DIR/build.log" >&2
  exit 1
fi
exit "$tests_rc"
