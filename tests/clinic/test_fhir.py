"""FHIR R4 exports: from the console (a session, a client over a date range) and from the
CLI (`devicebridge report N --fhir`); every Bundle validates with fhir.resources, and the
golden example in docs/clinic.md is what the exporter produces."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner
from fhir.resources.R4B.bundle import Bundle

from devicebridge.cli import main
from devicebridge.clinic.fhir import (
    SNOMED,
    UCUM,
    DeviceFacts,
    ProgramFacts,
    SessionFacts,
    ZoneFacts,
    bundle,
)
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
from protocols import SampleFormat
from tests.clinic.web import Web, massager_samples

DOCS = Path(__file__).resolve().parents[2] / "docs" / "clinic.md"


def resources(data: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == kind]


def observation(data: dict[str, Any], code: str, zone: str | None = None) -> dict[str, Any]:
    for o in resources(data, "Observation"):
        if o["code"]["coding"][0]["code"] != code:
            continue
        if zone is None or o["bodySite"]["coding"][0]["code"] == zone:
            return o
    raise AssertionError(f"no observation {code} {zone}")


def test_a_client_export_is_a_valid_bundle_with_every_part(web: Web) -> None:
    web.login("dr-a")
    client = web.ids["bridge-a"]
    response = web.client.get(f"/clients/{client}/fhir")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    data = response.json()
    Bundle.model_validate(data)
    assert data["type"] == "collection"
    (patient,) = resources(data, "Patient")
    assert patient["identifier"] == [{"system": "urn:devicebridge:client", "value": "bridge-a"}]
    assert "name" not in patient
    assert patient["meta"]["security"][0]["code"] == "PSEUDED"
    (device,) = resources(data, "Device")
    assert (device["serialNumber"], device["modelNumber"]) == ("FM-1A", "FM-2")
    assert device["version"][0]["value"] == "1.4.2"
    (program,) = resources(data, "ServiceRequest")
    assert program["occurrenceTiming"]["repeat"]["period"] == 7
    procedures = resources(data, "Procedure")
    assert [p["status"] for p in procedures] == ["completed", "completed"]
    first = procedures[0]
    assert first["performedPeriod"] == {
        "start": "2026-12-01T10:00:00+00:00",
        "end": "2026-12-01T10:05:00+00:00",
    }
    program_url = next(e["fullUrl"] for e in data["entry"] if e["resource"] is program)
    assert first["basedOn"] == [{"reference": program_url}]
    sites = {c["code"] for site in first["bodySite"] for c in site["coding"]}
    assert {"cheek_left", "cheek_right", "60819002"} <= sites
    # Session 1 was followed live: 2 s on the left cheek at 8 kPa, 1 s on the right at 10.
    contact = observation(data, "contact-time", "cheek_left")
    assert contact["valueQuantity"] == {"value": 2.0, "unit": "s", "system": UCUM, "code": "s"}
    assert observation(data, "pressure-mean", "cheek_right")["valueQuantity"]["value"] == 10.0
    assert observation(data, "pressure-max", "cheek_left")["valueQuantity"]["code"] == "kPa"
    assert observation(data, "time-in-band")["valueQuantity"]["value"] == 250.0
    assert any(c["system"] == SNOMED for c in contact["bodySite"]["coding"]), (
        "the zone carries its SNOMED CT region"
    )
    # A date range, and one session.
    ranged = web.client.get(f"/clients/{client}/fhir?from=2026-12-02&to=2026-12-02").json()
    Bundle.model_validate(ranged)
    assert len(resources(ranged, "Procedure")) == 1
    session = web.session_id("bridge-a", 2)
    one = web.client.get(f"/clients/{client}/sessions/{session}/fhir").json()
    Bundle.model_validate(one)
    assert resources(one, "Procedure")[0]["identifier"][0]["value"] == "bridge-a/2"


def test_the_cli_exports_a_stored_session(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        session = store.start_session(
            routine_name="Firming",
            category="firming",
            device_serial="FM-9",
            device_kind="massager",
            sample_format=SampleFormat.MASSAGER_V1,
            sample_rate_hz=100.0,
            program_id="4",
            started_at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC),
        )
        store.append_samples(session, 0, massager_samples(300, "jawline_left", 12.0))
        store.append_samples(session, 300, massager_samples(150, "chin", 9.5))
        store.finish_session(
            session,
            status="stopped",
            end_reason="pressure above the cap",
            summary={"completion": 0.5, "contact_s": 4.5, "time_in_band_s": 4.0, "cap_events": 1},
        )
    out = tmp_path / "s.fhir.json"
    result = CliRunner().invoke(
        main, ["--data-dir", str(data_dir), "report", str(session), "--fhir", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"FHIR R4 Bundle written to {out}" in result.output
    data = json.loads(out.read_text())
    Bundle.model_validate(data)
    (procedure,) = resources(data, "Procedure")
    assert procedure["status"] == "stopped"
    assert procedure["statusReason"] == {"text": "stopped"}
    assert observation(data, "contact-time", "jawline_left")["valueQuantity"]["value"] == 3.0
    assert observation(data, "pressure-mean", "chin")["valueQuantity"]["value"] == 9.5
    jaw = observation(data, "contact-time", "jawline_left")["bodySite"]["coding"]
    assert {"system": SNOMED, "code": "661005", "display": "Jaw region structure"} in jaw
    assert len(resources(data, "ServiceRequest")) == 1  # program 4


def golden_bundle() -> dict[str, Any]:
    """The example of docs/clinic.md: one massage session and one LED session."""
    start = datetime(2026, 11, 24, 19, 30, tzinfo=UTC)
    return bundle(
        client_pseudonym="client-0042",
        devices=[
            DeviceFacts("FM-2AC1", "massager", "FM-2", "1.4.2", "face"),
            DeviceFacts("LM-77B0", "led_mask", "LM-1", "2.0.1"),
        ],
        programs=[ProgramFacts("3", "Firming: cheeks, jawline, chin", "dr-lee", "3", 2, 7.0)],
        sessions=[
            SessionFacts(
                key="17",
                status="completed",
                routine="Firming: cheeks, jawline, chin",
                started_at=start,
                ended_at=start.replace(minute=36),
                device_serial="FM-2AC1",
                program_key="3",
                zones=[ZoneFacts("cheek_left", 60.2, 8.4, 11.6)],
                time_in_band_s=55.0,
                completion=1.0,
            ),
            SessionFacts(
                key="18",
                status="completed",
                routine="Red and near-infrared",
                started_at=start.replace(minute=40),
                ended_at=start.replace(minute=50),
                device_serial="LM-77B0",
                zones=[ZoneFacts("face", 600.0)],
                dose_j_cm2={"red": 18.0, "near_infrared": 12.0},
                max_skin_temperature_c=34.1,
                completion=1.0,
            ),
        ],
        generated_at=datetime(2026, 11, 25, 8, 0, tzinfo=UTC),
    )


def test_the_golden_example_in_the_docs_is_what_the_exporter_makes() -> None:
    expected = golden_bundle()
    Bundle.model_validate(expected)
    text = DOCS.read_text("utf-8")
    found = re.search(r"<!-- golden-fhir -->\s*```json\n(.*?)```", text, re.S)
    assert found is not None, "docs/clinic.md has no golden FHIR example"
    documented = json.loads(found.group(1))
    assert documented["entry"][0]["resource"]["resourceType"] == "Patient"
    assert documented == json.loads(json.dumps(expected)), (
        "docs/clinic.md's example is out of date: replace it with\n"
        + json.dumps(expected, indent=1)
    )
    # Same sessions, same Bundle: the ids are derived, not random.
    assert golden_bundle() == expected
    assert np.isclose(observation(expected, "led-dose-red")["valueQuantity"]["value"], 18.0)
