"""Pages a therapist reads: an LED session's dose and temperature plots, the client list's
adherence and alerts, and acknowledging an alert."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
from sqlalchemy import select

from devicebridge.clinic import schema as t
from devicebridge.clinic.ingest import IngestStore
from protocols.telemetry import LED_MASK_FLAG_WORN, LED_MASK_SAMPLE_DTYPE
from tests.clinic.web import Web, message


def led_session(bridge: str) -> list[object]:
    """An LED mask session of 3 s: red 40 and near-infrared 20 mW/cm², skin at 33.5 °C."""
    state = {
        "serial": "LM-1",
        "kind": "led_mask",
        "model": "LM-1",
        "firmware": "2.0.1",
        "state": "ready",
        "battery_percent": 90,
    }
    out = [
        message(
            bridge, "devices/LM-1/state", {"message_id": f"{bridge}:500", **state, "session_id": 9}
        )
    ]
    for n in range(3):
        samples = np.zeros(10, dtype=LED_MASK_SAMPLE_DTYPE)
        samples["red_centi_mw_cm2"] = 4000
        samples["near_infrared_centi_mw_cm2"] = 2000
        samples["skin_temperature_centi_c"] = 3350
        samples["flags"] = LED_MASK_FLAG_WORN
        out.append(
            message(
                bridge,
                "devices/LM-1/telemetry",
                {
                    "message_id": f"{bridge}:{501 + n}",
                    "serial": "LM-1",
                    "sample_format": "led_mask_v1",
                    "sample_rate_hz": 10,
                    "first_sequence": n * 10,
                    "device_time_ms": n * 1000,
                    "count": 10,
                    "samples_b64": base64.b64encode(samples.tobytes()).decode(),
                    "gaps": [],
                },
            )
        )
    out.append(
        message(
            bridge,
            "devices/LM-1/state",
            {"message_id": f"{bridge}:510", **state, "session_id": None},
        )
    )
    out.append(
        message(
            bridge,
            "sessions/summary",
            {
                "message_id": f"{bridge}:511",
                "session_id": 9,
                "serial": "LM-1",
                "status": "completed",
                "end_reason": None,
                "program_id": None,
                "started_at": "2026-12-03T20:00:00+00:00",
                "ended_at": "2026-12-03T20:10:00+00:00",
                "summary": {
                    "routine": "Red and near-infrared",
                    "completion": 1.0,
                    "light_s": 3.0,
                    "dose_j_cm2": {"red": 0.12, "near_infrared": 0.06, "blue": 0.0},
                    "max_temperature_c": 33.5,
                    "steps_done": 1,
                    "steps_total": 1,
                },
            },
        )
    )
    return out


def test_an_led_session_shows_dose_and_temperature_and_exports_them(web: Web) -> None:
    IngestStore(web.engine).apply(led_session("bridge-a"))  # type: ignore[arg-type]
    web.login("dr-a")
    client = web.ids["bridge-a"]
    session = web.session_id("bridge-a", 9)
    page = web.client.get(f"/clients/{client}/sessions/{session}")
    assert page.status_code == 200
    assert "Cumulative dose by wavelength" in page.text
    assert 'data-chart="dose"' in page.text
    plot = json.loads(
        re.search(r"id=\"session-plot\" hidden data-json='([^']*)'", page.text)[1]  # type: ignore[index]
    )
    assert plot["kind"] == "led_mask"
    # 40 mW/cm² for 3 s is 0.12 J/cm²; the plot's cumulative dose ends there.
    assert np.isclose(plot["dose"]["red"][-1], 0.12)
    assert plot["temperature"] == [33.5, 33.5, 33.5]
    assert plot["dose_caps"]["red"] > 0
    bundle = web.client.get(f"/clients/{client}/sessions/{session}/fhir").json()
    codes = {
        e["resource"]["code"]["coding"][0]["code"]: e["resource"].get("valueQuantity")
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }
    assert codes["led-dose-red"]["value"] == 0.12
    assert codes["led-dose-red"]["code"] == "J/cm2"
    assert codes["skin-temperature-max"] == {
        "value": 33.5,
        "unit": "Cel",
        "system": "http://unitsofmeasure.org",
        "code": "Cel",
    }


def test_the_client_list_shows_adherence_and_what_needs_attention(web: Web) -> None:
    csrf = web.login("dr-a")
    client = web.ids["bridge-a"]
    data = web.client.get("/api/clients").json()["clients"][0]
    assert data["availability"] == "online"
    assert data["devices"][0]["firmware"] == "1.4.2"
    assert data["last_session"]["started_at"] == "2026-12-02T10:00:00+00:00"
    (program,) = data["adherence"]
    assert (program["routine"], program["target"], program["per_days"]) == ("Firming", 2, 7.0)
    assert data["open_alerts"] == 0
    # A device fault arrives: the client is marked, and a therapist marks it seen.
    IngestStore(web.engine).apply(
        [
            message(
                "bridge-a",
                "devices/FM-1A/events",
                {"message_id": "bridge-a:900", "type": "device_event", "code": "over_temperature"},
            )
        ]
    )
    listed = web.client.get("/api/clients").json()["clients"][0]
    assert listed["open_alerts"] == 1
    assert "over temperature" in listed["newest_alert"]["message"]
    assert "device fault" in web.client.get("/").text
    with web.engine.connect() as db:
        alert = db.execute(select(t.alerts.c.id)).scalar_one()
    response = web.client.post(
        f"/clients/{client}/alerts/{alert}/acknowledge", headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code in (200, 303)
    assert web.client.get("/api/clients").json()["clients"][0]["open_alerts"] == 0
