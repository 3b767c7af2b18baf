"""The README's first two commands, on a fresh clone in new virtual environments.

The clone is of the committed tree (what a new user gets). The first command runs as
written (a venv, ``pip install -e .``, ``devicebridge demo``); the second is run with
``--co -q`` (it passes its arguments to pytest): it sets up the test environment and runs
every check but the test suite itself, which would otherwise run this test again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_docs_commands import ROOT

SETUP_TIMEOUT_S = 1500


def readme_first_commands() -> list[str]:
    text = (ROOT / "README.md").read_text("utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_starts_with_the_demo_and_the_checks() -> None:
    demo, checks = readme_first_commands()
    assert demo == (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/devicebridge demo"
    )
    assert checks == "bash scripts/check.sh"


@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT_S)
def test_a_fresh_clone_runs_the_readmes_first_two_commands(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith(("DEVICEBRIDGE_", "XDG_"))
    }
    env["HOME"] = str(tmp_path / "home")
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    demo, checks = readme_first_commands()

    result = subprocess.run(
        ["bash", "-c", demo],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S / 2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Summary" in result.stdout
    assert "Traceback" not in result.stderr

    result = subprocess.run(
        ["bash", "-c", f"{checks} --co -q"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S / 2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in ("== ruff", "== mypy", "== import-linter", "== pytest"):
        assert step in result.stdout
    assert " tests collected" in result.stdout
