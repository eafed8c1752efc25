#!/usr/bin/env bash
# Runs the test suite in ./.venv (set up by scripts/bootstrap.sh). The Triton
# tests run in their own process with TRITON_INTERPRET=1 set before import, so
# the Triton kernels execute on CPU tensors through the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

run() {
  "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests for: $*" >&2
    return 1
  fi
  return "$rc"
}

status=0
run "$PY" -m pytest -q -p no:cacheprovider --ignore=tests/test_triton.py tests "$@" || status=1
if [ -f tests/test_triton.py ]; then
  TRITON_INTERPRET=1 run "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py "$@" || status=1
fi
exit "$status"
