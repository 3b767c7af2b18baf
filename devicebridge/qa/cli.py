"""``devicebridge-sim scenario``: run scenarios against the bridge, record sessions as scenarios.

devicebridge registers this group with ``devicebridge-sim`` through the entry-point group
``devicebridge_sim.commands``, so the simulators never import the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from devicebridge.errors import DeviceBridgeError
from devicebridge.qa.record import record_scenario
from devicebridge.qa.scenario import ScenarioResult, run_scenario
from devicebridge.storage.sessions import SessionStore
from simulators.errors import ScenarioError
from simulators.scenario.spec import load_scenario


@click.group("scenario")
def scenario_group() -> None:
    """Scenarios: devices, hand, faults and what the bridge must do, in one TOML file."""


@scenario_group.command("run")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Override the file's seed.")
@click.option(
    "--artifacts",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sim-artifacts"),
    show_default=True,
    help="Where a failing scenario leaves its seed, timeline and telemetry.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the outcomes as one JSON list on stdout (verdicts and logs go to stderr).",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Hide the warnings the bridge logs for injected faults (errors still show).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Share the devices out over this many processes (a fleet on several cores). "
    "A run replays exactly with the same seed and the same number of workers.",
)
def run_command(
    files: tuple[Path, ...],
    seed: int | None,
    artifacts: Path,
    as_json: bool,
    quiet: bool,
    workers: int,
) -> None:
    """Run scenario FILES against the bridge and print a verdict for each (exit 1 on a failure)."""
    if quiet:
        # The faults a scenario injects make the bridge warn, as it should; the verdict
        # says whether it coped.
        logging.disable(logging.WARNING)
    failed = 0
    outcomes: list[dict[str, Any]] = []
    for path in files:
        try:
            scenario = load_scenario(path)
        except ScenarioError as exc:
            click.echo(f"ERROR {path}\n{exc}", err=True)
            outcomes.append({"file": str(path), "passed": False, "error": str(exc)})
            failed += 1
            continue
        with tempfile.TemporaryDirectory(prefix="devicebridge-qa-") as tmp:
            try:
                result = asyncio.run(
                    run_scenario(scenario, seed=seed, workdir=Path(tmp), workers=workers)
                )
            except DeviceBridgeError as exc:
                click.echo(f"ERROR {path}: {exc}", err=True)
                outcomes.append({"file": str(path), "passed": False, "error": str(exc)})
                failed += 1
                continue
            # With --json, stdout carries the JSON only: the verdict goes to stderr.
            click.echo(result.verdict(), err=as_json)
            if not result.passed:
                failed += 1
                folder = result.write_artifacts(artifacts / scenario.name.replace(" ", "_"))
                click.echo(f"  artifacts: {folder}", err=as_json)
        outcomes.append({"file": str(path), **_json(result)})
    if as_json:
        click.echo(json.dumps(outcomes, indent=2))
    sys.exit(1 if failed else 0)


def _json(result: ScenarioResult) -> dict[str, object]:
    return {
        "scenario": result.scenario.name,
        "seed": result.seed,
        "workers": result.workers,
        "passed": result.passed,
        "failures": result.failures,
        "devices": {label: o.to_json() for label, o in result.devices.items()},
    }


@scenario_group.command("record")
@click.option(
    "--store",
    "store_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A session store (sessions.sqlite3).",
)
@click.option("--session", "session_id", type=int, required=True, help="The session to record.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def record_command(store_path: Path, session_id: int, output: Path, seed: int) -> None:
    """Write a scenario that replays stored session SESSION: its hand, routine and decisions."""
    try:
        with SessionStore(store_path) as store:
            text = record_scenario(store, session_id, seed=seed)
    except DeviceBridgeError as exc:
        raise click.ClickException(str(exc)) from exc
    output.write_text(text, "utf-8")
    click.echo(f"{output}: scenario replaying session {session_id} of {store_path}")
