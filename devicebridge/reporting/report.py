"""Reports of stored sessions: the summary, a PNG plot, and telemetry exports (CSV, JSON).

The summary is the one the runner stored when the session ended. A session without one
(the bridge was stopped mid-session, status ``interrupted``) gets it by replaying the
routine's engine over the stored telemetry, which is what the runner would have computed.
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devicebridge.core.engine import (
    LedEngine,
    MassageEngine,
)
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy, policy_zone
from devicebridge.core.routine import J_PER_MJ, MassageStep, Routine, parse_routine
from devicebridge.errors import ReportError, RoutineError
from devicebridge.storage.sessions import SessionRecord, SessionStore, StoredDecision
from protocols import MassageMode, SampleFormat
from protocols.constants import ZONE_NAMES
from protocols.telemetry import (
    IRRADIANCE_MW_CM2_PER_UNIT,
    LED_MASK_FLAG_TREATMENT_RUNNING,
    LED_MASK_FLAG_WORN,
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)

PLOT_WIDTH_IN: Final = 11.0
PLOT_HEIGHT_IN: Final = 6.0
PLOT_DPI: Final = 100
CHANNEL_COLOURS: Final = {"red": "tab:red", "near_infrared": "tab:brown", "blue": "tab:blue"}


@dataclass(frozen=True)
class SessionReport:
    record: SessionRecord
    summary: Mapping[str, Any]
    decisions: Sequence[StoredDecision]
    sequences: npt.NDArray[np.uint64]
    samples: npt.NDArray[np.void]
    routine: Routine | None

    @property
    def is_massage(self) -> bool:
        return self.record.sample_format is SampleFormat.MASSAGER_V1

    @property
    def times_s(self) -> npt.NDArray[np.float64]:
        """Seconds since the session's first stored sample."""
        if self.sequences.size == 0 or self.record.sample_rate_hz <= 0:
            return np.zeros(0)
        offsets: npt.NDArray[np.float64] = (self.sequences - self.sequences[0]).astype(np.float64)
        return offsets / float(self.record.sample_rate_hz)


def load_report(store: SessionStore, session_id: int, policy: SafetyPolicy) -> SessionReport:
    record = store.session(session_id)
    sequences, samples = store.telemetry(session_id)
    decisions = store.decisions(session_id)
    routine: Routine | None = None
    if record.routine_text:
        try:
            routine = parse_routine(record.routine_text, policy, label=f"session {session_id}")
        except RoutineError:
            routine = None  # stored under another policy: the summary still stands
    summary: Mapping[str, Any] = record.summary
    if "completion" not in summary and routine is not None and len(samples):
        summary = replay_summary(routine, policy, record, sequences, samples)
    return SessionReport(record, summary, decisions, sequences, samples, routine)


def replay_summary(
    routine: Routine,
    policy: SafetyPolicy,
    record: SessionRecord,
    sequences: npt.NDArray[np.uint64],
    samples: npt.NDArray[np.void],
) -> dict[str, Any]:
    """The summary the runner would have stored, from the stored telemetry."""
    rate = record.sample_rate_hz
    # Stored telemetry may have holes (lost samples): feed each contiguous run on its own.
    breaks = np.flatnonzero(np.diff(sequences.astype(np.int64)) != 1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), len(sequences)]
    if record.sample_format is SampleFormat.MASSAGER_V1:
        massage = MassageEngine(routine, policy, sample_rate_hz=rate)
        massage.start()
        for a, b in zip(starts, ends, strict=True):
            massage.feed(samples[a:b], int(sequences[a]))
        s = massage.summary
        return {
            "replayed": True,
            "steps_done": s.steps_done,
            "steps_total": s.steps_total,
            "completion": round(s.completion, 4),
            "completed": s.completed,
            "stopped_reason": s.stopped_reason,
            "contact_s": round(s.contact_s, 3),
            "time_in_band_s": round(s.time_in_band_s, 3),
            "in_band_fraction": round(s.in_band_fraction, 4),
            "out_of_band_events": s.out_of_band_events,
            "cap_events": s.cap_events,
            "contact_s_by_zone": {z: round(v, 3) for z, v in s.contact_s_by_zone.items()},
        }
    led = LedEngine(routine, policy, sample_rate_hz=rate)
    led.start()
    for a, b in zip(starts, ends, strict=True):
        led.feed(samples[a:b], int(sequences[a]))
    summary = led.summary
    return {
        "replayed": True,
        "steps_done": summary.steps_done,
        "steps_total": summary.steps_total,
        "completion": round(summary.completion, 4),
        "completed": summary.completed,
        "stopped_reason": summary.stopped_reason,
        "dose_j_cm2": {ch: round(v, 4) for ch, v in summary.dose_j_cm2.items()},
        "light_s": round(summary.light_s, 3),
    }


