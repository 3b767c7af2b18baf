"""Admission reads only the past sessions it can use, and decides as if it read them all.

``check_routine_admission`` asks the store for the sessions within the windows that apply
to the routine (``history_span``) and for the light of the last day; the reference here
reads every stored session, as admission did before, and hands them all to the same pure
``check_admission``. Hypothesis searches for a history where the two answers differ.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from devicebridge.core.admission import PastSession, check_admission, session_completion
from devicebridge.core.library import starter_routines
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import DeviceKindName, Routine, parse_routine
from devicebridge.run.history import check_routine_admission, recorded_treatments
from devicebridge.run.runner import SAMPLE_FORMAT_OF
from devicebridge.storage.sessions import SessionStore

from .conftest import NOW

POLICY = default_policy()
CATEGORIES = ("firming", "Firming", "drainage", "led_red_near_infrared", "led_blue", "bench")
SUMMARIES: tuple[dict[str, Any], ...] = (
    {},
    {"completion": 1.0},
    {"completion": 0.2},
    {"completion": 0.7, "dose_j_cm2": {"red": 20.0, "nir": 10.0}},
    {"completion": 0.4, "dose_j_cm2": {"blue": 9.0}},
    {"completion": True, "dose_j_cm2": [3.0]},
    {"completion": 0.9, "mean_kpa": float("nan"), "dose_j_cm2": {"red": 5.0}},
)


def routines() -> list[Routine]:
    found = []
    for text in starter_routines().values():
        found.append(parse_routine(text, POLICY, label="starter"))
        # The same routine in a category the policy does not know: every rule applies.
        # (A schedule looser than every rule is refused for it: leave those out.)
        unknown = text.replace('category = "', 'category = "renamed ', 1)
        if "[schedule]" not in text:
            found.append(parse_routine(unknown, POLICY, label="renamed"))
    return found


ROUTINES = routines()


def of_category(category: str) -> Routine:
    return next(routine for routine in ROUTINES if routine.category == category)


past_session = st.tuples(
    st.floats(min_value=-9.0, max_value=0.05),  # days from now (a few in the future)
    st.sampled_from(CATEGORIES),
    st.sampled_from(("massager", "led_mask")),
    st.sampled_from(("completed", "stopped", "interrupted", "refused")),
    st.sampled_from(SUMMARIES),
)


def every_session(store: SessionStore) -> list[PastSession]:
    """Every stored session as admission sees one (the reference: no window, no filter)."""
    history = []
    for record in store.sessions():
        if record.status == "refused":
            continue
        kind = DeviceKindName(record.device_kind)
        dose = record.summary.get("dose_j_cm2")
        history.append(
            PastSession(
                record.started_at,
                record.category,
                kind,
                record.status == "completed",
                {str(k): float(v) for k, v in dose.items()} if isinstance(dose, dict) else {},
                session_completion(record.summary.get("completion")),
            )
        )
    return history


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(past_session, max_size=14), st.sampled_from(ROUTINES))
# A summary SQLite cannot read (a NaN) with light, on a massager, in the last day: read
# whole, its dose counted (LED routine), and for a massage routine too.
@example([(-0.5, "drainage", "massager", "stopped", SUMMARIES[-1])], of_category("firming"))
@example([(-0.5, "drainage", "massager", "stopped", SUMMARIES[-1])], of_category("drainage"))
@example([(-0.5, "bench", "massager", "completed", SUMMARIES[-1])], of_category("led_blue"))
def test_admission_decides_as_if_it_read_every_session(
    sessions: list[tuple[float, str, str, str, dict[str, Any]]], routine: Routine
) -> None:
    with tempfile.TemporaryDirectory() as folder, SessionStore(Path(folder) / "s.db") as store:
        for days, category, kind, status, summary in sessions:
            session_id = store.start_session(
                routine_name="past",
                category=category,
                device_serial="SN-1",
                device_kind=kind,
                sample_format=SAMPLE_FORMAT_OF[DeviceKindName(kind)],
                sample_rate_hz=50.0,
                started_at=NOW + timedelta(days=days),
            )
            store.finish_session(session_id, status=status, end_reason=None, summary=summary)
        read_what_it_needs = check_routine_admission(routine, POLICY, store, now=NOW)
        read_everything = check_admission(
            routine,
            POLICY,
            now=NOW,
            history=every_session(store),
            treatments=recorded_treatments(store),
        )
    assert read_what_it_needs == read_everything
