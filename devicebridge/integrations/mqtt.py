"""The MQTT link: aiomqtt (``>=2.5,<3``) behind one small module.

aiomqtt 3 is an alpha with a different API, so nothing else in devicebridge imports it.
The link connects (MQTT 5, falling back to 3.1.1 when the broker refuses it), announces
availability with a retained ``online`` and a last will ``offline``, drains the outbox in
order at QoS 1 (a message leaves the outbox only after the broker's PUBACK), subscribes to
the bridge's command topics, and reconnects with exponential backoff and jitter on the
injected clock. The topic contract is ``docs/mqtt.md``.

The broker settings are :class:`devicebridge.config.MqttSettings` (the ``[mqtt]`` table),
re-exported here. A received message is handed to the ``on_message`` handler; a handler
that raises loses that one message (logged, with its traceback, throttled), never the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, cast

import aiomqtt
from paho.mqtt import client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicebridge.clock import Clock
from devicebridge.config import TOPIC_ROOT as TOPIC_ROOT  # re-exported
from devicebridge.config import MqttSettings as MqttSettings  # re-exported
from devicebridge.core.backoff import Backoff, BackoffPolicy
from devicebridge.errors import MqttUnavailableError
from devicebridge.logthrottle import ThrottledLog
from devicebridge.storage.outbox import Outbox, OutgoingMessage

LOG = logging.getLogger(__name__)
AVAILABILITY_ONLINE: Final = b"online"
AVAILABILITY_OFFLINE: Final = b"offline"
OUTBOX_IN_FLIGHT: Final = 200
CONNACK_UNSUPPORTED_PROTOCOL: Final = (1, 132)  # 3.1.1 and 5 codes for "unsupported version"

MessageHandler = Callable[[str, bytes], Awaitable[None]]


class Topics:
    """Every topic of one bridge (see docs/mqtt.md)."""

    def __init__(self, bridge_id: str, root: str = TOPIC_ROOT) -> None:
        if not bridge_id or any(c in bridge_id for c in "/+#"):
            raise ValueError(f"bridge id {bridge_id!r} must be non-empty without '/', '+' or '#'")
        self.bridge_id = bridge_id
        self.base = f"{root}/{bridge_id}"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def device_state(self, serial: str) -> str:
        return f"{self.base}/devices/{serial}/state"

    def telemetry(self, serial: str) -> str:
        return f"{self.base}/devices/{serial}/telemetry"

    def events(self, serial: str) -> str:
        return f"{self.base}/devices/{serial}/events"

    @property
    def session_summaries(self) -> str:
        return f"{self.base}/sessions/summary"

    @property
    def program_push(self) -> str:
        return f"{self.base}/programs/push"

    @property
    def program_ack(self) -> str:
        return f"{self.base}/programs/ack"

    @property
    def programs_installed(self) -> str:
        return f"{self.base}/programs/installed"


def make_client(
    settings: MqttSettings,
    *,
    protocol: aiomqtt.ProtocolVersion,
    will: aiomqtt.Will | None = None,
    identifier: str | None = None,
    persistent: bool = False,
) -> aiomqtt.Client:
    """A client for ``settings``; ``persistent`` resumes the broker's session of ``identifier``.

    A persistent session (MQTT 5: clean start off and a session expiry interval; 3.1.1:
    clean session off) makes the broker keep the client's subscriptions and queue the
    QoS 1 messages sent to them while it is offline, for ``settings.session_expiry_s``.
    """
    identifier = identifier or settings.client_id
    persistent = persistent and settings.session_expiry_s > 0 and bool(identifier)
    clean_start: paho_client.CleanStartOption = paho_client.MQTT_CLEAN_START_FIRST_ONLY
    clean_session: bool | None = None
    properties: Properties | None = None
    if persistent and protocol is aiomqtt.ProtocolVersion.V5:
        clean_start = False
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry_s
    elif persistent:
        clean_session = False
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier,
        protocol=protocol,
        will=will,
        keepalive=settings.keepalive_s,
        tls_context=settings.tls_context(),
        clean_start=clean_start,
        clean_session=clean_session,
        properties=properties,
    )


# MQTT 5 property identifier of a user property (a UTF-8 string pair), section 3.3.2.3.7.
USER_PROPERTY_ID: Final = 0x26


def _utf8_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def _variable_byte_integer(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _MessageIdProperties(Properties):
    """PUBLISH properties holding one user property, ``message-id``, packed once.

    paho's generic ``Properties`` scans every property name with string operations on
    each assignment and again when packing: more CPU than the rest of a publish. These
    bytes are what paho would send for the same property.
    """

    _packed: bytes
    _message_id: str

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:  # paho's debug log of a PUBLISH
        return f"[UserProperty : [('message-id', {self._message_id!r})]]"


@functools.cache
def _properties_template() -> _MessageIdProperties:
    return _MessageIdProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def message_properties(message_id: str, protocol: aiomqtt.ProtocolVersion) -> Properties | None:
    if protocol is not aiomqtt.ProtocolVersion.V5:
        return None
    # A shallow copy of an empty template: Properties() builds its name and type tables
    # on every construction. object.__setattr__ passes by paho's name checks.
    properties = copy.copy(_properties_template())
    body = bytes([USER_PROPERTY_ID]) + _utf8_string("message-id") + _utf8_string(message_id)
    object.__setattr__(properties, "_packed", _variable_byte_integer(len(body)) + body)
    object.__setattr__(properties, "_message_id", message_id)
    return properties


class MqttLink:
    """Keeps the bridge's connection to the broker and drains the outbox through it."""

    def __init__(
        self,
        settings: MqttSettings,
        topics: Topics,
        outbox: Outbox,
        *,
        clock: Clock,
        subscriptions: Sequence[str] = (),
        on_message: MessageHandler | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.outbox = outbox
        self.clock = clock
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self._backoff = Backoff(
            BackoffPolicy(initial_s=settings.reconnect_initial_s, max_s=settings.reconnect_max_s),
            rng or random.Random(),
        )
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self.protocol = aiomqtt.ProtocolVersion.V5
        self.connections = 0
        self.published = 0
        self.in_flight = 0  # publishes handed to the client, not yet acknowledged
        self.peak_in_flight = 0
        self.handler_failures = 0
        self._failure_log = ThrottledLog(LOG)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    def notify(self) -> None:
        """New messages are in the outbox."""
        self._wake.set()

    async def run(self) -> None:
        """Connect, publish, receive; reconnect forever until cancelled."""
        will = aiomqtt.Will(self.topics.availability, AVAILABILITY_OFFLINE, qos=1, retain=True)
        while True:
            try:
                client = make_client(
                    self.settings,
                    protocol=self.protocol,
                    will=will,
                    identifier=self.settings.client_id or f"devicebridge-{self.topics.bridge_id}",
                    persistent=True,
                )
                async with client:
                    await self._session(client)
            except aiomqtt.MqttCodeError as exc:
                if (
                    exc.rc in CONNACK_UNSUPPORTED_PROTOCOL
                    and self.protocol is aiomqtt.ProtocolVersion.V5
                ):
                    LOG.info("broker refuses MQTT 5; falling back to 3.1.1")
                    self.protocol = aiomqtt.ProtocolVersion.V311
                    continue
                await self._lost(exc)
            except aiomqtt.MqttError as exc:
                await self._lost(exc)

    def _mark_disconnected(self) -> None:
        self._connected.clear()
        self._disconnected.set()

    async def _lost(self, exc: Exception) -> None:
        self._mark_disconnected()
        delay_s = self._backoff.next_delay_s()
        LOG.warning(
            "MQTT broker %s:%d unreachable (%s); retrying in %.2f s",
            self.settings.host,
            self.settings.port,
            exc,
            delay_s,
        )
        await self.clock.sleep(delay_s)

    async def _session(self, client: aiomqtt.Client) -> None:
        self.connections += 1
        await client.publish(self.topics.availability, AVAILABILITY_ONLINE, qos=1, retain=True)
        for topic in self.subscriptions:
            await client.subscribe(topic, qos=1)
        self._backoff.reset()
        self._disconnected.clear()
        self._connected.set()
        LOG.info("MQTT connected to %s:%d", self.settings.host, self.settings.port)
        pump = asyncio.create_task(self._pump(client), name="mqtt-outbox")
        receive = asyncio.create_task(self._receive(client), name="mqtt-receive")
        try:
            done, _ = await asyncio.wait({pump, receive}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise what ended it (usually the link going down)
            raise aiomqtt.MqttError("the MQTT session ended")
        except asyncio.CancelledError:
            # A clean shutdown: say so now instead of leaving it to the last will.
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(
                    self.topics.availability, AVAILABILITY_OFFLINE, qos=1, retain=True, timeout=2
                )
            self._mark_disconnected()
            raise
        finally:
            for task in (pump, receive):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if self.on_message is None:
                continue
            topic, data = str(message.topic), _payload_bytes(message.payload)
            try:
                await self.on_message(topic, data)
            except Exception:
                # Whatever arrives must never end the link: a handler that fails (a bug,
                # by the handlers' own contract) costs this one message.
                self.handler_failures += 1
                self._failure_log.log(
                    logging.ERROR,
                    "message handler failure",
                    "the message handler failed on a message of %d bytes on %r; dropped",
                    len(data),
                    topic,
                    exc_info=True,
                )

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Keep up to :data:`OUTBOX_IN_FLIGHT` publishes in flight, in outbox order.

        A message is handed to paho as soon as it is stored and there is room (paho sends
        in order and keeps its own in-flight window on the wire); each PUBACK wakes the
        pump, which retires the longest acknowledged start of what is in flight at once
        (MQTT keeps order; the outbox removes them from SQLite with its next commit). A crash
        or a lost link before that removal only re-sends messages with the same ids, on the
        next session, from the outbox. A lost link ends the session through the receiving
        task (aiomqtt fails its message iterator); what is in flight then stays in the
        outbox.

        The publishes go to paho directly, each acknowledgement registered where aiomqtt's
        own PUBACK callback resolves it (:class:`_Acknowledgement`): ``aiomqtt.Client.
        publish`` would cost a task, an event, a context manager and a scan of every
        pending call per message, more than the rest of the publish.
        """
        paho = client._client  # aiomqtt's own paho client, see above
        pending = cast("dict[int, _Acknowledgement]", client._pending_publishes)
        in_flight: deque[tuple[OutgoingMessage, _Acknowledgement]] = deque()
        last_sent = 0  # the sequence of the last message handed to paho
        wake = self._wake

        try:
            while True:
                retired: OutgoingMessage | None = None
                while in_flight and in_flight[0][1].done:
                    retired = in_flight.popleft()[0]
                    self.published += 1
                if retired is not None:
                    self.outbox.delivered(retired.sequence)
                room = OUTBOX_IN_FLIGHT - len(in_flight)
                # The outbox counts its messages in memory: nothing new costs no query.
                batch = (
                    self.outbox.pending_after(last_sent, room)
                    if room and len(self.outbox) > len(in_flight)
                    else []
                )
                for message in batch:
                    acknowledgement = _Acknowledgement(wake)
                    info = paho.publish(
                        message.topic,
                        message.payload,
                        message.qos,
                        message.retain,
                        message_properties(message.message_id, self.protocol),
                    )
                    if info.rc != paho_client.MQTT_ERR_SUCCESS:
                        # Usually the link going down: the session ends, the rest is re-sent.
                        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
                    if info.is_published():
                        acknowledgement.done = True  # QoS 0, already written to the socket
                    else:
                        pending[info.mid] = acknowledgement
                    in_flight.append((message, acknowledgement))
                    last_sent = message.sequence
                self.in_flight = len(in_flight)
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                if batch or retired is not None:
                    continue
                # Nothing can be stored or acknowledged between the checks above and
                # clear() (no await in between), so no notify() or PUBACK is missed.
                wake.clear()
                await wake.wait()
        finally:
            self.in_flight = 0
            for mid, acknowledgement in list(pending.items()):
                if isinstance(acknowledgement, _Acknowledgement):
                    del pending[mid]  # re-sent on the next session


class _Acknowledgement:
    """One publish waiting for its PUBACK: aiomqtt's ``on_publish`` calls :meth:`set`."""

    __slots__ = ("_wake", "done")

    def __init__(self, wake: asyncio.Event) -> None:
        self._wake = wake
        self.done = False

    def set(self) -> None:
        self.done = True
        self._wake.set()


# --------------------------------------------------------------------------- one-shot clients


async def request_reply(
    settings: MqttSettings,
    *,
    topic: str,
    payload: bytes,
    reply_topic: str,
    is_reply: Callable[[bytes], bool],
    timeout_s: float,
) -> bytes | None:
    """Publish once (QoS 1) and wait for the first matching message on ``reply_topic``.

    Subscribes before publishing so that a fast answer is not missed. Returns ``None``
    when nothing matched within ``timeout_s`` (wall time); raises :class:`MqttUnavailableError`
    when the broker cannot be reached.
    """
    try:
        async with make_client(settings, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(reply_topic, qos=1)
            await client.publish(topic, payload, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        data = _payload_bytes(message.payload)
                        if is_reply(data):
                            return data
    except aiomqtt.MqttError as exc:
        raise MqttUnavailableError(settings.host, settings.port, str(exc)) from exc
    return None


async def read_retained(
    settings: MqttSettings, topics: Sequence[str], *, wait_for: str, timeout_s: float
) -> dict[str, bytes]:
    """The retained messages of ``topics`` (until ``wait_for`` arrived or ``timeout_s``)."""
    found: dict[str, bytes] = {}
    try:
        async with make_client(settings, protocol=aiomqtt.ProtocolVersion.V5) as client:
            for topic in topics:
                await client.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        found[str(message.topic)] = _payload_bytes(message.payload)
                        if wait_for in found and all(t in found or "#" in t for t in topics):
                            break
    except aiomqtt.MqttError as exc:
        raise MqttUnavailableError(settings.host, settings.port, str(exc)) from exc
    return found


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()
