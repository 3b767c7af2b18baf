"""``devicebridge clinic serve``: the web app, the ingester and uvicorn in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette

from devicebridge.clinic.app import ConsoleConfig, create_app
from devicebridge.clinic.auth import Accounts
from devicebridge.clinic.db import database_url, migrate, open_engine
from devicebridge.clinic.ingest import Ingester, IngestSettings, IngestStore
from devicebridge.core.policy import SafetyPolicy
from devicebridge.integrations.mqtt import MqttSettings

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    database: str
    mqtt: MqttSettings
    policy: SafetyPolicy
    host: str = "127.0.0.1"
    port: int = 8765
    console_id: str = "console"
    secure_cookies: bool = True
    forwarded_allow_ips: str | None = None  # behind a TLS reverse proxy: its address(es)


def build(options: ServeOptions) -> tuple[Starlette, Ingester, str | None]:
    """The app (with the ingester in its lifespan), the ingester, and a setup token if the
    console has no account yet."""
    engine = open_engine(options.database)
    migrate(engine)
    store = IngestStore(engine, topic_root=options.mqtt.topic_root, policy=options.policy)
    ingester = Ingester(store, IngestSettings(options.mqtt, options.console_id))
    setup_token = secrets.token_urlsafe(24) if Accounts(engine).count() == 0 else None

    def ingest_status() -> dict[str, Any]:
        return {
            "connected": ingester.connected.is_set(),
            "error": ingester.last_error,
            "messages": store.stats.messages,
            "skipped": store.stats.skipped,
        }

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(ingester.run(), name="clinic ingest")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            engine.dispose()

    config = ConsoleConfig(
        engine=engine,
        policy=options.policy,
        secure_cookies=options.secure_cookies,
        setup_token=setup_token,
        notify_push=ingester.push_queued,
        ingest_status=ingest_status,
    )
    return create_app(config, lifespan=lifespan), ingester, setup_token


async def serve(options: ServeOptions, *, announce: Callable[[str], None] = print) -> None:
    """Run until cancelled or interrupted (uvicorn handles SIGINT/SIGTERM)."""
    app, _ingester, setup_token = build(options)
    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        proxy_headers=options.forwarded_allow_ips is not None,
        forwarded_allow_ips=options.forwarded_allow_ips,
        server_header=False,
    )
    server = uvicorn.Server(config)
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"http://{host}:{port}/"
    announce(f"clinic console on {address}")
    announce(
        f"ingesting from MQTT {options.mqtt.host}:{options.mqtt.port}, database "
        + database_url(options.database).render_as_string(hide_password=True)
    )
    if setup_token is not None:
        announce(f"no account yet: create the first one at {address}setup?token={setup_token}")
    await server.serve(sockets=[sock])
