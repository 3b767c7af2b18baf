"""A private Mosquitto broker on a free port, for tests that talk MQTT over real TCP.

The machines this project is tested on have the ``mosquitto`` binary; where it is
missing, tests that need a broker are skipped with the command that installs it
(``.ci/run`` installs it, so CI never skips them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

INSTALL_HINT = (
    "MQTT tests need the mosquitto broker: apt-get install mosquitto (or brew install mosquitto)"
)
READY_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str:
    for candidate in ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        found = shutil.which(candidate)
        if found:
            return found
    pytest.skip(INSTALL_HINT)


def _passwd_binary(mosquitto: str) -> str:
    beside = Path(mosquitto).parent.parent / "bin" / "mosquitto_passwd"
    found = shutil.which("mosquitto_passwd") or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.skip(INSTALL_HINT + " (with mosquitto_passwd)")
    return found


class Mosquitto:
    """One broker process; ``stop()`` and ``start()`` simulate an outage on the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        acl: str | None = None,
        passwords: Mapping[str, str] | None = None,
        settings: str = "",
    ) -> None:
        """``acl``: the text of a Mosquitto ACL file to enforce (without ``passwords``,
        clients name themselves with a user name and no password); ``passwords``: user
        name -> password, hashed into a password file with ``mosquitto_passwd``;
        ``settings``: more lines of mosquitto.conf (e.g. ``allow_anonymous false``)."""
        self.binary = mosquitto_binary()
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        config = f"listener {self.port} 127.0.0.1\npersistence false\nlog_dest file {self.log}\n"
        if "allow_anonymous" not in settings:
            config += "allow_anonymous true\n"
        config += settings.rstrip("\n") + "\n" if settings else ""
        if os.geteuid() == 0:
            # Run as root, Mosquitto drops to its own user after reading this file and then
            # cannot open the log or the ACL file in a private temporary folder.
            config += "user root\n"
        if acl is not None:
            acl_file = workdir / "mosquitto.acl"
            acl_file.write_text(acl)
            config += f"acl_file {acl_file}\n"
        if passwords:
            password_file = workdir / "mosquitto.passwd"
            password_file.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
            password_file.chmod(0o600)
            subprocess.run(  # hashes the plain-text file in place
                [_passwd_binary(self.binary), "-U", str(password_file)],
                check=True,
                capture_output=True,
            )
            config += f"password_file {password_file}\n"
        self.config.write_text(config)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}; see {self.log}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)  # readiness polling, not timing a result
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None
