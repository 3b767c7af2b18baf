"""Telemetry, session summaries, outages and clean stops through the whole service."""

from __future__ import annotations

import json
from pathlib import Path

import aiomqtt

from devicebridge.core.policy import default_policy
from devicebridge.core.routine import parse_routine
from devicebridge.integrations.homeassistant import HOME_ASSISTANT_STATUS_TOPIC
from devicebridge.integrations.mqtt import Topics
from devicebridge.service.status import read_status_file
from devicebridge.service.telemetry import decode_telemetry_message
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
from simulators.devices.massager import SimulatedMassager
from tests.broker import Mosquitto
from tests.service.conftest import (
    BRIDGE,
    Subscriber,
    routine_text,
    running,
    service_rig,
)

TOPICS = Topics(BRIDGE)


def contiguous(batches: list[dict[str, object]]) -> bool:
    expected = batches[0]["first_sequence"]
    for body in batches:
        if body["first_sequence"] != expected or body["gaps"]:
            return False
        expected = int(body["first_sequence"]) + int(body["count"])  # type: ignore[call-overload]
    return True


async def test_a_broker_outage_during_streaming_loses_nothing_and_keeps_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    subscriber = Subscriber(
        mosquitto.port, TOPICS.telemetry("+"), TOPICS.session_summaries, TOPICS.availability
    )
    routine = parse_routine(routine_text().decode(), default_policy())
    async with running(subscriber.run()), service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.wait(subscriber.subscribed.is_set)
        await rig.start()
        service, link = rig.service, rig.service.link
        assert link is not None
        worker = next(iter(service.workers.values()))
        await service.start_routine(worker.serial, routine)
        await rig.wait(lambda: len(subscriber.on("/telemetry")) >= 3 and worker.runner is not None)

        # Hold virtual time while the subscriber catches up: a message the broker has
        # acknowledged but not yet forwarded would die with this non-persistent broker
        # (a broker-side loss, not the bridge's), so the outage starts between messages.
        await rig.clock.stop()
        await rig.wait(lambda: len(subscriber.on("/telemetry")) == service.telemetry_messages)
        mosquitto.stop()
        rig.clock.start()
        await rig.wait(lambda: not link.connected)
        published_before = service.telemetry_messages
        # Produced while the broker is away: telemetry, and the end of the session.
        await rig.wait(lambda: service.telemetry_messages >= published_before + 5)
        session_id = worker.runner.session_id if worker.runner else None
        assert session_id is not None
        assert worker.runner is not None
        worker.runner.request_stop("ended by the test during the outage")
        await rig.wait(lambda: service.telemetry_messages >= published_before + 8)
        produced = service.telemetry_messages
        assert service.outbox is not None
        assert len(service.outbox) + service.outbox.staged >= 9  # stored, or about to be

        await rig.wait(lambda: not subscriber.subscribed.is_set())
        # Again hold time (so the link's backoff holds too) until the subscriber is back:
        # what the bridge publishes before that would reach nobody.
        await rig.clock.stop()
        mosquitto.start()
        await rig.wait(subscriber.subscribed.is_set)
        rig.clock.start()
        await rig.wait(lambda: len(subscriber.on("/telemetry")) >= produced)
        await rig.wait(lambda: bool(subscriber.on("/sessions/summary")))
        await rig.stop()

    telemetry = subscriber.on("/telemetry")
    assert contiguous(telemetry), [(b["first_sequence"], b["count"]) for b in telemetry]
    assert all(b["count"] == 100 for b in telemetry[:-1])  # one second at 100 Hz
    samples = decode_telemetry_message(telemetry[0])
    assert len(samples) == 100
    assert "pressure_dapa" in samples.dtype.names
    ids = [int(str(b["message_id"]).split(":")[1]) for _, b in subscriber.messages]
    assert ids == sorted(ids)  # everything arrived in the order it was produced
    (summary,) = subscriber.on("/sessions/summary")
    assert (summary["session_id"], summary["status"]) == (session_id, "stopped")
    assert summary["summary"]["samples"] > 0
    assert subscriber.duplicates == 0

    # The session record holds every sample the summary counted.
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        sequences, _ = store.telemetry(session_id)
        assert len(sequences) == summary["summary"]["samples"]
        assert store.session(session_id).status == "stopped"


