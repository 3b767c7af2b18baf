"""`devicebridge doctor`, and `--json` everywhere: only JSON on stdout."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import SIM, SIM_MASSAGER, Home, run_all


def test_doctor_reports_what_is_missing_and_changes_nothing(home: Home) -> None:
    result = home.run("doctor", "--json")
    report = json.loads(result.stdout)
    checks = {c["area"]: c for c in report["checks"]}
    # The test environment has no D-Bus: Bluetooth fails, with what to use instead.
    assert checks["bluetooth scan"]["status"] == "fail"
    assert "no Bluetooth adapter found" in checks["bluetooth scan"]["detail"]
    assert "--simulate" in checks["bluetooth scan"]["detail"]
    assert report["ok"] is False
    assert result.code == 1
    assert checks["data directory"]["status"] == "ok"
    assert "not created yet" in checks["data directory"]["detail"]
    assert not home.data_dir.exists()  # doctor reads; it creates nothing
    assert checks["devicebridge"]["detail"].startswith("0.1.0 on ")
    assert checks["broker"]["detail"].startswith("none configured")
    assert checks["bridge"]["detail"] == "no bridge has run here"

    simulated = json.loads(home.run("--simulate", "doctor", "--json").stdout)
    assert simulated["ok"] is True
    table = home.run("--simulate", "doctor")
    assert table.code == 0
    assert "bluetooth scan" in table.stdout


def test_doctor_finds_an_unreachable_broker(home: Home) -> None:
    home.config_file.parent.mkdir(parents=True)
    home.config_file.write_text('[mqtt]\nhost = "127.0.0.1"\nport = 1\n')
    report = json.loads(home.run("--simulate", "doctor", "--json", "--no-bluetooth").stdout)
    broker = next(c for c in report["checks"] if c["area"] == "broker")
    assert broker["status"] == "fail"
    assert "127.0.0.1:1 unreachable" in broker["detail"]
    config = next(c for c in report["checks"] if c["area"] == "config file")
    assert "sets: mqtt.host, mqtt.port" in config["detail"]


JSON_COMMANDS = [
    (*SIM, "scan", "--json", "--timeout-s", "1"),
    ("devices", "--json"),
    ("history", "--json"),
    ("routine", "list", "--json"),
    ("treatment", "list", "--json"),
    ("programs", "--json"),
    ("trust", "list", "--json"),
    ("config", "show", "--json"),
    (*SIM, "firmware", "info", "face", "--json"),
    ("--simulate", "doctor", "--json", "--no-bluetooth"),
]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=[" ".join(a[-3:]) for a in JSON_COMMANDS])
def test_json_commands_write_only_json(home: Home, args: tuple[str, ...]) -> None:
    run_all(home, [(*SIM, "pair", SIM_MASSAGER, "--name", "face")])
    result = home.run("-v", *args)  # -v: info logs, which must go to stderr
    assert result.code == 0, str(result)
    json.loads(result.stdout)


def test_shell_completion_completes_commands_without_loading_them(home: Home) -> None:
    result = home.run(
        env={
            "_DEVICEBRIDGE_COMPLETE": "bash_complete",
            "COMP_WORDS": "devicebridge rou",
            "COMP_CWORD": "1",
        },
    )
    assert result.code == 0
    assert result.stdout.split() == ["plain,routine"]
    result = home.run(
        env={
            "_DEVICEBRIDGE_COMPLETE": "bash_complete",
            "COMP_WORDS": "devicebridge routine va",
            "COMP_CWORD": "2",
        },
    )
    assert result.stdout.split() == ["plain,validate"]
