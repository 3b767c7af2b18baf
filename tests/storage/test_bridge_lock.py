"""One bridge per data directory: the lock's API (the `serve` side is in tests/service)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devicebridge.errors import BridgeRunningError
from devicebridge.storage.lock import acquire, holder, lock_path, try_acquire

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from devicebridge.storage.lock import try_acquire
    lock = try_acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_the_lock_names_its_holder_and_refuses_a_second_one(tmp_path: Path) -> None:
    assert holder(tmp_path / "never-used") is None
    with acquire(tmp_path) as lock:
        assert lock.pid == os.getpid()
        assert holder(tmp_path) == os.getpid()
        with pytest.raises(BridgeRunningError) as refused:
            try_acquire(tmp_path)
        assert refused.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(refused.value)
        assert "\n" not in str(refused.value)
    assert holder(tmp_path) is None
    assert lock_path(tmp_path).read_text() == ""  # no pid left behind to trust
    with acquire(tmp_path):  # free again
        assert holder(tmp_path) == os.getpid()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "locked"
        assert holder(tmp_path) == process.pid
        with pytest.raises(BridgeRunningError) as refused:
            try_acquire(tmp_path)
        assert refused.value.pid == process.pid
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    # The kernel let go with the process; its pid is still in the file, and not trusted.
    assert lock_path(tmp_path).read_text().strip() == str(process.pid)
    assert holder(tmp_path) is None
    with acquire(tmp_path) as lock:
        assert lock.held
