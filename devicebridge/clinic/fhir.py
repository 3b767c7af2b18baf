"""Sessions as HL7 FHIR R4 Bundles (``devicebridge report N --fhir`` and the clinic console).

A Bundle of type ``collection`` holds, for one client:

- a ``Patient`` that is only a pseudonym (an identifier, no name, no birth date; tagged
  with the security label PSEUDED);
- a ``Device`` per device (serial number, model, firmware version);
- a ``ServiceRequest`` per program the sessions were based on (its routine, its schedule
  as a timing, the therapist who signed it);
- a ``Procedure`` per session (status, performed period, body sites per zone, based on
  its program, the device used);
- ``Observation``s per session, part of its Procedure, with UCUM units: contact time per
  zone (s), mean and maximum pressure per zone (kPa), time in band (s), LED dose per
  wavelength (J/cm2), maximum skin temperature (Cel).

Full URLs are ``urn:uuid:`` values derived from stable keys (uuid5), so exporting the
same sessions twice gives the same Bundle. Every Bundle is validated with the
``fhir.resources`` models before it is returned (the clinic extra); the models are
those of FHIR R4B (4.3.0), whose Patient, Device, ServiceRequest, Procedure,
Observation and Bundle have the structure of R4 (4.0.1) for every element used here.
Facial zones are coded in devicebridge's own code system, each with the SNOMED CT body
structure that contains it where one exists (and laterality in the text).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from devicebridge.errors import FhirExportError

if TYPE_CHECKING:
    from devicebridge.reporting.report import SessionReport

SNOMED: Final = "http://snomed.info/sct"
UCUM: Final = "http://unitsofmeasure.org"
LOINC: Final = "http://loinc.org"
CODES: Final = "urn:devicebridge:fhir:codes"  # observation and procedure codes
ZONES: Final = "urn:devicebridge:fhir:facial-zone"
CLIENT_IDS: Final = "urn:devicebridge:client"  # pseudonyms: the client's bridge id or label
DEVICE_SERIALS: Final = "urn:devicebridge:device-serial"
PROGRAM_IDS: Final = "urn:devicebridge:program"
SESSION_IDS: Final = "urn:devicebridge:session"
NAMESPACE: Final = uuid.UUID("8a5f5a2e-8b1b-4bd5-9a0e-6f0d1f1c1d2e")
OBSERVATION_CATEGORY: Final = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "procedure",
            "display": "Procedure",
        }
    ]
}
PSEUDONYMIZED: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "PSEUDED",
    "display": "pseudonymized",
}
# The SNOMED CT body structure containing each zone (none for nasolabial and masseter).
ZONE_SNOMED: Final[Mapping[str, tuple[str, str]]] = {
    "forehead": ("52795006", "Forehead structure"),
    "eye_area": ("371398005", "Eye region structure"),
    "cheek": ("60819002", "Buccal region of face"),
    "jawline": ("661005", "Jaw region structure"),
    "chin": ("30291003", "Chin structure"),
    "neck": ("45048000", "Neck structure"),
    "face": ("89545001", "Face structure"),
}
WAVELENGTHS: Final = {"red": "red", "near_infrared": "near-infrared", "blue": "blue"}
STATUS: Final = {
    "completed": "completed",
    "stopped": "stopped",
    "interrupted": "stopped",
    "running": "in-progress",
    "refused": "not-done",
}


@dataclass(frozen=True, slots=True)
class ZoneFacts:
    zone: str  # a massage zone (cheek_left ...) or "face" for an LED mask
    contact_s: float
    pressure_mean_kpa: float | None = None
    pressure_max_kpa: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    serial: str
    kind: str | None = None  # massager / led_mask
    model: str | None = None
    firmware: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ProgramFacts:
    key: str  # unique among the client's programs (the bridge's program id)
    routine: str | None
    therapist_id: str | None = None
    program_version: str | None = None
    max_sessions: int | None = None
    per_days: float | None = None


@dataclass(frozen=True, slots=True)
class SessionFacts:
    key: str  # unique for the client (the bridge's session id)
    status: str
    routine: str | None
    started_at: datetime | None
    ended_at: datetime | None
    device_serial: str | None
    program_key: str | None = None
    zones: Sequence[ZoneFacts] = ()
    time_in_band_s: float | None = None
    dose_j_cm2: Mapping[str, float] = field(default_factory=dict)
    max_skin_temperature_c: float | None = None
    completion: float | None = None


def zone_facts(rows: Iterable[Mapping[str, Any]]) -> list[ZoneFacts]:
    """Contact time and pressure per zone from digest rows (``clinic.records``)."""
    contact: dict[str, int] = defaultdict(int)
    weighted: dict[str, float] = defaultdict(float)
    peak: dict[str, float] = {}
    rate: dict[str, float] = {}
    for row in rows:
        zone = str(row["zone"])
        if zone == "none" or not row["contact_samples"]:
            continue
        samples = int(row["contact_samples"])
        contact[zone] += samples
        rate[zone] = float(row["sample_rate_hz"])
        if row.get("pressure_mean_kpa") is not None:
            weighted[zone] += float(row["pressure_mean_kpa"]) * samples
            peak[zone] = max(peak.get(zone, 0.0), float(row["pressure_max_kpa"]))
    return [
        ZoneFacts(
            zone,
            round(contact[zone] / rate[zone], 2),
            round(weighted[zone] / contact[zone], 2) if zone in peak else None,
            round(peak[zone], 2) if zone in peak else None,
        )
        for zone in sorted(contact)
    ]


def _id(*parts: object) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, '/'.join(str(p) for p in parts))}"


def _time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def _code(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": CODES, "code": code, "display": display}], "text": display}


def _policy_zone(zone: str) -> str:
    for side in ("_left", "_right"):
        if zone.endswith(side):
            return zone.removesuffix(side)
    return zone


def body_site(zone: str) -> dict[str, Any]:
    """A facial zone as a CodeableConcept (devicebridge's code, SNOMED CT's region)."""
    region = _policy_zone(zone)
    side = zone.removeprefix(region).strip("_")
    display = f"{side} {region.replace('_', ' ')}".strip() if side else region.replace("_", " ")
    codings = [{"system": ZONES, "code": zone, "display": display}]
    if region in ZONE_SNOMED:
        code, name = ZONE_SNOMED[region]
        codings.append({"system": SNOMED, "code": code, "display": name})
    return {"coding": codings, "text": display}


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": unit, "system": UCUM, "code": code}


def bundle(
    *,
    client_pseudonym: str,
    devices: Sequence[DeviceFacts],
    programs: Sequence[ProgramFacts],
    sessions: Sequence[SessionFacts],
    generated_at: datetime | None = None,
) -> dict[str, Any]:
    """The Bundle as JSON-ready data, validated (raises :class:`FhirExportError`)."""
    patient_url = _id("patient", client_pseudonym)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_url,
            "resource": {
                "resourceType": "Patient",
                "meta": {"security": [PSEUDONYMIZED]},
                "identifier": [{"system": CLIENT_IDS, "value": client_pseudonym}],
                "active": True,
            },
        }
    ]
    device_urls = {}
    for device in devices:
        url = _id("device", client_pseudonym, device.serial)
        device_urls[device.serial] = url
        resource: dict[str, Any] = {
            "resourceType": "Device",
            "identifier": [{"system": DEVICE_SERIALS, "value": device.serial}],
            "status": "active",
            "serialNumber": device.serial,
            "patient": {"reference": patient_url},
        }
        if device.model:
            resource["modelNumber"] = device.model
        if device.name:
            resource["deviceName"] = [{"name": device.name, "type": "user-friendly-name"}]
        if device.kind:
            kind = {"massager": "facial massager", "led_mask": "LED face mask"}.get(
                device.kind, device.kind
            )
            resource["type"] = _code(f"device-{device.kind}", kind)
        if device.firmware:
            resource["version"] = [
                {"type": _code("firmware-version", "firmware version"), "value": device.firmware}
            ]
        entries.append({"fullUrl": url, "resource": resource})
    program_urls = {}
    for program in programs:
        url = _id("program", client_pseudonym, program.key)
        program_urls[program.key] = url
        request: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": PROGRAM_IDS, "value": f"{client_pseudonym}/{program.key}"}],
            "status": "active",
            "intent": "order",
            "code": {"text": program.routine or f"program {program.key}"},
            "subject": {"reference": patient_url},
        }
        if program.therapist_id:
            request["requester"] = {"display": f"therapist {program.therapist_id}"}
        if program.max_sessions and program.per_days:
            request["occurrenceTiming"] = {
                "repeat": {
                    "frequencyMax": program.max_sessions,
                    "frequency": 1,
                    "period": program.per_days,
                    "periodUnit": "d",
                }
            }
        if program.program_version:
            request["note"] = [{"text": f"program version {program.program_version}"}]
        entries.append({"fullUrl": url, "resource": request})
    for session in sessions:
        entries.extend(
            _session_entries(session, client_pseudonym, patient_url, device_urls, program_urls)
        )
    data: dict[str, Any] = {
        "resourceType": "Bundle",
        "identifier": {
            "system": "urn:ietf:rfc:3986",
            "value": _id("bundle", client_pseudonym, *(s.key for s in sessions)),
        },
        "type": "collection",
        "timestamp": _time(generated_at or datetime.now(UTC)),
        "entry": entries,
    }
    validate(data)
    return data


def _session_entries(
    session: SessionFacts,
    client: str,
    patient_url: str,
    device_urls: Mapping[str, str],
    program_urls: Mapping[str, str],
) -> list[dict[str, Any]]:
    procedure_url = _id("session", client, session.key)
    period = {
        k: v
        for k, v in (("start", _time(session.started_at)), ("end", _time(session.ended_at)))
        if v
    }
    kind_code = "led-therapy-session" if any(z.zone == "face" for z in session.zones) else None
    procedure: dict[str, Any] = {
        "resourceType": "Procedure",
        "identifier": [{"system": SESSION_IDS, "value": f"{client}/{session.key}"}],
        "status": STATUS.get(session.status, "unknown"),
        "code": {
            **_code(kind_code or "facial-care-session", "facial-care session"),
            "text": session.routine or "facial-care session",
        },
        "subject": {"reference": patient_url},
    }
    if session.status in ("stopped", "interrupted"):
        procedure["statusReason"] = {"text": session.status}
    if period:
        procedure["performedPeriod"] = period
    sites = [body_site(z.zone) for z in session.zones if z.contact_s > 0]
    if sites:
        procedure["bodySite"] = sites
    if session.program_key and session.program_key in program_urls:
        procedure["basedOn"] = [{"reference": program_urls[session.program_key]}]
    device_url = device_urls.get(session.device_serial or "")
    if device_url:
        procedure["focalDevice"] = [
            {"action": _code("used", "used"), "manipulated": {"reference": device_url}}
        ]
    if session.completion is not None:
        procedure["outcome"] = {"text": f"{session.completion * 100:.0f} % of the routine done"}
    entries: list[dict[str, Any]] = [{"fullUrl": procedure_url, "resource": procedure}]

    def observation(
        name: str, code: str, display: str, value: dict[str, Any], **extra: Any
    ) -> None:
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "category": [OBSERVATION_CATEGORY],
            "code": _code(code, display),
            "subject": {"reference": patient_url},
            "partOf": [{"reference": procedure_url}],
            "valueQuantity": value,
            **extra,
        }
        if period:
            resource["effectivePeriod"] = period
        if device_url:
            resource["device"] = {"reference": device_url}
        entries.append(
            {"fullUrl": _id("observation", client, session.key, name), "resource": resource}
        )

    for zone in session.zones:
        if zone.zone == "face":
            continue
        site = {"bodySite": body_site(zone.zone)}
        observation(
            f"contact/{zone.zone}",
            "contact-time",
            "contact time",
            _quantity(zone.contact_s, "s", "s"),
            **site,
        )
        if zone.pressure_mean_kpa is not None:
            observation(
                f"pressure-mean/{zone.zone}",
                "pressure-mean",
                "mean contact pressure",
                _quantity(zone.pressure_mean_kpa, "kPa", "kPa"),
                **site,
            )
        if zone.pressure_max_kpa is not None:
            observation(
                f"pressure-max/{zone.zone}",
                "pressure-max",
                "maximum contact pressure",
                _quantity(zone.pressure_max_kpa, "kPa", "kPa"),
                **site,
            )
    if session.time_in_band_s is not None:
        observation(
            "time-in-band",
            "time-in-band",
            "time with the pressure in the prescribed band",
            _quantity(session.time_in_band_s, "s", "s"),
        )
    for channel, dose in sorted(session.dose_j_cm2.items()):
        name = WAVELENGTHS.get(channel, channel)
        observation(
            f"dose/{channel}",
            f"led-dose-{channel.replace('_', '-')}",
            f"LED dose, {name}",
            _quantity(dose, "J/cm2", "J/cm2"),
            bodySite=body_site("face"),
        )
    if session.max_skin_temperature_c is not None:
        observation(
            "skin-temperature-max",
            "skin-temperature-max",
            "maximum skin temperature",
            _quantity(session.max_skin_temperature_c, "Cel", "Cel"),
        )
    return entries


def validate(data: Mapping[str, Any]) -> None:
    """Validate a Bundle (and every resource in it) with the fhir.resources models."""
    try:
        from fhir.resources.R4B.bundle import Bundle
    except ImportError as exc:
        from devicebridge.clinic.errors import ClinicExtraMissingError

        raise ClinicExtraMissingError("fhir.resources") from exc
    from pydantic import ValidationError

    try:
        Bundle.model_validate(data)
    except ValidationError as exc:
        raise FhirExportError(f"the FHIR Bundle does not validate: {exc}") from exc


def session_facts_from_summary(
    *,
    key: str,
    status: str,
    routine: str | None,
    started_at: datetime | None,
    ended_at: datetime | None,
    device_serial: str | None,
    program_key: str | None,
    summary: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
) -> SessionFacts:
    """A session from a bridge summary (docs/mqtt.md) and its digest rows."""
    rows = list(rows)
    dose = summary.get("dose_j_cm2")
    temperatures = [
        float(r["skin_temperature_max_c"])
        for r in rows
        if r.get("skin_temperature_max_c") is not None
    ]
    max_temperature = summary.get("max_temperature_c")
    if max_temperature is None and temperatures:
        max_temperature = max(temperatures)
    in_band = summary.get("time_in_band_s")
    completion = summary.get("completion")
    return SessionFacts(
        key=key,
        status=status,
        routine=routine,
        started_at=started_at,
        ended_at=ended_at,
        device_serial=device_serial,
        program_key=program_key,
        zones=zone_facts(rows),
        time_in_band_s=float(in_band) if isinstance(in_band, int | float) else None,
        dose_j_cm2={str(k): float(v) for k, v in dose.items() if isinstance(v, int | float)}
        if isinstance(dose, Mapping)
        else {},
        max_skin_temperature_c=float(max_temperature)
        if isinstance(max_temperature, int | float)
        else None,
        completion=float(completion) if isinstance(completion, int | float) else None,
    )


def report_bundle(
    report: SessionReport,
    *,
    client_pseudonym: str,
    device: DeviceFacts | None = None,
    generated_at: datetime | None = None,
) -> dict[str, Any]:
    """The Bundle of one session stored on this bridge (``devicebridge report N --fhir``)."""
    from devicebridge.clinic.records import digest_samples

    record = report.record
    rows = (
        digest_samples(
            report.samples,
            int(report.sequences[0]),
            0,
            float(record.sample_rate_hz),
        )
        if report.sequences.size and record.sample_rate_hz > 0
        else []
    )
    program_key = str(record.program_id) if record.program_id else None
    programs = []
    if program_key is not None:
        schedule = report.routine.schedule if report.routine else None
        programs.append(
            ProgramFacts(
                key=program_key,
                routine=record.routine_name,
                max_sessions=schedule.max_sessions if schedule else None,
                per_days=schedule.per_days if schedule else None,
            )
        )
    facts = session_facts_from_summary(
        key=str(record.id),
        status=record.status,
        routine=record.routine_name,
        started_at=record.started_at,
        ended_at=record.ended_at,
        device_serial=record.device_serial,
        program_key=program_key,
        summary=report.summary,
        rows=rows,
    )
    device = device or DeviceFacts(record.device_serial, record.device_kind)
    return bundle(
        client_pseudonym=client_pseudonym,
        devices=[device],
        programs=programs,
        sessions=[facts],
        generated_at=generated_at,
    )
