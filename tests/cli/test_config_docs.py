"""docs/config.md is generated from the code; `config path` and `config show` tell the truth."""

from __future__ import annotations

import json
from pathlib import Path

from devicebridge.config import reference_markdown
from tests.cli.conftest import Home

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_generated_from_the_code() -> None:
    assert DOCS.read_text("utf-8") == reference_markdown(), (
        "docs/config.md and devicebridge/config.py disagree; regenerate it with: "
        "python -m devicebridge.config > docs/config.md"
    )


def test_config_path_and_show(home: Home) -> None:
    result = home.run("config", "path")
    assert result.code == 0
    assert result.stdout.strip() == str(home.config_file)
    assert "not there" in result.stderr

    home.config_file.parent.mkdir(parents=True)
    home.config_file.write_text(
        'sim_seed = 99\n[mqtt]\nhost = "broker.example"\npassword = "s3cret"\n'
        "[programs]\nmax_validity_days = 10\n"
    )
    result = home.run("--simulate", "config", "show", "--json")
    assert result.code == 0, str(result)
    shown = json.loads(result.stdout)
    assert shown["config_file"] == str(home.config_file)
    rows = {row["key"]: (row["value"], row["source"]) for row in shown["settings"]}
    assert rows["sim_seed"] == (99, "file")
    assert rows["simulate"] == (True, "--simulate")
    assert rows["data_dir"] == (str(home.data_dir), "DEVICEBRIDGE_DATA_DIR")
    assert rows["mqtt.host"] == ("broker.example", "file")
    assert rows["mqtt.port"] == (1883, "default")
    assert rows["mqtt.password"] == ("(set, not shown)", "file")
    assert rows["programs.max_validity_days"] == (10, "file")
    assert "s3cret" not in result.stdout
    table = home.run("config", "show")
    assert table.code == 0
    assert "broker.example" in table.stdout
    assert "s3cret" not in table.stdout


def test_a_typo_in_the_file_names_the_key_and_the_closest(home: Home) -> None:
    home.config_file.parent.mkdir(parents=True)
    home.config_file.write_text("scan_timout_s = 3\n")
    result = home.run("devices")
    assert result.code == 1
    line = result.stderr.strip()
    assert line.startswith(f"error: {home.config_file}: scan_timout_s: unknown setting")
    assert "did you mean 'scan_timeout_s'?" in line
