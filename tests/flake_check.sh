#!/usr/bin/env bash
# The whole suite three times in a row while a bounded background load keeps one core busy:
# a test that passes only on a quiet machine, or only sometimes, fails here.
#   bash tests/flake_check.sh [RUNS]      (default 3; extra pytest args via PYTEST_ARGS)
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# One busy process, for at most 3 hours, killed when this script ends.
timeout 10800 python -c "while True: pass" &
load=$!
trap 'kill $load 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  # shellcheck disable=SC2086
  python -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} > "flake-run-$i.log" 2>&1
  status=$?
  echo "run $i: exit $status in $(( $(date +%s) - start )) s: $(tail -n 1 "flake-run-$i.log")"
  [ "$status" -eq 0 ] || failed=1
done
exit $failed
