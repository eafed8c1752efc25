#!/usr/bin/env bash
# On a machine with a CUDA GPU: builds fusedclr in place with its CUDA kernels,
# runs the GPU tests and the GPU benchmark inside one time budget, and writes
# the results into one folder (eleven files at most):
#   summary.json    machine, versions, every stage's status and seconds, test
#                   counts and the names of failed tests
#   build.log       the in-place build
#   junit.xml       every test run below, one <testsuite> each (JUnit)
#   console.log     everything the tests and the benchmark printed
#   iteration_cuda.json / .md  the headline: whole training iterations and the step
#                   with replaced gradients, torch fused AdamW against fusedclr's
#                   (`python -m fusedclr.bench.iteration --device cuda`)
#   bench_new_cuda.json / .md  the new optimizers' step rows (RMSprop, Adagrad, RAdam,
#                   NAdam, Lion, Lookahead) against torch's for-loop / foreach / fused
#   bench_cuda.json `fusedclr bench --device cuda`, rewritten after every case
#   bench_cuda.md   its tables (constant lr and OneCycleLR)
#   bench_cuda.png  its plot
#
# Stages, in this order; each is capped and keeps time for the ones after it:
#   1. build      pip install --no-build-isolation --no-deps -e .  (CUDA required)
#   2. gpu tests  pytest -m gpu tests/ (all but test_triton.py)
#   3. triton     tests/test_triton.py with compiled kernels (TRITON_INTERPRET=0, a
#                 process of its own: Triton picks the interpreter per process)
#   4. iteration  the whole-iteration benchmark (capped at 150 s)
#   5. new optims `fusedclr bench` for rmsprop, adagrad, radam, nadam, lion, lookahead: fp32,
#                 constant lr, 2000x1024 then 200x1M, torch for-loop / foreach / fused
#                 (where torch has one) against fusedclr's CUDA kernels; capped at 100 s,
#                 keeping 100 s for stage 6 (cases not reached are listed as not run)
#   6. bench      AdamW, fp32 and bf16, constant lr and OneCycleLR, docs/DESIGN.md's
#                 shapes (the issues' target shapes first); torch for-loop / foreach /
#                 fused against fusedclr's CUDA and Triton kernels; fp32 tables
#                 first. It gets the rest of the budget, and no case starts once
#                 that has passed (the rest are listed as not run)
# Tests run in parallel with pytest-xdist when it is installed; the tests marked
# `timing` (host time per step) run alone, after the others of their stage.
#
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default: $OUT, else fusedclr-out/gpu)
# Environment:
#   GPU_CHECK_BUDGET_S  seconds for the whole script (default 540); stages that
#                       find too little left are recorded as not run
#   GPU_CHECK_WORKERS   pytest-xdist workers (default: min(8, cores))
#   GPU_CHECK_BENCH     extra `fusedclr bench` arguments, appended (e.g.
#                       "--providers torch-fused,torch-compile,fusedclr-cuda --compile-timeout 120")
#   PYTHON              interpreter (default: .venv/bin/python, else python3)
# Exit status: non-zero when the build or a test failed or a stage ran out of
# time; a failing benchmark is recorded in summary.json but does not fail the script.
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
export PYTHONUNBUFFERED=1

# torch derives CUDA_HOME from `which nvcc`, which is wrong when nvcc is a
# wrapper script outside the toolkit (/usr/local/bin/nvcc -> exec .../cuda/bin/nvcc).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
if [ "$BUDGET_S" -lt 180 ]; then
  echo "error: GPU_CHECK_BUDGET_S=$BUDGET_S is too short for a build and the tests (at least 180)" >&2
  exit 2
