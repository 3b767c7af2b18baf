"""Start-up: ``--help`` and the light commands import only what they use.

Speed itself is measured by ``python -m bench cli``; these tests check the cause (which
modules a command loads), which does not depend on the machine's load.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from devicebridge import __version__
from devicebridge.cli import main
from devicebridge.cli.base import COMMANDS, LazyGroup
from tests.cli.conftest import Home

HEAVY = ("numpy", "bleak", "aiomqtt", "cryptography", "rich", "matplotlib", "smpclient", "asyncio")


def loaded_after(home: Home, *args: str) -> set[str]:
    """Top-level packages a command imported (run in a fresh interpreter)."""
    code = (
        "import sys, json\n"
        "from devicebridge.cli import main\n"
        f"sys.argv = ['devicebridge', *{list(args)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=home.env,
        cwd=home.root,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(result.stderr.strip().splitlines()[-1]))


def test_help_lists_every_command_without_importing_them(home: Home) -> None:
    loaded = loaded_after(home, "--help")
    assert not loaded & set(HEAVY)
    code = (
        "import sys\nfrom devicebridge.cli import main\nsys.argv=['devicebridge','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('devicebridge.cli.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=home.env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "['devicebridge.cli.base']"
    help_text = home.run("--help").stdout
    for name in COMMANDS:
        assert f"  {name} " in help_text, name


@pytest.mark.parametrize(
    "args",
    [("devices",), ("history",), ("routine", "list"), ("status",), ("trust", "list")],
)
def test_light_commands_load_no_heavy_package(home: Home, args: tuple[str, ...]) -> None:
    loaded = loaded_after(home, *args)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_routine_list_does_not_read_the_configuration(home: Home) -> None:
    # A command that needs no setting does not fail on a broken file it does not need...
    home.config_file.parent.mkdir(parents=True)
    home.config_file.write_text("sim_seed = 'x'\n")
    assert home.run("routine", "list").code == 0
    # ...and one that needs a setting names the file and the key.
    result = home.run("devices")
    assert result.code == 1
    assert "config.toml: sim_seed: must be an integer" in result.stderr


def test_every_command_in_the_table_loads_with_its_short_help() -> None:
    """--help shows the table's short help without importing; loaded, it is the same."""
    ctx = click.Context(main)

    def check(group: LazyGroup, path: str) -> None:
        for name, entry in group.lazy_commands.items():
            command = group.get_command(ctx, name)
            assert command is not None, f"{path} {name}"
            assert command.name == name
            assert command.help, f"{path} {name} has no help"
            assert command.get_short_help_str(limit=200) == entry.short_help
            if isinstance(command, LazyGroup):
                check(command, f"{path} {name}")

    assert isinstance(main, LazyGroup)
    check(main, "devicebridge")


def test_version(home: Home) -> None:
    result = home.run("--version")
    assert result.code == 0
    assert result.stdout.startswith(f"devicebridge {__version__} (Python ")


def test_a_mistyped_command_is_one_line_with_the_closest(home: Home) -> None:
    result = home.run("devics")
    assert result.code == 2
    assert result.stderr.strip() == (
        "error: no such command 'devics'; did you mean 'devices'? (see 'devicebridge --help')"
    )


def test_importing_devicebridge_needs_no_pytest(home: Home) -> None:
    """pytest is a test dependency: the package and its CLI import without it."""
    code = (
        "import sys, importlib.abc\n"
        "class NoPytest(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'pytest_asyncio'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoPytest())\n"
        "import devicebridge, devicebridge.cli, devicebridge.qa, devicebridge.app\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=home.env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok", out.stderr