async def test_a_clean_stop_stops_devices_finishes_sessions_and_goes_offline(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    subscriber = Subscriber(mosquitto.port, TOPICS.availability, TOPICS.session_summaries)
    routine = parse_routine(routine_text().decode(), default_policy())
    async with running(subscriber.run()), service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.wait(subscriber.subscribed.is_set)
        await rig.start()
        worker = next(iter(rig.service.workers.values()))
        await rig.service.start_routine(worker.serial, routine)
        massager = rig.devices[0]
        assert isinstance(massager, SimulatedMassager)
        await rig.wait(lambda: worker.runner is not None and worker.runner.samples_recorded > 200)
        await rig.wait(lambda: massager.intensity > 0)
        session_id = worker.runner.session_id if worker.runner else 0
        status = read_status_file(tmp_path)
        assert status is not None
        assert status["alive"]
        assert status["devices"][0]["state"] == "ready"

        await rig.stop()
        assert massager.intensity == 0  # STOP_ALL reached the device
        await rig.wait(lambda: bool(subscriber.on("/sessions/summary")))
        await rig.wait(lambda: (subscriber.raw[-1][1] if subscriber.raw else b"") == b"offline")

    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        record = store.session(session_id)
        assert (record.status, record.end_reason) == ("stopped", "bridge stopped")
        assert len(store.telemetry(session_id)[0]) == record.summary["samples"] > 200
    status = read_status_file(tmp_path)
    assert status is not None
    assert status["state"] == "stopped"
    assert not status["alive"]


async def test_contact_and_zone_events_ride_in_telemetry_and_the_others_go_at_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    routine = parse_routine(routine_text().decode(), default_policy())
    subscriber = Subscriber(mosquitto.port, TOPICS.telemetry("+"), TOPICS.events("+"))
    async with (
        running(subscriber.run()),
        service_rig(tmp_path, broker_port=mosquitto.port, guide_hands=True) as rig,
    ):
        await rig.wait(subscriber.subscribed.is_set)
        await rig.start()
        worker = next(iter(rig.service.workers.values()))
        await rig.service.start_routine(worker.serial, routine)

        def carried() -> list[dict[str, object]]:
            return [e for body in subscriber.on("/telemetry") for e in body["events"]]

        # The guided hand touches the skin and moves from zone to zone.
        await rig.wait(
            lambda: {"contact_changed", "zone_changed"} <= {e["code"] for e in carried()}
        )
        massager = rig.devices[0]
        assert isinstance(massager, SimulatedMassager)
        massager.press_mode()
        await rig.wait(
            lambda: any(body.get("code") == "button" for body in subscriber.on("/events"))
        )
        await rig.stop()
    on_events_topic = {
        body["code"] for body in subscriber.on("/events") if body["type"] == "device_event"
    }
    assert "button" in on_events_topic
    assert not on_events_topic & {"contact_changed", "zone_changed"}
    sequences = [e["event_sequence"] for e in carried()]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == len(sequences)


async def test_a_battery_change_is_published_in_the_device_state(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        massager = rig.devices[0]
        subscriber = Subscriber(mosquitto.port, TOPICS.device_state(massager.serial_number))
        async with running(subscriber.run()):
            await rig.wait(subscriber.subscribed.is_set)
            await rig.start()
            await rig.wait(lambda: any(b["state"] == "ready" for b in subscriber.on("/state")))
            before = subscriber.on("/state")[-1]["battery_percent"]
            level = before - 7
            massager.drop_battery_charge(level)
            # Published with the telemetry message whose samples carry the new level.
            await rig.wait(
                lambda: any(b["battery_percent"] == level for b in subscriber.on("/state"))
            )
            state = subscriber.on("/state")[-1]
            assert (state["state"], state["battery_percent"]) == ("ready", level)
        await rig.stop()


async def test_without_a_broker_the_service_records_locally(tmp_path: Path) -> None:
    routine = parse_routine(routine_text().decode(), default_policy())
    async with service_rig(tmp_path) as rig:
        await rig.start()
        worker = next(iter(rig.service.workers.values()))
        await rig.service.start_routine(worker.serial, routine)
        await rig.wait(lambda: worker.runner is not None and worker.runner.samples_recorded >= 300)
        session_id = worker.runner.session_id if worker.runner else 0
        await rig.stop()
    assert not (tmp_path / "outbox.sqlite3").exists()
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        assert store.session(session_id).status == "stopped"
        assert len(store.decisions(session_id)) >= 1


async def test_home_assistant_discovery_is_retained_and_republished(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    subscriber = Subscriber(mosquitto.port, "homeassistant/sensor/#")
    async with (
        running(subscriber.run()),
        service_rig(tmp_path, broker_port=mosquitto.port, home_assistant=True) as rig,
    ):
        await rig.wait(subscriber.subscribed.is_set)
        await rig.start()
        await rig.wait(lambda: len(subscriber.raw) >= 2)
        topics = sorted(t for t, _, _ in subscriber.raw)
        serial = rig.devices[0].serial_number
        assert topics == [
            f"homeassistant/sensor/{BRIDGE}/{serial}_battery/config",
            f"homeassistant/sensor/{BRIDGE}/{serial}_connection/config",
        ]
        battery = json.loads(next(p for t, p, _ in subscriber.raw if "battery" in t))
        assert battery["availability_topic"] == TOPICS.availability
        assert battery["state_topic"] == TOPICS.device_state(serial)
        assert battery["device_class"] == "battery"

        # Home Assistant restarted: it says so, and the bridge publishes the configs again.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as home_assistant:
            await home_assistant.publish(HOME_ASSISTANT_STATUS_TOPIC, b"online", qos=1)
        await rig.wait(lambda: len(subscriber.raw) >= 4)
        await rig.stop()
