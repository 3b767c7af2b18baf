"""Helper processes of a bridge process (the store writer's, the compactor): how they start.

Each runs ``python -m <module>`` of the very devicebridge this process runs (an editable
checkout, a compiled build, a path a script put first), reads its jobs on its stdin and
answers on its stdout, in a process group of its own: Ctrl-C stops the bridge, which ends
its helpers by closing their stdin. A helper ends when its stdin closes, also when the
bridge is killed. It stays in the bridge's session, so that where the scheduler groups
processes by session (Linux's autogroups), a helper's lower priority is lower than the
bridge's: in a session of its own it got as much of the machine as the whole bridge
(``python -m bench latency``, 100 devices: the runner's p99 2.5-5.5 ms, against 0.7 ms
with no store).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

_LOGGER = logging.getLogger(__name__)


def start_helper(module: str) -> subprocess.Popen[bytes]:
    """``python -m module`` with pipes on its stdin and stdout."""
    import devicebridge

    root = str(Path(devicebridge.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(part for part in (root, env.get("PYTHONPATH", "")) if part)
    return subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        process_group=0,
    )


def lowest_priority() -> None:
    """Run this (helper) process only on a core nothing else wants: SCHED_IDLE on Linux,
    nice 19 elsewhere (or where refused, at the priority given).

    A waking event loop takes the core from such a process at once; at any nice value the
    scheduler first let a helper finish its time slice while a safety stop waited (``python
    -m bench latency``, 100 devices, the store writer's process: the runner's p99 1.3-3.7
    ms at nice +10, 1.7-2.4 ms at nice 19, 1.2 ms at SCHED_IDLE, three runs each).
    """
    try:
        os.nice(19)
        if sys.platform == "linux":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        _LOGGER.debug("%s keeps its priority: %s", sys.argv[0], exc)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used: from /proc (Linux); 0.0
    where there is none, or once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # proc(5): utime and stime are fields 14 and 15, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
