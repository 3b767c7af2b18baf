#!/usr/bin/env bash
# The one task script: sets up .venv (if needed) and runs every check CI runs:
# ruff, mypy --strict, import-linter contracts, then the whole test suite.
# CI (.ci/run) and the README's test command both call exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install --quiet -e ".[test]"

# The stock smpmgr CLI referees the firmware tests (and is bench firmware's baseline). It
# lives in a venv of its own: see scripts/smpmgr-venv.sh.
SMPMGR_VENV="${SMPMGR_VENV:-.venv-smpmgr}"
PYTHON="$PYTHON" SMPMGR_VENV="$SMPMGR_VENV" bash scripts/smpmgr-venv.sh
export PATH="$PWD/$SMPMGR_VENV/bin:$PATH"

echo "== ruff"
"$VENV/bin/ruff" check protocols simulators devicebridge tests bench
echo "== mypy --strict (protocols, devicebridge, simulators)"
"$VENV/bin/mypy"
echo "== import-linter"
"$VENV/bin/lint-imports"
echo "== pytest"
"$VENV/bin/python" -m pytest "$@"
