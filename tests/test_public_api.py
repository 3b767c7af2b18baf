"""The public surface of the packages: every exported name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import devicebridge
import protocols
import simulators


@pytest.mark.parametrize("package", [devicebridge, protocols, simulators])
def test_every_exported_name_resolves(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    for name in names:
        assert getattr(package, name) is not None, name


def test_lazy_exports_match_all() -> None:
    assert sorted(devicebridge._EXPORTS) == sorted(devicebridge.__all__)


def test_unknown_names_fail_clearly() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        devicebridge.nope  # noqa: B018


def test_pure_cores_import_without_the_edges() -> None:
    code = (
        "import sys, devicebridge.core.engine, devicebridge.core.policy;"
        "edges = ('bleak', 'serial', 'sqlite3', 'aiomqtt');"
        "print(sorted(m for m in edges if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_protocols_lazy_exports_match_all() -> None:
    assert sorted(protocols._EXPORTS) == sorted(protocols.__all__)