# --------------------------------------------------------------------------- telemetry rows


def telemetry_columns(report: SessionReport) -> list[str]:
    if report.is_massage:
        return [
            "sequence",
            "t_s",
            "pressure_kpa",
            "contact",
            "zone",
            "motor_on",
            "intensity",
            "mode",
            "skin_temperature_c",
            "battery_percent",
        ]
    return [
        "sequence",
        "t_s",
        *(f"{ch}_mw_cm2" for ch in LED_CHANNELS),
        "skin_temperature_c",
        "worn",
        "treatment_running",
        "battery_percent",
    ]


def telemetry_rows(report: SessionReport) -> list[dict[str, Any]]:
    """One dict per stored sample, in physical units."""
    samples = report.samples
    times = report.times_s
    base = {
        "sequence": report.sequences.tolist(),
        "t_s": np.round(times, 4).tolist(),
        "skin_temperature_c": np.round(
            samples["skin_temperature_centi_c"] * TEMPERATURE_C_PER_UNIT, 2
        ).tolist(),
        "battery_percent": samples["battery_percent"].tolist(),
    }
    if report.is_massage:
        flags = samples["flags"]
        base |= {
            "pressure_kpa": np.round(samples["pressure_dapa"] * PRESSURE_KPA_PER_UNIT, 2).tolist(),
            "contact": ((flags & MASSAGER_FLAG_CONTACT) != 0).tolist(),
            "zone": [ZONE_NAMES.get(int(z), "none") for z in samples["zone"]],
            "motor_on": ((flags & MASSAGER_FLAG_MOTOR_ON) != 0).tolist(),
            "intensity": samples["intensity"].tolist(),
            "mode": [_mode_name(int(m)) for m in samples["mode"]],
        }
    else:
        flags = samples["flags"]
        for ch in LED_CHANNELS:
            base[f"{ch}_mw_cm2"] = np.round(
                samples[f"{ch}_centi_mw_cm2"] * IRRADIANCE_MW_CM2_PER_UNIT, 2
            ).tolist()
        base |= {
            "worn": ((flags & LED_MASK_FLAG_WORN) != 0).tolist(),
            "treatment_running": ((flags & LED_MASK_FLAG_TREATMENT_RUNNING) != 0).tolist(),
        }
    columns = telemetry_columns(report)
    return [{name: base[name][i] for name in columns} for i in range(int(report.sequences.size))]


def _mode_name(code: int) -> str:
    try:
        return MassageMode(code).name.lower()
    except ValueError:
        return str(code)  # a mode newer than this host


def write_csv(report: SessionReport, path: Path) -> int:
    """Write the telemetry as CSV; returns the number of data rows.

    Typed for a spreadsheet: numbers as numbers, flags (contact, motor, worn) as 0/1,
    the zone and the mode by name."""
    rows = [
        {key: int(value) if isinstance(value, bool) else value for key, value in row.items()}
        for row in telemetry_rows(report)
    ]
    try:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=telemetry_columns(report))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as exc:
        raise ReportError(f"cannot write CSV: {exc.strerror}", path=path) from exc
    return len(rows)


