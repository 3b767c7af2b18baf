"""The optional compiled build of the pure cores and the telemetry path's edges.

``pip install -e .`` (the README's install) is pure Python and needs no compiler. With
``DEVICEBRIDGE_COMPILE=1`` the modules listed under ``[tool.devicebridge.compile]`` in
pyproject.toml are compiled with mypyc (the way habluetooth compiles its annotated
Python): the same source, type-checked and turned into C extension modules. That needs
mypy and a C compiler in the build environment, so build without isolation::

    pip install "setuptools>=77" wheel mypy
    DEVICEBRIDGE_COMPILE=1 python setup.py build_ext --inplace

``scripts/check-compiled.sh`` does this in a copy of the tree with a venv of its own and
runs the whole suite against it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """The source files to compile, from pyproject.toml."""
    config = tomllib.loads((HERE / "pyproject.toml").read_text("utf-8"))
    modules: list[str] = config["tool"]["devicebridge"]["compile"]["modules"]
    return modules


def ext_modules() -> list[Any]:
    if os.environ.get("DEVICEBRIDGE_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(compiled_modules(), opt_level="3", debug_level="0"))


setup(ext_modules=ext_modules())
