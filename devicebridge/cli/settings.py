"""``devicebridge config path|show``: which configuration file is used, and what is in force.

Every key, its default and meaning: docs/config.md (generated from devicebridge/config.py).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

import click

from devicebridge.cli.base import CliContext, echo_json, pass_cli, reports_errors
from devicebridge.cli.table import Table
from devicebridge.config import (
    CONFIG_ENV,
    DATA_DIR_ENV,
    MqttSettings,
    Settings,
    file_keys,
)

SECRET_KEYS: Final = frozenset({"mqtt.password"})
HIDDEN: Final = "(set, not shown)"


@click.group("config")
def config_group() -> None:
    """The configuration file: where it is and what is in force (docs/config.md)."""


def _file_state(path: Path) -> str:
    return "exists" if path.is_file() else "not there: every setting has its default"


def _origin(cli: CliContext) -> str:
    if cli.config_file is not None:
        return "--config"
    if os.environ.get(CONFIG_ENV):
        return CONFIG_ENV
    return "the default place"


@config_group.command("path")
@pass_cli
@reports_errors
def path_command(cli: CliContext) -> None:
    """Print the configuration file in use (and whether it exists)."""
    click.echo(str(cli.config_path))
    click.echo(f"({_origin(cli)}; {_file_state(cli.config_path)})", err=True)


def _file_document(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}  # load_settings already accepted (or defaulted) it


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    return value


def settings_rows(cli: CliContext) -> list[dict[str, Any]]:
    """Every setting in force: key, value and where it came from."""
    document = _file_document(cli.config_path)
    rows: list[dict[str, Any]] = []

    def add(key: str, value: object, source: str) -> None:
        shown = HIDDEN if key in SECRET_KEYS and value is not None else _plain(value)
        rows.append({"key": key, "value": shown, "source": source})

    settings: Settings = cli.settings
    for f in fields(Settings):
        if f.name in ("mqtt", "programs"):
            continue
        value = getattr(settings, f.name)
        source = "file" if f.name in document else "default"
        if f.name == "simulate" and cli.simulate_option is not None:
            value, source = cli.simulate, "--simulate"
        if f.name == "sim_seed" and cli.sim_seed_option is not None:
            value, source = cli.sim_seed, "--sim-seed"
        if f.name == "data_dir":
            value = cli.data_dir
            if cli.data_dir_override is not None:
                source = "--data-dir"
            elif os.environ.get(DATA_DIR_ENV):
                source = DATA_DIR_ENV
            elif source == "default":
                source = "default (the platform's user data directory)"
        add(f.name, value, source)
    mqtt_table = document.get("mqtt") if isinstance(document.get("mqtt"), dict) else None
    if settings.mqtt is None:
        add("mqtt", None, "default (no broker: serve works locally)")
    else:
        for key in file_keys(MqttSettings):
            source = "file" if mqtt_table and key in mqtt_table else "default"
            add(f"mqtt.{key}", getattr(settings.mqtt, key), source)
    programs_table = document.get("programs")
    in_file = isinstance(programs_table, dict) and "max_validity_days" in programs_table
    add(
        "programs.max_validity_days",
        settings.programs.validity_days,
        "file" if in_file else "default",
    )
    return rows


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def show_command(cli: CliContext, as_json: bool) -> None:
    """Every setting in force, and where its value came from (passwords are not shown)."""
    rows = settings_rows(cli)
    if as_json:
        echo_json({"config_file": str(cli.config_path), "settings": rows})
        return
    click.echo(f"config file: {cli.config_path} ({_file_state(cli.config_path)})")
    table = Table(("key", "value", "from"))
    for row in rows:
        value = row["value"]
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = "-" if value is None else str(value)
        table.add_row(row["key"], text, row["source"])
    table.echo()
