#!/usr/bin/env bash
# Runs the test suite in ./.venv (set up by scripts/bootstrap.sh). The Triton
# tests (tests/test_triton.py, and the optimizer table on backend="triton",
# tests/test_triton_table.py) run in their own process with TRITON_INTERPRET=1
# set before import, so the Triton kernels execute on CPU tensors through the
# interpreter.
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

TRITON_TESTS=()
for f in tests/test_triton.py tests/test_triton_table.py; do
  [ -f "$f" ] && TRITON_TESTS+=("$f")
done

status=0
run "$PY" -m pytest -q -p no:cacheprovider "${TRITON_TESTS[@]/#/--ignore=}" tests "$@" || status=1
if [ "${#TRITON_TESTS[@]}" -gt 0 ]; then
  TRITON_INTERPRET=1 run "$PY" -m pytest -q -p no:cacheprovider "${TRITON_TESTS[@]}" "$@" || status=1
fi
exit "$status"
