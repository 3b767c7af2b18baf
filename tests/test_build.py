"""Which build of the pure cores is loaded: compiled with mypyc, or pure Python.

``scripts/check-compiled.sh`` runs the whole suite against the compiled build with
``DEVICEBRIDGE_EXPECT_COMPILED=1``; every other run is the pure-Python install, which
must not pick up a compiled module left in the tree.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_modules() -> list[str]:
    """The modules the compiled build compiles (pyproject.toml), as import names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    paths: list[str] = config["tool"]["devicebridge"]["compile"]["modules"]
    return [path.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for path in paths]


def test_the_build_asked_for_is_the_one_loaded() -> None:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    names = listed_modules()
    assert names
    compiled = [
        name for name in names if (importlib.import_module(name).__file__ or "").endswith(suffixes)
    ]
    if os.environ.get("DEVICEBRIDGE_EXPECT_COMPILED") == "1":
        assert compiled == names
    else:
        assert compiled == []