fi
# Results of an earlier run must not pass for this one's.
rm -f "$OUT_DIR"/iteration_cuda.json "$OUT_DIR"/iteration_cuda.md "$OUT_DIR"/bench_cuda.json "$OUT_DIR"/bench_cuda.md "$OUT_DIR"/bench_cuda.png "$OUT_DIR"/*.tmp \
  "$OUT_DIR"/bench_new_cuda.json "$OUT_DIR"/bench_new_cuda.md \
  "$OUT_DIR"/summary.json "$OUT_DIR"/junit.xml
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGES="$WORK/stages.tsv" # name, status, seconds
: >"$STAGES"
CONSOLE="$OUT_DIR/console.log"
: >"$CONSOLE"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
# cap SECONDS RESERVE: what a stage may take: at most SECONDS, keeping RESERVE seconds for
# the stages after it while that leaves it a minute; else whatever is left (earlier
# stages come first).
cap() {
  local l
  l=$(left)
  if [ $((l - $2)) -ge 60 ]; then min "$1" $((l - $2)); else min "$1" "$l"; fi
}
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$STAGES"; echo "== $1: $2 (${3} s)"; }

# run_stage NAME SECONDS CMD...: runs CMD under `timeout`, output to the console log and here.
run_stage() {
  local name=$1 limit=$2 t0 rc
  shift 2
  if [ "$limit" -lt 20 ]; then
    record "$name" "not run: $(left) s of the ${BUDGET_S} s budget left" 0
    return 99
  fi
  echo "== $name (up to ${limit} s)" | tee -a "$CONSOLE"
  t0=$(date +%s)
  # SIGINT first: pytest stops as on Ctrl-C and still writes its JUnit report.
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$CONSOLE"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; then
    record "$name" "timed out after ${limit} s" $(($(date +%s) - t0))
  else
    record "$name" "exit $rc" $(($(date +%s) - t0))
  fi
  return "$rc"
}

"$PY" - "$WORK/env.json" <<'PY'
import json, os, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cores": os.cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
for mod in ("triton", "numpy", "xdist"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        info[mod] = None
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except (OSError, IndexError):
    info["nvcc"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PY

HAVE_GPU=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  HAVE_GPU=0
  echo "warning: no CUDA GPU is visible: only the build is checked (nothing to test or measure), the script fails" >&2
fi

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  CORES=$(nproc)
  WORKERS=${GPU_CHECK_WORKERS:-$((CORES < 8 ? CORES : 8))}
  # worksteal: the slow tests (Inductor compiles) sit next to each other in a module.
  [ "$WORKERS" -gt 1 ] && XDIST=(-n "$WORKERS" --dist worksteal)
fi
# pytest through a wrapper that restores Python's SIGINT handler: a shell started in the
# background inherits SIGINT ignored, and then `timeout -s INT` would not stop pytest,
# which writes its JUnit report only when it stops by itself or on an interrupt.
PYTEST=("$PY" -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' -q -rs -p no:cacheprovider)

ok=1
# 1. build
build_s=$(cap 300 200)
echo "== build (in place, CUDA required; up to ${build_s} s)"
t0=$(date +%s)
FUSEDCLR_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout -k 15 "$build_s" \
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1
build_rc=$?
tail -n 5 "$OUT_DIR/build.log"
if [ "$build_rc" -eq 0 ]; then
  "$PY" -c "import fusedclr.ops as o; assert o.cuda_kernels_registered(), o.extension_error()" >>"$OUT_DIR/build.log" 2>&1 ||
    build_rc=1
fi
record build "exit $build_rc" $(($(date +%s) - t0))

if [ "$build_rc" -ne 0 ]; then
  ok=0
elif [ "$HAVE_GPU" -eq 0 ]; then
  ok=0
  for stage in "gpu tests" "triton tests" iteration "bench new optimizers" bench; do
    record "$stage" "not run: no CUDA GPU is visible" 0
  done
else
  # 2. the GPU tests (the modules that have any; collecting the others would only cost time).
  GPU_MODULES=$(grep -l "mark.gpu" tests/test_*.py | grep -v test_triton.py)
  # shellcheck disable=SC2086 # one path per word
  run_stage "gpu tests" "$(cap 200 240)" "${PYTEST[@]}" "${XDIST[@]}" -m "gpu and not timing" $GPU_MODULES \
    --junitxml="$WORK/junit_gpu.xml" || ok=0
  if [ -n "$GPU_MODULES" ] && grep -q "mark.timing" $GPU_MODULES; then
    # shellcheck disable=SC2086
    run_stage "gpu timing tests" "$(cap 60 230)" "${PYTEST[@]}" -m "gpu and timing" $GPU_MODULES \
      --junitxml="$WORK/junit_gpu_timing.xml" || ok=0
  fi

  # 3. the Triton suite with compiled kernels, in processes of its own.
  run_stage "triton tests" "$(cap 200 150)" env TRITON_INTERPRET=0 "${PYTEST[@]}" "${XDIST[@]}" -m "not timing" \
    tests/test_triton.py --junitxml="$WORK/junit_triton.xml" || ok=0
  run_stage "triton timing tests" "$(cap 60 140)" env TRITON_INTERPRET=0 "${PYTEST[@]}" -m timing \
    tests/test_triton.py --junitxml="$WORK/junit_triton_timing.xml" || ok=0

  # 4. the headline: the whole training iteration (each library's defaults).
  run_stage iteration "$(cap 150 220)" bash -c '"$0" -m fusedclr.bench.iteration --device cuda --rounds 5 \
    --json "$1/iteration_cuda.json" > "$1/iteration_cuda.md"' "$PY" "$OUT_DIR" || true

  # 5. the new optimizers' step rows: no case starts after 40 s before the stage's cap, so the
  #    case under way (a 200x1M case takes seconds on a GPU) ends inside it.
  new_s=$(cap 100 100)
  if [ "$new_s" -lt 60 ]; then
    record "bench new optimizers" "not run: $(left) s of the ${BUDGET_S} s budget left" 0
  else
    run_stage "bench new optimizers" "$new_s" "$PY" -m fusedclr bench --device cuda \
      --optimizer rmsprop,adagrad,radam,nadam,lion,lookahead --dtypes fp32 --schedules constant \
      --shapes 2000x1024,200x1M --providers torch-forloop,torch-foreach,torch-fused,fusedclr-cuda --seconds 0.2 \
      --time-limit "$((new_s - 40))" --json "$OUT_DIR/bench_new_cuda.json" \
      --markdown "$OUT_DIR/bench_new_cuda.md" || true
  fi

  # 6. the step benchmark gets what is left: no case starts after its time limit, and the
  #    case under way when it passes may run on for up to 50 s (then the summary).
  bench_s=$(($(left) - 70))
  if [ "$bench_s" -lt 30 ]; then
    record bench "not run: $(left) s of the ${BUDGET_S} s budget left" 0
  else
    # shellcheck disable=SC2086 # GPU_CHECK_BENCH is a list of arguments
    run_stage bench "$((bench_s + 50))" "$PY" -m fusedclr bench --device cuda --optim adamw --dtypes fp32,bf16 \
      --shapes 200x1M,10000x64,2000x1024,gpt2-small,resnet50,10x16M \
      --providers torch-forloop,torch-foreach,torch-fused,fusedclr-cuda,fusedclr-triton --seconds 0.5 \
      --time-limit "$bench_s" --json "$OUT_DIR/bench_cuda.json" --markdown "$OUT_DIR/bench_cuda.md" \
      --plot "$OUT_DIR/bench_cuda.png" ${GPU_CHECK_BENCH:-}
  fi
fi

"$PY" - "$OUT_DIR" "$WORK" "$ok" <<'PY'
import glob, json, os, sys, xml.etree.ElementTree as ET
out_dir, work, ok = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
summary = {"ok": ok, "env": json.load(open(os.path.join(work, "env.json")))}
summary["stages"] = []
for line in open(os.path.join(work, "stages.tsv")):
    stage, status, seconds = line.rstrip("\n").split("\t")
    summary["stages"].append({"stage": stage, "status": status, "seconds": int(seconds)})
if not summary["env"]["cuda_available"]:
    summary["ok"] = False
    summary["why_not_ok"] = "no CUDA GPU was visible: only the build was checked; no test ran and nothing was measured"
merged = ET.Element("testsuites")
tests = {}
for path in sorted(glob.glob(os.path.join(work, "junit_*.xml"))):
    name = os.path.basename(path)[len("junit_"):-len(".xml")]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    part = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    part["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    part["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                      if c.find("failure") is not None or c.find("error") is not None]
    tests[name] = part
    for s in suites:
        s.set("name", name)
        merged.append(s)
summary["tests"] = tests
ET.ElementTree(merged).write(os.path.join(out_dir, "junit.xml"), encoding="utf-8", xml_declaration=True)
for key, name in (("bench", "bench_cuda.json"), ("bench_new_optimizers", "bench_new_cuda.json")):
    bench = os.path.join(out_dir, name)
    if not os.path.exists(bench):
        continue
    report = json.load(open(bench))
    rows = [r for r in report["results"] if r["status"] == "ok"]
    summary[key] = {"cases": len({(r["optim"], r["shape"], r["dtype"], r["schedule"]) for r in rows}),
                    "complete": report.get("complete"),
                    "not_run": len(report.get("not_run", [])),
                    "errors": [f"{r['optim']} {r['provider']} {r['shape']} {r['dtype']}: {r['reason']}"
                               for r in report["results"] if r["status"] == "error"]}
json.dump(summary, open(os.path.join(out_dir, "summary.json"), "w"), indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "env"}, indent=1))
PY

if [ "$build_rc" -ne 0 ]; then
  echo "error: the in-place CUDA build failed; see $OUT_DIR/build.log" >&2
  exit 1
fi
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUT_DIR/summary.json"
