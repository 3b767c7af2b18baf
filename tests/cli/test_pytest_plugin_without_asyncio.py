"""pytest-asyncio is not a runtime dependency: the plugin loads without it.

pytest is run in a subprocess where pytest_asyncio cannot be imported (a package of that
name first on the path raises ImportError) and its plugin is not loaded, as on a bridge's
install that has pytest for other reasons: the sync fixtures work, and an async fixture
fails its test with the command that installs what it needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RUN = """
import sys
import pytest
sys.exit(pytest.main(["-p", "no:asyncio", "-p", "no:cacheprovider", "-q", *sys.argv[1:]]))
"""

TESTS = """
def test_sync_fixture(sim_clock, sim_seed):
    assert sim_clock.now_s() == 0.0


def test_async_fixture(sim_world):
    pass
"""


def test_the_plugin_loads_without_pytest_asyncio(tmp_path: Path) -> None:
    (tmp_path / "test_plugin_use.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    shadow = tmp_path / "shadow" / "pytest_asyncio"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('pytest_asyncio is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path / "test_plugin_use.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert "1 passed, 1 error" in out, out  # the async fixture fails at setup
    assert "needs pytest-asyncio: pip install 'devicebridge[qa]'" in out
