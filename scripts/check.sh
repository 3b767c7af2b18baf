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

# The stock smpmgr CLI referees the firmware tests. It lives in a venv of its own, as a
# user's pipx install would: it pins smpclient[all] -> bumble 0.0.228, which would clash
# with the bumble pin of our link-level mode if both shared one environment.
SMPMGR_VENV="${SMPMGR_VENV:-.venv-smpmgr}"
if [ ! -x "$SMPMGR_VENV/bin/smpmgr" ]; then
    "$PYTHON" -m venv "$SMPMGR_VENV"
    "$SMPMGR_VENV/bin/python" -m pip install --quiet "smpmgr>=0.19,<1"
fi
export PATH="$PWD/$SMPMGR_VENV/bin:$PATH"

echo "== ruff"
"$VENV/bin/ruff" check protocols simulators devicebridge tests bench
echo "== mypy --strict (protocols, devicebridge, simulators)"
"$VENV/bin/mypy"
echo "== import-linter"
"$VENV/bin/lint-imports"
echo "== pytest"
"$VENV/bin/python" -m pytest "$@"
