"""What long-running commands show while they work: live tables, guidance panels, spinners,
and the full-screen view of ``serve``.

On a terminal these are rich live displays; elsewhere (a pipe, a log file, a test) plain
lines at a steady pace. Only commands that run something import this module (rich costs
start-up time). Every piece of text that comes from a user or a device (names, routine
names, guidance, messages) goes into rich as ``Text`` or with ``markup=False``, so square
brackets in a name print as they are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devicebridge.cli.base import fmt
from devicebridge.cli.words import channel_words, duration_words, kind_words, zone_words
from devicebridge.core.engine import Decision, DecisionKind, PressureState
from devicebridge.core.policy import LED_CHANNELS
from devicebridge.device.monitor import DeviceSnapshot
from devicebridge.run.view import RunnerState

PLAIN_PRINT_INTERVAL_S: Final = 1.0
PLAIN_STATE_INTERVAL_S: Final = 1.0
LIVE_REFRESH_PER_S: Final = 8
GAUGE_WIDTH: Final = 40
SPINNER_REFRESH_S: Final = 0.1  # display refresh only (wall clock); never a deadline
SERVE_REFRESH_S: Final = 0.5
SERVE_LOG_LINES: Final = 8
SERVE_LINE_EVERY_S: Final = 30.0  # piped: a status line at least this often


# --------------------------------------------------------------------------- telemetry


def _led(snapshot: DeviceSnapshot) -> str:
    if snapshot.red_mw_cm2 is None:
        return "-"
    return (
        f"{snapshot.red_mw_cm2:.1f}/{fmt(snapshot.near_infrared_mw_cm2, '.1f')}"
        f"/{fmt(snapshot.blue_mw_cm2, '.1f')}"
    )


def live_table(snapshots: Sequence[DeviceSnapshot], title: str) -> Table:
    table = Table(title=Text(title))
    for column in ("device", "state", "kPa", "contact", "zone", "batt.", "skin °C", "LED R/NIR/B"):
        table.add_column(column)
    table.add_column("samples (gaps)", justify="right")
    for s in snapshots:
        gaps = f"{s.gaps}, {s.lost_samples} lost" if s.lost_samples else str(s.gaps)
        table.add_row(
            Text(s.name),
            s.state,
            fmt(s.pressure_kpa, ".2f"),
            fmt(s.contact),
            zone_words(s.zone) if s.zone else "-",
            "-" if s.battery_percent is None else f"{s.battery_percent}%",
            fmt(s.skin_temperature_c, ".1f"),
            _led(s),
            f"{s.samples} ({gaps})",
        )
    return table


def plain_line(s: DeviceSnapshot) -> str:
    parts = [
        f"{s.name}: state={s.state}",
        f"samples={s.samples}",
        f"gaps={s.gaps}",
        f"battery={fmt(s.battery_percent)}%",
        f"skin={fmt(s.skin_temperature_c, '.1f')}C",
    ]
    if s.pressure_kpa is not None:
        parts += [
            f"pressure={s.pressure_kpa:.2f}kPa",
            f"contact={fmt(s.contact)}",
            f"zone={s.zone}",
        ]
    if s.red_mw_cm2 is not None:
        parts.append(f"led={_led(s)}mW/cm2")
    return " ".join(parts)


class LiveView:
    """A rich Live table on a terminal; a plain line per device per second elsewhere."""

    def __init__(self, console: Console, title: str, now_s: Callable[[], float]) -> None:
        self.console = console
        self.title = title
        self._now_s = now_s
        self._live: Live | None = None
        self._last_plain_s: float | None = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(live_table([], self.title), console=self.console)
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(
        self, snapshots: Sequence[DeviceSnapshot], extra: Sequence[RenderableType] = ()
    ) -> None:
        if self._live is not None:
            table = live_table(snapshots, self.title)
            self._live.update(Group(table, *extra) if extra else table)
            return
        now_s = self._now_s()
        if self._last_plain_s is None or now_s - self._last_plain_s >= PLAIN_PRINT_INTERVAL_S:
            self._last_plain_s = now_s
            for snapshot in snapshots:
                self.console.print(
                    f"[t={now_s:7.2f}s] {plain_line(snapshot)}", highlight=False, markup=False
                )


def snapshot_rows(snapshots: Sequence[DeviceSnapshot]) -> list[tuple[str, ...]]:
    """The end-of-watch summary, one row per device (for :class:`cli.table.Table`)."""
    return [
        (
            s.name,
            kind_words(s.kind),
            str(s.samples),
            str(s.gaps),
            str(s.lost_samples),
            str(s.backfilled_samples),
            str(s.reconnects),
            str(s.malformed),
            fmt(s.mean_pressure_kpa, ".2f"),
            fmt(s.max_skin_temperature_c, ".1f"),
        )
        for s in snapshots
    ]


SNAPSHOT_COLUMNS: Final = (
    "device",
    "kind",
    "samples",
    "gaps",
    "lost",
    "backfilled",
    "reconnects",
    "malformed",
    "mean kPa",
    "max skin °C",
)


# --------------------------------------------------------------------------- guidance

STATE_LABELS: Final = {
    PressureState.NO_CONTACT: ("no contact", "dim"),
    PressureState.TOO_LOW: ("TOO LOW", "yellow"),
    PressureState.IN_BAND: ("in band", "green"),
    PressureState.TOO_HIGH: ("TOO HIGH", "yellow"),
    PressureState.ABOVE_CAP: ("ABOVE CAP", "bold red"),
}


def pressure_gauge(state: RunnerState, width: int = GAUGE_WIDTH) -> Text:
    """``[....====|....!]``: the target band as ``=``, the pressure as ``|``, the cap ``!``."""
    if state.band_kpa is None:
        return Text("")
    low, high = state.band_kpa
    cap = state.cap_kpa or high
    scale_kpa = max(cap * 1.25, (state.pressure_kpa or 0.0) * 1.05, high * 1.25)
    cells = ["."] * width
    for i in range(width):
        value = (i + 0.5) / width * scale_kpa
        if low <= value <= high:
            cells[i] = "="
    cap_cell = min(width - 1, int(cap / scale_kpa * width))
    cells[cap_cell] = "!"
    if state.pressure_kpa is not None and state.contact:
        cells[min(width - 1, int(state.pressure_kpa / scale_kpa * width))] = "|"
    label, style = STATE_LABELS[state.pressure_state or PressureState.NO_CONTACT]
    text = Text("[" + "".join(cells) + "] ")
    pressure = "-" if state.pressure_kpa is None else f"{state.pressure_kpa:5.1f} kPa"
    text.append(f"{pressure} {label}", style=style)
    text.append(f"  (target {low:g}-{high:g}, cap {cap:g})", style="dim")
    return text


def state_panel(state: RunnerState) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("step", Text(f"{state.step}/{state.steps_total}  zone: {zone_words(state.zone)}"))
    grid.add_row("do", Text(state.guidance))
    grid.add_row(
        "time left",
        Text(
            f"step {duration_words(state.step_remaining_s)}, "
            f"session {duration_words(state.session_remaining_s)}"
            + ("  PAUSED" if state.paused else "")
        ),
    )
    if state.band_kpa is not None:
        grid.add_row("pressure", pressure_gauge(state))
    if state.not_measured:
        what = ", ".join(m.replace("_", " ") for m in state.not_measured)
        grid.add_row(
            "checks",
            Text(
                f"{what}: not measured by this device"
                + (" (guided by time)" if state.by_time else ""),
                style="dim",
            ),
        )
    if state.dose_j_cm2 is not None:
        levels = state.irradiance_mw_cm2 or {}
        allowed = state.dose_allowed_j_cm2 or {}
        parts = [
            f"{channel_words(ch)}: {levels.get(ch, 0.0):.1f} mW/cm², "
            f"{state.dose_j_cm2[ch]:.2f}/{allowed.get(ch, 0.0):.1f} J/cm²"
            for ch in LED_CHANNELS
            if allowed.get(ch, 0.0) > 0 and (levels.get(ch, 0.0) > 0 or state.dose_j_cm2[ch] > 0)
        ]
        grid.add_row("light", Text("; ".join(parts) or "off"))
    if state.skin_temperature_c is not None:
        grid.add_row("skin", f"{state.skin_temperature_c:.1f} °C")
    grid.add_row("warning", Text(state.last_warning or "-", style="yellow"))
    title = Text(
        f"{state.routine} on {state.device} ({state.mode} mode, t={state.elapsed_s:.1f} s)"
    )
    return Panel(grid, title=title)


def plain_state(state: RunnerState) -> str:
    parts = [
        f"step {state.step}/{state.steps_total}",
        f"zone={state.zone}",
        f"step_left={state.step_remaining_s:.1f}s",
        f"session_left={state.session_remaining_s:.1f}s",
    ]
    if state.band_kpa is not None:
        label = STATE_LABELS[state.pressure_state or PressureState.NO_CONTACT][0]
        pressure = fmt(state.pressure_kpa, ".1f")
        parts.append(
            f"pressure={pressure}kPa [{state.band_kpa[0]:g}-{state.band_kpa[1]:g}] {label}"
        )
    if state.dose_j_cm2 is not None:
        parts.append(
            "dose=" + "/".join(f"{state.dose_j_cm2[ch]:.2f}" for ch in LED_CHANNELS) + "J/cm2"
        )
    if state.by_time:
        parts.append("by_time")
    if state.paused:
        parts.append("PAUSED")
    return " ".join(parts)


def decision_line(device: str, decision: Decision) -> str:
    rule = f" (policy: {decision.rule})" if decision.rule else ""
    kind = decision.kind.value.upper()
    return f"[{device} t={decision.at_s:7.2f}s] {kind}: {decision.message}{rule}"


class GuidanceView:
    """Rich Live panels on a terminal; a line per decision and per second elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.states: dict[str, RunnerState] = {}
        self._live: Live | None = None
        self._last_plain_s: dict[str, float] = {}

    def __enter__(self) -> GuidanceView:
        if self.console.is_terminal:
            self._live = Live(
                Text("connecting..."),
                console=self.console,
                refresh_per_second=LIVE_REFRESH_PER_S,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def on_state(self, state: RunnerState) -> None:
        self.states[state.device] = state
        if self._live is not None:
            self._live.update(Group(*(state_panel(s) for s in self.states.values())))
            return
        last = self._last_plain_s.get(state.device)
        if last is None or state.elapsed_s - last >= PLAIN_STATE_INTERVAL_S or state.finished:
            self._last_plain_s[state.device] = state.elapsed_s
            self.console.print(
                f"[{state.device} t={state.elapsed_s:7.2f}s] {plain_state(state)}",
                highlight=False,
                markup=False,
            )

    def on_decision(self, device: str, decision: Decision) -> None:
        if decision.kind is DecisionKind.GUIDANCE and decision.reason == "step_start":
            style = "bold"
        elif decision.kind in (DecisionKind.PAUSE, DecisionKind.STOP, DecisionKind.STOP_STEP):
            style = "bold red"
        elif decision.kind in (DecisionKind.WARNING, DecisionKind.LOWER_INTENSITY):
            style = "yellow"
        else:
            style = ""
        line = Text(decision_line(device, decision), style=style)
        if self._live is not None:
            self._live.console.print(line)
        else:
            self.console.print(line, highlight=False)


# --------------------------------------------------------------------------- waiting


@contextlib.asynccontextmanager
async def spinner(
    text: str, now_s: Callable[[], float], timeout_s: float | None = None
) -> AsyncIterator[None]:
    """A spinner on stderr with the time left (on ``now_s``'s clock) while the body waits.

    Only on a terminal; elsewhere nothing is printed (stderr stays for logs and errors).
    """
    if not sys.stderr.isatty():
        yield
        return
    console = Console(stderr=True)
    started_s = now_s()

    def label() -> Text:
        if timeout_s is None:
            return Text(f"{text}...")
        left_s = max(0.0, timeout_s - (now_s() - started_s))
        return Text(f"{text}... {left_s:.0f} s left")

    with console.status(label()) as status:

        async def refresh() -> None:
            while True:
                await asyncio.sleep(SPINNER_REFRESH_S)
                status.update(label())

        task = asyncio.create_task(refresh())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------- serve


class LogTail(logging.Handler):
    """The last log lines, for the full-screen view of ``serve`` (which hides stderr)."""

    def __init__(self, lines: int = SERVE_LOG_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def serve_screen(status: Mapping[str, Any], log_lines: Sequence[str]) -> RenderableType:
    """The full-screen view of ``serve``: broker, outbox, devices and their sessions, logs."""
    mqtt = status.get("mqtt", {})
    if mqtt.get("configured"):
        broker = f"{mqtt['host']}:{mqtt['port']} " + (
            "connected" if mqtt.get("connected") else "DISCONNECTED"
        )
    else:
        broker = "none (local only: --broker or an [mqtt] table to publish)"
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("bridge", Text(f"{status.get('bridge_id')} (pid {status.get('pid')})"))
    header.add_row("broker", Text(broker))
    header.add_row("outbox", f"{status.get('outbox_depth', 0)} message(s) waiting")
    header.add_row("updated", Text(_clock_time(status.get("updated_at"))))
    devices = Table(title="Devices", expand=True)
    for column in ("name", "kind", "state", "battery", "session"):
        devices.add_column(column)
    for d in status.get("devices", []):
        battery = d.get("battery_percent")
        devices.add_row(
            Text(str(d.get("name"))),
            kind_words(d.get("kind")),
            Text(str(d.get("state"))),
            "-" if battery is None else f"{battery}%",
            fmt(d.get("session_id")),
        )
    logs = Panel(
        Text("\n".join(log_lines) or "-", overflow="ellipsis", no_wrap=True),
        title="log",
    )
    footer = Text("Ctrl-C stops the bridge (sessions in progress are ended and recorded).")
    return Group(
        Panel(header, title=Text("devicebridge serve")),
        devices,
        logs,
        footer,
    )


def _clock_time(iso: object) -> str:
    if not isinstance(iso, str):
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return iso


class ServeView:
    """``serve`` on a terminal: a full-screen live view refreshed from the bridge's status.
    Elsewhere: one JSON line on stdout when the bridge, the broker link, a device or a
    session changes state (and every 30 s)."""

    def __init__(self, console: Console, status: Callable[[], Mapping[str, Any]]) -> None:
        self.console = console
        self._status = status
        self.tail = LogTail()
        self._last_key: str | None = None

    async def run(self) -> None:
        if self.console.is_terminal:
            await self._run_screen()
        else:
            await self._run_lines()

    async def _run_screen(self) -> None:
        root = logging.getLogger()
        # The screen replaces the terminal: logs go to the view's log panel instead.
        hidden = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
        for handler in hidden:
            root.removeHandler(handler)
        root.addHandler(self.tail)
        try:
            with Live(
                serve_screen(self._status(), ()),
                console=self.console,
                screen=True,
                auto_refresh=False,
            ) as live:
                while True:
                    live.update(serve_screen(self._status(), list(self.tail.lines)), refresh=True)
                    await asyncio.sleep(SERVE_REFRESH_S)
        finally:
            root.removeHandler(self.tail)
            for handler in hidden:
                root.addHandler(handler)

    async def _run_lines(self) -> None:
        last_s = -SERVE_LINE_EVERY_S
        while True:
            status = self._status()
            key = _status_key(status)
            now_s = time.monotonic()
            if key != self._last_key or now_s - last_s >= SERVE_LINE_EVERY_S:
                self._last_key, last_s = key, now_s
                sys.stdout.write(json.dumps({"type": "status", **status}) + "\n")
                sys.stdout.flush()
            await asyncio.sleep(SERVE_REFRESH_S)


def _status_key(status: Mapping[str, Any]) -> str:
    """What makes a new status line: the bridge's state, the broker link, each device's
    state and session (not counters that move all the time: outbox depth, battery)."""
    mqtt = status.get("mqtt", {})
    devices = [
        (d.get("serial"), d.get("state"), d.get("session_id")) for d in status.get("devices", [])
    ]
    return json.dumps([status.get("state"), mqtt.get("connected"), devices])