def report_json(report: SessionReport) -> dict[str, Any]:
    record = report.record
    return {
        "session": {
            "id": record.id,
            "routine": record.routine_name,
            "category": record.category,
            "device_serial": record.device_serial,
            "device_kind": record.device_kind,
            "sample_rate_hz": record.sample_rate_hz,
            "started_at": record.started_at.isoformat(),
            "ended_at": record.ended_at.isoformat() if record.ended_at else None,
            "status": record.status,
            "end_reason": record.end_reason,
        },
        "summary": dict(report.summary),
        "decisions": [
            {
                "at_s": d.at_s,
                "kind": d.kind,
                "step": d.step,
                "reason": d.reason,
                "message": d.message,
                "rule": d.rule,
                "sequence": d.sequence,
            }
            for d in report.decisions
        ],
        "telemetry_columns": telemetry_columns(report),
        "telemetry": telemetry_rows(report),
    }


def write_json(report: SessionReport, path: Path) -> int:
    """Write summary, decisions and telemetry as JSON; returns the number of samples."""
    data = report_json(report)
    try:
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write JSON: {exc.strerror}", path=path) from exc
    return len(data["telemetry"])


# --------------------------------------------------------------------------- the plot


def _step_spans(report: SessionReport, end_s: float) -> list[tuple[int, float, float]]:
    """(step number, start_s, end_s) from the stored decisions."""
    starts: dict[int, float] = {}
    for decision in report.decisions:
        starts_step = decision.kind == "next_step" or (
            decision.kind == "guidance" and decision.reason == "step_start"
        )
        if starts_step and decision.step not in starts:
            starts[decision.step] = decision.at_s
    ordered = sorted(starts.items())
    spans = []
    for i, (step, start_s) in enumerate(ordered):
        stop_s = ordered[i + 1][1] if i + 1 < len(ordered) else end_s
        spans.append((step, start_s, stop_s))
    return spans


