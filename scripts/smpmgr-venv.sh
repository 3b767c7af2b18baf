#!/usr/bin/env bash
# Creates .venv-smpmgr: the stock smpmgr CLI in an environment of its own, as a user's
# pipx install would be. smpmgr pins smpclient[all] -> bumble 0.0.228, which clashes
# with the bumble pin of our link-level mode, so it cannot share .venv. The firmware
# tests use it as a referee and `python -m bench firmware` as the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
# Its own environment sees no other's packages: with PYTHONPATH on a checkout (as
# `python -m bench` runs from one), pip checked devicebridge's requirements there too.
unset PYTHONPATH

PYTHON="${PYTHON:-python3}"
SMPMGR_VENV="${SMPMGR_VENV:-.venv-smpmgr}"

if [ ! -x "$SMPMGR_VENV/bin/smpmgr" ]; then
    "$PYTHON" -m venv "$SMPMGR_VENV"
    "$SMPMGR_VENV/bin/python" -m pip install --quiet "smpmgr>=0.19,<1"
fi
