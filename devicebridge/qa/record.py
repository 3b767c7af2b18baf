"""Record a stored session as a scenario, so that it can be replayed against the bridge.

The scenario reproduces what the device measured, from the session's stored telemetry:
for a massager, the hand's pressure and zone every 0.1 s (a ``profile`` hand action;
lifted where the device saw no contact); the routine itself (inline); and, as
expectations, the session's final status and the safety-relevant decisions the bridge took
(pauses, stops, step ends, completion) in order. The replayed device adds its own seeded
sensor noise on top of the recorded pressures, so a replay checks decisions, not bytes.
"""

from __future__ import annotations

import json
from typing import Final

import numpy as np
import numpy.typing as npt

from devicebridge.errors import SessionStoreError
from devicebridge.storage.sessions import SessionStore
from protocols.constants import ZONE_NAMES
from protocols.telemetry import MASSAGER_FLAG_CONTACT, PRESSURE_KPA_PER_UNIT

PROFILE_STEP_S: Final = 0.1
REPLAY_TAIL_S: Final = 2.0
REPLAY_MARGIN_S: Final = 15.0
REPLAYED_DECISIONS: Final = frozenset({"pause", "stop", "stop_step", "complete"})


def record_scenario(store: SessionStore, session_id: int, *, seed: int = 0) -> str:
    """A scenario (TOML text) that replays session ``session_id`` of ``store``."""
    record = store.session(session_id)
    if not record.routine_text:
        raise SessionStoreError(
            f"session {session_id} has no routine text to replay", path=store.path
        )
    sequences, samples = store.telemetry(session_id)
    rate_hz = record.sample_rate_hz
    kind = "massager" if record.device_kind == "massager" else "mask"
    duration_s = len(sequences) / rate_hz if rate_hz else 0.0
    lines = [
        "# Recorded from a stored session by `devicebridge-sim scenario record`.",
        "[scenario]",
        f"name = {json.dumps(f'replay of session {session_id}: {record.routine_name}')}",
        f"description = {json.dumps(_description(record.status, record.end_reason))}",
        f"seed = {seed}",
        f"duration_s = {round(duration_s + REPLAY_MARGIN_S, 1)}",
        f"routine_text = {json.dumps(record.routine_text)}",
        "",
        "[[devices]]",
        'name = "recorded"',
        f'kind = "{kind}"',
        'hand = "idle"' if kind == "massager" else "worn = true",
        "hand_noise = false" if kind == "massager" else "",
        "",
    ]
    if kind == "massager" and len(samples):
        # The replayed device boots at 0 like the recorded one: the recording starts at the
        # device time of its first stored sample.
        lines += _profile(samples, rate_hz, start_s=int(sequences[0]) / rate_hz)
    lines += ["[[expect]]", f'status = "{record.status}"']
    decisions = [d for d in store.decisions(session_id) if d.kind in REPLAYED_DECISIONS]
    if decisions:
        lines.append("decisions = [")
        lines += [f'  {{ kind = "{d.kind}", reason = "{d.reason}" }},' for d in decisions]
        lines.append("]")
    return "\n".join(line for line in lines if line is not None) + "\n"


def _description(status: str, end_reason: str | None) -> str:
    return f"recorded session ended {status}" + (f" ({end_reason})" if end_reason else "")


def _profile(samples: npt.NDArray[np.void], rate_hz: float, *, start_s: float) -> list[str]:
    per_step = max(1, round(rate_hz * PROFILE_STEP_S))
    count = len(samples) // per_step * per_step
    blocks = samples[:count].reshape(-1, per_step)
    contact = (blocks["flags"] & MASSAGER_FLAG_CONTACT) != 0
    pressure = blocks["pressure_dapa"].astype(np.float64) * PRESSURE_KPA_PER_UNIT
    # Lifted where most of the block had no contact; else the mean pressure while touching.
    touching = contact.sum(axis=1) * 2 > per_step
    kpa = np.where(
        touching, (pressure * contact).sum(axis=1) / np.maximum(contact.sum(axis=1), 1), 0.0
    )
    # The zone one block late: in the recording the zone changed only once the bridge had
    # moved on, and a replay a sample behind must not leave a zone before its step is done.
    starts = blocks["zone"][:, 0]
    lagged = np.concatenate([starts[:1], starts[:-1]])
    zones = [ZONE_NAMES.get(int(code), "none") for code in lagged]
    # The hand stays as it was at the end for a moment: a replay that runs a little behind
    # the recording still finds the head on the skin.
    tail = round(REPLAY_TAIL_S / PROFILE_STEP_S)
    kpa = np.concatenate([kpa, np.full(tail, kpa[-1])])
    zones += [zones[-1]] * tail
    return [
        "[[hand]]",
        'action = "profile"',
        f"at_s = {start_s:.3f}",
        f"step_s = {per_step / rate_hz:g}",
        "pressure_kpa = [" + ", ".join(f"{v:.2f}" for v in kpa) + "]",
        "zones = [" + ", ".join(f'"{z}"' for z in zones) + "]",
        "",
    ]