def write_png(report: SessionReport, path: Path, policy: SafetyPolicy) -> None:
    """Massage: pressure coloured by zone with the step bands; mask: irradiance and dose."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report.samples
    times = report.times_s
    record = report.record
    title = f"Session {record.id}: {record.routine_name} ({record.status})"
    if report.is_massage:
        fig, axis = plt.subplots(figsize=(PLOT_WIDTH_IN, PLOT_HEIGHT_IN), dpi=PLOT_DPI)
        pressure = rows["pressure_dapa"] * PRESSURE_KPA_PER_UNIT
        zones = rows["zone"]
        colours = plt.get_cmap("tab20")
        touching = (rows["flags"] & MASSAGER_FLAG_CONTACT) != 0
        axis.scatter(
            times[~touching], pressure[~touching], s=1, color="lightgrey", label="no contact"
        )
        for index, code in enumerate(sorted({int(z) for z in zones[touching]})):
            mask = touching & (zones == code)
            axis.scatter(
                times[mask],
                pressure[mask],
                s=2,
                color=colours(index % 20),
                label=ZONE_NAMES.get(code, "none"),
            )
        end_s = float(times[-1]) if times.size else 0.0
        massage_steps = (
            [s for s in report.routine.steps if isinstance(s, MassageStep)]
            if report.routine
            else []
        )
        for step_number, start_s, stop_s in _step_spans(report, end_s):
            if step_number - 1 >= len(massage_steps):
                continue
            step = massage_steps[step_number - 1]
            axis.fill_between(
                [start_s, stop_s],
                step.pressure_min_kpa,
                step.pressure_max_kpa,
                color="tab:green",
                alpha=0.12,
            )
            cap = policy.zones[policy_zone(step.zone)].cap_kpa.value
            axis.hlines(cap, start_s, stop_s, colors="tab:red", linestyles="dashed", linewidth=1)
            axis.text(start_s, step.pressure_max_kpa, f" {step.zone}", fontsize=7, va="bottom")
        for decision in report.decisions:
            if decision.kind in ("pause", "stop", "stop_step"):
                axis.axvline(decision.at_s, color="tab:red", alpha=0.4, linewidth=1)
        axis.set_xlabel("time (s)")
        axis.set_ylabel("pressure (kPa)")
        axis.legend(loc="upper right", fontsize=7, markerscale=4, ncol=2)
        axis.set_title(f"{title}: target bands green, caps dashed red, stops red lines")
    else:
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(PLOT_WIDTH_IN, PLOT_HEIGHT_IN), dpi=PLOT_DPI, sharex=True
        )
        dt_s = 1.0 / record.sample_rate_hz if record.sample_rate_hz > 0 else 0.0
        for ch in LED_CHANNELS:
            irradiance = rows[f"{ch}_centi_mw_cm2"] * IRRADIANCE_MW_CM2_PER_UNIT
            top.plot(times, irradiance, color=CHANNEL_COLOURS[ch], label=ch, linewidth=1)
            dose = np.cumsum(irradiance) * dt_s / J_PER_MJ
            bottom.plot(times, dose, color=CHANNEL_COLOURS[ch], label=ch, linewidth=1)
            cap = policy.led[ch].dose_cap_session_j_cm2.value
            if dose.size and dose[-1] > 0:
                bottom.axhline(cap, color=CHANNEL_COLOURS[ch], linestyle="dashed", linewidth=1)
        top.set_ylabel("irradiance (mW/cm²)")
        top.legend(loc="upper right", fontsize=8)
        top.set_title(title)
        bottom.set_ylabel("cumulative dose (J/cm²)")
        bottom.set_xlabel("time (s)")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ReportError(f"cannot write PNG: {exc.strerror}", path=path) from exc
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- text summary


def summary_lines(report: SessionReport) -> list[str]:
    """The summary as text lines (the CLI prints them; tests read them)."""
    record, summary = report.record, report.summary
    lines = [
        f"session {record.id}: {record.routine_name} on {record.device_serial} "
        f"({record.device_kind}), {record.started_at:%Y-%m-%d %H:%M}",
        f"status: {record.status}" + (f" ({record.end_reason})" if record.end_reason else ""),
    ]
    if "completion" in summary:
        lines.append(
            f"completion: {float(summary['completion']) * 100:.0f} % "
            f"({summary.get('steps_done', 0)}/{summary.get('steps_total', 0)} steps)"
            + (" (replayed from telemetry)" if summary.get("replayed") else "")
        )
    if "time_s_by_zone" in summary:
        lines.append("time in each zone (by the clock):")
        for zone, seconds in summary["time_s_by_zone"].items():
            lines.append(f"  {zone}: {float(seconds):.1f} s")
        lines.append(f"cues to move on: {summary.get('move_cues', 0)}")
    if "contact_s_by_zone" in summary:
        lines.append("time in each zone (contact):")
        for zone, seconds in summary["contact_s_by_zone"].items():
            lines.append(f"  {zone}: {float(seconds):.1f} s")
        contact = float(summary.get("contact_s", 0.0))
        in_band = float(summary.get("time_in_band_s", 0.0))
        share = in_band / contact * 100 if contact else 0.0
        lines.append(f"time in band: {in_band:.1f} s of {contact:.1f} s ({share:.0f} %)")
        lines.append(f"out-of-band events: {summary.get('out_of_band_events', 0)}")
        lines.append(f"above-cap events: {summary.get('cap_events', 0)}")
    if "dose_j_cm2" in summary:
        lines.append("LED dose per wavelength:")
        for ch, dose in summary["dose_j_cm2"].items():
            if float(dose) > 0 or ch != "blue":
                lines.append(f"  {ch}: {float(dose):.2f} J/cm²")
    checks = summary.get("checks")
    if isinstance(checks, Mapping):
        lines.extend(f"{what.replace('_', ' ')}: {how}" for what, how in checks.items())
    lines.append(f"samples stored: {int(report.sequences.size)}")
    if "refusals" in summary:
        for refusal in summary["refusals"]:
            lines.append(f"refused: {refusal['message']}")
    return lines
