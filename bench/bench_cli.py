"""Start-up time of the light commands against ``python -c pass`` and ``python -c "import
click"``, measured in the same run, interleaved.

Each command runs as a user runs it: the installed ``devicebridge`` script, a new process
each time, against a data directory holding one paired device, one session and one trusted
key (so the stores open and the tables print), stdout a pipe. Target (issue 13): every
light command within 2x of ``import click`` (median of the runs).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench.report import describe_machine, print_table

RUNS: Final = 21
TARGET_RATIO: Final = 2.0
LIGHT_COMMANDS: Final[tuple[tuple[str, ...], ...]] = (
    ("--help",),
    ("devices",),
    ("history",),
    ("routine", "list"),
    ("status",),
    ("trust", "list"),
)


def _script() -> list[str]:
    installed = Path(sys.executable).with_name("devicebridge")
    if installed.is_file():
        return [str(installed)]
    found = shutil.which("devicebridge")
    return [found] if found else [sys.executable, "-m", "devicebridge"]


def prepare_data_dir(data_dir: Path) -> None:
    """One paired device, one finished session, one trusted key and a status file."""
    import base64
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from devicebridge.core.signed_program import key_id, public_key_bytes
    from devicebridge.service.status import write_status_file
    from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
    from devicebridge.storage.registry import DeviceRegistry, PairedDevice
    from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
    from protocols import SampleFormat

    with DeviceRegistry.in_data_dir(data_dir) as registry:
        registry.add(
            PairedDevice("face", "FM012D2AC1", "massager", "OFC-FM1", "ble", "AA:BB:CC:DD:EE:01")
        )
        registry.record_firmware("FM012D2AC1", "1.0.0")
    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        session_id = store.start_session(
            routine_name="Firming",
            category="firming",
            device_serial="FM012D2AC1",
            device_kind="massager",
            sample_format=SampleFormat.MASSAGER_V1,
            sample_rate_hz=100.0,
            routine_text="",
        )
        store.finish_session(
            session_id, status="completed", end_reason=None, summary={"completion": 1.0}
        )
    public = Ed25519PrivateKey.generate().public_key()
    programs = ProgramStore(data_dir / PROGRAMS_FILENAME)
    try:
        encoded = base64.b64encode(public_key_bytes(public)).decode()
        programs.trust(key_id(public), "dr-lee", encoded)
    finally:
        programs.close()
    now = datetime.now(UTC).isoformat()
    write_status_file(
        data_dir,
        {
            "bridge_id": "bench",
            "state": "stopped",
            "pid": 1,
            "started_at": now,
            "updated_at": now,
            "mqtt": {"configured": False, "host": None, "port": None, "connected": False},
            "outbox_depth": 0,
            "devices": [],
        },
    )


def _time(argv: Sequence[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode()}")
    return elapsed


def run() -> bool:
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        # As a user runs it: no DEVICEBRIDGE_* variables, the platform's folders (XDG here)
        # with a configuration file and a data directory.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEBRIDGE_")}
        # Bytecode caches as on a user's machine (the warm-up run writes them), also where
        # the environment turns them off.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["XDG_CONFIG_HOME"] = str(Path(tmp) / "config")
        env["XDG_DATA_HOME"] = str(Path(tmp) / "share")
        data_dir = Path(tmp) / "share" / "devicebridge"
        prepare_data_dir(data_dir)
        config = Path(tmp) / "config" / "devicebridge" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text("scan_timeout_s = 5.0\n", encoding="utf-8")
        script = _script()
        subjects: dict[str, list[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import click"': [sys.executable, "-c", "import click"],
        }
        for command in LIGHT_COMMANDS:
            subjects["devicebridge " + " ".join(command)] = [*script, *command]
        times: dict[str, list[float]] = {name: [] for name in subjects}
        for argv in subjects.values():  # warm the caches (bytecode, page cache)
            _time(argv, env)
        for _ in range(RUNS):
            for name, argv in subjects.items():  # interleaved: load drifts hit all alike
                times[name].append(_time(argv, env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians['python -c "import click"']
    rows = []
    met = True
    for name, median in medians.items():
        ratio = median / baseline
        light = name.startswith("devicebridge")
        ok = ratio <= TARGET_RATIO
        met = met and (ok or not light)
        rows.append(
            (
                name,
                median * 1000,
                min(times[name]) * 1000,
                median / medians["python -c pass"],
                ratio,
                ("met" if ok else "MISSED") if light else "baseline",
            )
        )
    print_table(
        f"Start-up of the light commands (median of {RUNS} interleaved runs, stdout a pipe; "
        f"target: within {TARGET_RATIO:g}x of import click)",
        ("command", "median ms", "min ms", "x python", "x import click", "target"),
        rows,
    )
    print(describe_machine())
    return met
