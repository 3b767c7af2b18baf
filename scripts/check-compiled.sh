#!/usr/bin/env bash
# The compiled build's pass: the pure cores compiled with mypyc (setup.py compiles the
# modules listed under [tool.devicebridge.compile] in pyproject.toml) in a copy of the tree
# with a venv of its own, then the whole test suite against that build. The tree and .venv
# of the pure build are left as they are. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

PYTHON="${PYTHON:-python3}"
VENV="${COMPILED_VENV:-$ROOT/.venv-compiled}"
TREE="${COMPILED_TREE:-$ROOT/build/compiled-tree}"
SMPMGR_VENV="${SMPMGR_VENV:-.venv-smpmgr}"

# The files the pure pass sees: tracked ones and new ones not ignored.
rm -rf "$TREE"
mkdir -p "$TREE"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
    | tar -xf - -C "$TREE"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install --quiet "setuptools>=77" wheel mypy
(cd "$TREE" && env -u DEVICEBRIDGE_COMPILE "$VENV/bin/python" -m pip install --quiet -e ".[test]")
echo "== mypyc: compiling the pure cores"
(cd "$TREE" && DEVICEBRIDGE_COMPILE=1 "$VENV/bin/python" setup.py --quiet build_ext --inplace \
    >"$TREE/build-compiled.log" 2>&1) || { tail -40 "$TREE/build-compiled.log"; exit 1; }
# mypyc puts the runtime its modules share at the top of the tree: the whole tree goes on
# the venv's path, so that commands started anywhere (console scripts, subprocesses) find it.
"$VENV/bin/python" -c 'import sys, sysconfig; from pathlib import Path
Path(sysconfig.get_paths()["purelib"], "devicebridge-compiled-tree.pth").write_text(sys.argv[1] + "\n")' "$TREE"

PYTHON="$PYTHON" SMPMGR_VENV="$SMPMGR_VENV" bash scripts/smpmgr-venv.sh
export PATH="$ROOT/$SMPMGR_VENV/bin:$PATH"

echo "== pytest (compiled build)"
cd "$TREE"
DEVICEBRIDGE_EXPECT_COMPILED=1 "$VENV/bin/python" -m pytest "$@"
