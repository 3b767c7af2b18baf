"""The console's web app (Starlette): pages, htmx fragments, a JSON API and exports.

Server-rendered Jinja2 pages (autoescaped: nothing a bridge sends is interpreted);
htmx polls small fragments for the live parts (availability, acknowledgements, new
sessions) and uPlot draws the plots from JSON embedded in those fragments. Every
request is authenticated by the login cookie; every unsafe request (POST) must carry
the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``) and
must not come from another site (``Origin`` / ``Sec-Fetch-Site``). Responses carry a
strict Content-Security-Policy: scripts and styles only from the console itself.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from time import monotonic
from typing import Any, Final

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devicebridge import __version__
from devicebridge.clinic.auth import Accounts, LoginSession, same_token
from devicebridge.clinic.authoring import (
    DEFAULT_VALID_DAYS,
    queue_pushes,
    validate,
)
from devicebridge.clinic.errors import AccountError, ClinicError, NotFoundError
from devicebridge.clinic.queries import ALERT_KINDS, Queries
from devicebridge.core.policy import SafetyPolicy, policy_zone
from devicebridge.core.routine import MassageStep

LOG = logging.getLogger(__name__)
SESSION_COOKIE: Final = "__Host-devicebridge-session"
LOGIN_COOKIE: Final = "__Host-devicebridge-login"
INSECURE_SESSION_COOKIE: Final = "devicebridge-session"
INSECURE_LOGIN_COOKIE: Final = "devicebridge-login"
CSRF_HEADER: Final = "x-csrf-token"
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Failed logins of one user name from one address: after this many in the window, that
# pair is refused (without a password check) until the window has passed.
MAX_LOGIN_FAILURES: Final = 5
LOGIN_FAILURE_WINDOW_S: Final = 15 * 60
MAX_FORM_BYTES: Final = 256 * 1024


@dataclass
class ConsoleConfig:
    engine: Engine
    policy: SafetyPolicy
    # Secure cookies (with the __Host- prefix) unless explicitly turned off for plain HTTP
    # on a non-loopback address during development; browsers accept Secure cookies from
    # http://127.0.0.1 and http://localhost.
    secure_cookies: bool = True
    setup_token: str | None = None  # creates the first admin once, then forgotten
    notify_push: Callable[[], None] = field(default=lambda: None)
    ingest_status: Callable[[], Mapping[str, Any]] = field(default=dict)


class Console:
    """The app's state: the stores and the configuration."""

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.accounts = Accounts(config.engine)
        self.queries = Queries(config.engine)
        self._login_failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self.templates = Environment(
            loader=PackageLoader("devicebridge.clinic", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = _when
        self.templates.filters["percent"] = _percent
        self.templates.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))
        self.templates.globals["version"] = __version__
        self.templates.globals["alert_kinds"] = ALERT_KINDS

    @property
    def session_cookie(self) -> str:
        return SESSION_COOKIE if self.config.secure_cookies else INSECURE_SESSION_COOKIE

    @property
    def login_cookie(self) -> str:
        return LOGIN_COOKIE if self.config.secure_cookies else INSECURE_LOGIN_COOKIE

    def render(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any],
        *,
        status_code: int = 200,
    ) -> HTMLResponse:
        template = self.templates.get_template(name)
        login: LoginSession | None = request.scope.get("login")
        html = template.render(
            {
                "request": request,
                "user": login.user if login else None,
                "csrf_token": login.csrf_token if login else "",
                **context,
            }
        )
        return HTMLResponse(html, status_code=status_code)

    def login_blocked(self, username: str, address: str) -> bool:
        failures = self._login_failures.get((username.lower(), address))
        if not failures:
            return False
        while failures and monotonic() - failures[0] > LOGIN_FAILURE_WINDOW_S:
            failures.popleft()
        return len(failures) >= MAX_LOGIN_FAILURES

    def login_failed(self, username: str, address: str) -> None:
        self._login_failures[(username.lower(), address)].append(monotonic())

    def login_succeeded(self, username: str, address: str) -> None:
        self._login_failures.pop((username.lower(), address), None)

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.config.secure_cookies,
            httponly=True,
            samesite="strict",
        )


def _when(value: str | datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if value is None or value == "":
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(fmt) + " UTC"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{float(value) * 100:.0f} %"


# --------------------------------------------------------------------------- security


class SecurityHeaders:
    """Adds CSP and friends to every response (a pure ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _cross_site(request: Request) -> bool:
    """A request a browser sent on behalf of another site."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    expected = f"{request.url.scheme}://{request.url.netloc}"
    return origin != expected


Handler = Callable[[Request], Awaitable[Response]]


def page(console: Console, handler: Handler, *, admin: bool = False) -> Handler:
    """Require a login (and, for POST, the CSRF token and a same-site request)."""

    async def wrapped(request: Request) -> Response:
        token = request.cookies.get(console.session_cookie, "")
        login = await run_in_threadpool(console.accounts.session, token)
        if login is None:
            if request.url.path.startswith("/api/") or request.method not in SAFE_METHODS:
                return JSONResponse({"error": "login required"}, status_code=401)
            if request.headers.get("hx-request"):
                return Response(status_code=401, headers={"HX-Redirect": "/login"})
            return RedirectResponse("/login", status_code=303)
        request.scope["login"] = login
        if request.method not in SAFE_METHODS:
            if _cross_site(request):
                return PlainTextResponse("cross-site request refused", status_code=403)
            form = await _form(request)
            given = request.headers.get(CSRF_HEADER) or (
                str(form.get("csrf_token")) if form is not None and form.get("csrf_token") else None
            )
            if not same_token(login.csrf_token, given):
                return PlainTextResponse("missing or wrong CSRF token", status_code=403)
        if admin and not login.user.is_admin:
            raise HTTPException(404)
        try:
            return await handler(request)
        except NotFoundError as exc:
            raise HTTPException(404) from exc

    return wrapped


async def _form(request: Request) -> FormData | None:
    cached: FormData | None = request.scope.get("state_cache", {}).get("form")
    if cached is not None:
        return cached
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return None
    length = int(request.headers.get("content-length") or 0)
    if length > MAX_FORM_BYTES:
        raise HTTPException(413)
    form = await request.form(max_files=0, max_fields=200)
    request.scope.setdefault("state_cache", {})["form"] = form
    return form


async def form_of(request: Request) -> FormData:
    form = await _form(request)
    if form is None:
        raise HTTPException(415, "send a form")
    return form


def _int(value: Any, name: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise HTTPException(400, f"{name} must be a number") from None


def _login(request: Request) -> LoginSession:
    login: LoginSession = request.scope["login"]
    return login


# --------------------------------------------------------------------------- the app


def create_app(config: ConsoleConfig, *, lifespan: Any = None) -> Starlette:
    console = Console(config)
    c = console

    # ---------------------------------------------------------------- login

    async def login_form(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        response = c.render(request, "login.html", {"login_token": token, "error": None})
        c.set_cookie(response, c.login_cookie, token, 600)
        return response

    async def login_submit(request: Request) -> Response:
        if _cross_site(request):
            return PlainTextResponse("cross-site request refused", status_code=403)
        form = await form_of(request)
        if not same_token(
            request.cookies.get(c.login_cookie, "") or "-", str(form.get("login_token", ""))
        ):
            return PlainTextResponse("the login form expired: reload it", status_code=403)
        username, password = str(form.get("username", ""))[:64], str(form.get("password", ""))
        address = request.client.host if request.client else "-"
        if c.login_blocked(username, address):
            return PlainTextResponse(
                "too many failed logins: try again in 15 minutes", status_code=429
            )
        user = await run_in_threadpool(c.accounts.authenticate, username, password)
        if user is None:
            c.login_failed(username, address)
            token = secrets.token_urlsafe(24)
            response = c.render(
                request,
                "login.html",
                {"login_token": token, "error": "wrong user name or password"},
                status_code=401,
            )
            c.set_cookie(response, c.login_cookie, token, 600)
            return response
        c.login_succeeded(username, address)
        login = await run_in_threadpool(c.accounts.open_session, user)
        redirect = RedirectResponse("/", status_code=303)
        c.set_cookie(
            redirect, c.session_cookie, login.token, int(timedelta(hours=12).total_seconds())
        )
        redirect.delete_cookie(c.login_cookie, path="/")
        return redirect

    async def logout(request: Request) -> Response:
        await run_in_threadpool(c.accounts.close_session, _login(request).token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(c.session_cookie, path="/", secure=c.config.secure_cookies)
        return response

    async def setup(request: Request) -> Response:
        """The first admin account, with the one-time token `clinic serve` printed."""
        expected = c.config.setup_token
        token = request.query_params.get("token", "")
        if request.method == "POST":
            if _cross_site(request):
                return PlainTextResponse("cross-site request refused", status_code=403)
            token = str((await form_of(request)).get("token", ""))
        accounts = await run_in_threadpool(c.accounts.count)
        if not expected or not same_token(expected, token) or accounts:
            return PlainTextResponse("no setup pending here", status_code=404)
        if request.method == "GET":
            return c.render(request, "setup.html", {"token": token, "error": None})
        form = await form_of(request)
        try:
            await run_in_threadpool(
                lambda: c.accounts.create(
                    str(form.get("username", "")),
                    str(form.get("password", "")),
                    therapist_id=str(form.get("therapist_id", "")) or None,
                    is_admin=True,
                )
            )
        except AccountError as exc:
            return c.render(
                request, "setup.html", {"token": token, "error": str(exc)}, status_code=400
            )
        c.config.setup_token = None
        return RedirectResponse("/login", status_code=303)

    # ---------------------------------------------------------------- clients

    async def client_list_data(request: Request) -> dict[str, Any]:
        page_number = max(1, _int(request.query_params.get("page", "1"), "page"))
        search = request.query_params.get("q", "")[:64]
        rows, total = await run_in_threadpool(
            lambda: c.queries.client_list(_login(request).user, page=page_number, search=search)
        )
        from devicebridge.clinic.queries import PAGE_SIZE

        return {
            "clients": rows,
            "total": total,
            "page": page_number,
            "pages": max(1, -(-total // PAGE_SIZE)),
            "search": search,
        }

    async def home(request: Request) -> Response:
        data = await client_list_data(request)
        return c.render(request, "clients.html", {**data, "ingest": c.config.ingest_status()})

    async def clients_fragment(request: Request) -> Response:
        return c.render(request, "_client_rows.html", await client_list_data(request))

    async def client_page(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        client = await run_in_threadpool(c.queries.client, _login(request).user, client_id)
        return c.render(request, "client.html", {"client": client, "today": date.today()})

    async def client_fragment(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        client = await run_in_threadpool(c.queries.client, _login(request).user, client_id)
        return c.render(request, "_client_live.html", {"client": client})

    async def acknowledge(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        alert_id = _int(request.path_params["alert_id"], "alert")
        await run_in_threadpool(
            c.queries.acknowledge_alert, _login(request).user, client_id, alert_id
        )
        if request.headers.get("hx-request"):
            return await client_fragment(request)
        return RedirectResponse(f"/clients/{client_id}", status_code=303)

    async def session_page(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        session_id = _int(request.path_params["session_id"], "session")
        session = await run_in_threadpool(
            c.queries.session, _login(request).user, client_id, session_id
        )
        return c.render(
            request,
            "session.html",
            {"session": session, "plot": session_plot(session, c.config.policy)},
        )

    async def sessions_csv(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        start, end = _range(request)
        sessions = await run_in_threadpool(
            c.queries.sessions_between, _login(request).user, client_id, start, end
        )
        out = io.StringIO()
        columns = [
            "bridge_session_id",
            "serial",
            "routine",
            "program_id",
            "status",
            "end_reason",
            "started_at",
            "ended_at",
            "completion",
            "in_band_fraction",
            "cap_events",
        ]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sessions)
        return Response(
            out.getvalue(),
            media_type="text/csv",
            headers={
                "content-disposition": f'attachment; filename="client-{client_id}-sessions.csv"'
            },
        )

    # ---------------------------------------------------------------- programs

    def starter_texts() -> dict[str, str]:
        from devicebridge.core.library import starter_routines

        return starter_routines()

    async def program_form(request: Request) -> Response:
        starters = starter_texts()
        chosen = request.query_params.get("starter", "firming")
        text = starters.get(chosen, next(iter(starters.values())))
        rows = await run_in_threadpool(c.queries.pushable_clients, _login(request).user)
        preselected = request.query_params.get("client")
        return c.render(
            request,
            "program.html",
            {
                "starters": list(starters),
                "chosen": chosen,
                "text": text,
                "clients": rows,
                "preselected": preselected,
                "valid_days": DEFAULT_VALID_DAYS,
                "error": None,
                "validation": validate(text, c.config.policy),
            },
        )

    async def program_validate(request: Request) -> Response:
        form = await form_of(request)
        result = validate(str(form.get("program", "")), c.config.policy)
        if request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse({"ok": result.ok, "problems": result.problems})
        return c.render(request, "_validation.html", {"validation": result})

    async def program_push(request: Request) -> Response:
        form = await form_of(request)
        login = _login(request)
        wanted = [_int(v, "client") for v in form.getlist("client")]
        visible = await run_in_threadpool(c.queries.visible_client_ids, login.user, wanted)
        if sorted(set(wanted)) != visible:
            raise HTTPException(404)  # a client that is not this therapist's: push to none
        bridges = await run_in_threadpool(c.queries.client_bridge_ids, visible)
        try:
            valid_days = float(str(form.get("valid_days", DEFAULT_VALID_DAYS)))
        except ValueError:
            valid_days = -1.0
        try:
            batch = await run_in_threadpool(
                lambda: queue_pushes(
                    c.config.engine,
                    user=login.user,
                    clients=[(cid, bridges[cid]) for cid in visible],
                    program_text=str(form.get("program", "")),
                    policy=c.config.policy,
                    valid_days=valid_days,
                    program_version=str(form.get("program_version", "")) or None,
                )
            )
        except ClinicError as exc:
            if request.headers.get("accept", "").startswith("application/json"):
                return JSONResponse({"error": str(exc)}, status_code=400)
            rows = await run_in_threadpool(c.queries.pushable_clients, login.user)
            text = str(form.get("program", ""))
            return c.render(
                request,
                "program.html",
                {
                    "starters": list(starter_texts()),
                    "chosen": "",
                    "text": text,
                    "clients": rows,
                    "preselected": None,
                    "valid_days": valid_days,
                    "error": str(exc),
                    "validation": validate(text, c.config.policy),
                },
                status_code=400,
            )
        c.config.notify_push()
        if request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse({"batch": batch}, status_code=201)
        return RedirectResponse(f"/pushes/{batch}", status_code=303)

    async def pushes_page(request: Request) -> Response:
        batch = str(request.path_params["batch"])[:32]
        pushes = await run_in_threadpool(c.queries.pushes, _login(request).user, batch)
        return c.render(request, "pushes.html", {"pushes": pushes, "batch": batch})

    async def pushes_fragment(request: Request) -> Response:
        batch = str(request.path_params["batch"])[:32]
        pushes = await run_in_threadpool(c.queries.pushes, _login(request).user, batch)
        return c.render(request, "_push_rows.html", {"pushes": pushes, "batch": batch})

    # ---------------------------------------------------------------- admin

    async def admin_page(request: Request) -> Response:
        search = request.query_params.get("q", "")[:64]
        clients, users, total = await run_in_threadpool(
            lambda: c.queries.assignment_table(search=search)
        )
        return c.render(
            request,
            "admin.html",
            {"clients": clients, "users": users, "total": total, "search": search},
        )

    async def admin_assign(request: Request) -> Response:
        form = await form_of(request)
        await run_in_threadpool(
            lambda: c.queries.assign(
                _int(form.get("client_id"), "client"),
                _int(form.get("user_id"), "user"),
                assigned=form.get("assigned") == "1",
            )
        )
        return RedirectResponse("/admin", status_code=303)

    async def admin_label(request: Request) -> Response:
        form = await form_of(request)
        await run_in_threadpool(
            c.queries.set_label, _int(form.get("client_id"), "client"), str(form.get("label", ""))
        )
        return RedirectResponse("/admin", status_code=303)

    # ---------------------------------------------------------------- API

    async def api_clients(request: Request) -> Response:
        data = await client_list_data(request)
        return JSONResponse(
            {
                "clients": [r.as_dict() for r in data["clients"]],
                "total": data["total"],
                "page": data["page"],
                "pages": data["pages"],
            }
        )

    async def api_client(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        client = await run_in_threadpool(c.queries.client, _login(request).user, client_id)
        return JSONResponse(client)

    async def api_session(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        session_id = _int(request.path_params["session_id"], "session")
        session = await run_in_threadpool(
            c.queries.session, _login(request).user, client_id, session_id
        )
        return JSONResponse(session)

    async def health(_request: Request) -> Response:
        # For a load balancer or a supervisor: no data, only whether ingestion is connected.
        status = c.config.ingest_status()
        return JSONResponse({"ok": True, "mqtt_connected": bool(status.get("connected"))})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        if request.url.path.startswith("/api/"):
            return JSONResponse(
                {"error": "not found" if code == 404 else str(exc)}, status_code=code
            )
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        return PlainTextResponse(str(detail), status_code=code)

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/setup", setup, methods=["GET", "POST"]),
        Route("/logout", page(c, logout), methods=["POST"]),
        Route("/", page(c, home)),
        Route("/fragments/clients", page(c, clients_fragment)),
        Route("/clients/{client_id}", page(c, client_page)),
        Route("/clients/{client_id}/live", page(c, client_fragment)),
        Route("/clients/{client_id}/sessions.csv", page(c, sessions_csv)),
        Route("/clients/{client_id}/sessions/{session_id}", page(c, session_page)),
        Route(
            "/clients/{client_id}/alerts/{alert_id}/acknowledge",
            page(c, acknowledge),
            methods=["POST"],
        ),
        Route("/programs/new", page(c, program_form)),
        Route("/programs/validate", page(c, program_validate), methods=["POST"]),
        Route("/programs/push", page(c, program_push), methods=["POST"]),
        Route("/pushes/{batch}", page(c, pushes_page)),
        Route("/pushes/{batch}/live", page(c, pushes_fragment)),
        Route("/admin", page(c, admin_page, admin=True)),
        Route("/admin/assign", page(c, admin_assign, admin=True), methods=["POST"]),
        Route("/admin/label", page(c, admin_label, admin=True), methods=["POST"]),
        Route("/api/clients", page(c, api_clients)),
        Route("/api/clients/{client_id}", page(c, api_client)),
        Route("/api/clients/{client_id}/sessions/{session_id}", page(c, api_session)),
        Route("/healthz", health),
        Mount("/static", StaticFiles(packages=[("devicebridge.clinic", "static")]), name="static"),
    ]
    from devicebridge.clinic.exports import export_routes

    routes[-2:-2] = export_routes(c, page)
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: not_found},
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    app.state.console = console
    return app


def _range(request: Request) -> tuple[datetime | None, datetime | None]:
    """``from`` and ``to`` (dates, inclusive) of the query string, as UTC instants."""

    def day(name: str) -> date | None:
        value = request.query_params.get(name)
        if not value:
            return None
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise HTTPException(400, f"{name} must be a date (YYYY-MM-DD)") from None

    start, end = day("from"), day("to")
    return (
        datetime.combine(start, time(), UTC) if start else None,
        datetime.combine(end + timedelta(days=1), time(), UTC) if end else None,
    )


# --------------------------------------------------------------------------- plots


def session_plot(session: Mapping[str, Any], policy: SafetyPolicy) -> dict[str, Any]:
    """The data uPlot draws for one session (time in s since its first sample)."""
    series = session["series"]
    if not series:
        return {"kind": "none"}
    first = min(int(r["first_sequence"]) for r in series)
    rate = float(series[0]["sample_rate_hz"]) or 1.0
    times = sorted({(int(r["first_sequence"]) - first) / rate for r in series})
    index = {t_s: i for i, t_s in enumerate(times)}
    if any(r["zone"] == "face" for r in series):
        channels = ["red", "near_infrared", "blue"]
        irradiance = {ch: [None] * len(times) for ch in channels}
        dose = {ch: [0.0] * len(times) for ch in channels}
        temperature: list[float | None] = [None] * len(times)
        for r in series:
            i = index[(int(r["first_sequence"]) - first) / rate]
            for ch in channels:
                irradiance[ch][i] = r[f"{ch}_mw_cm2"]
            temperature[i] = r["skin_temperature_max_c"]
        for ch in channels:
            total = 0.0
            for i, r in enumerate(
                sorted(
                    (r for r in series if r["zone"] == "face"), key=lambda r: r["first_sequence"]
                )
            ):
                total += float(r[f"{ch}_mw_cm2"] or 0) * int(r["samples"]) / rate / 1000.0
                dose[ch][i] = round(total, 4)
        caps = {
            ch: policy.led[ch].dose_cap_session_j_cm2.value for ch in channels if ch in policy.led
        }
        return {
            "kind": "led_mask",
            "t": times,
            "irradiance": irradiance,
            "dose": dose,
            "dose_caps": caps,
            "temperature": temperature,
        }
    zones = sorted({r["zone"] for r in series if r["zone"] != "none" and r["contact_samples"]})
    mean = {z: [None] * len(times) for z in zones}
    peak = {z: [None] * len(times) for z in zones}
    temperature = [None] * len(times)
    for r in series:
        i = index[(int(r["first_sequence"]) - first) / rate]
        if r["zone"] in mean and r["pressure_mean_kpa"] is not None:
            mean[r["zone"]][i] = r["pressure_mean_kpa"]
            peak[r["zone"]][i] = r["pressure_max_kpa"]
        t_c = r["skin_temperature_max_c"]
        if t_c is not None and (temperature[i] is None or t_c > temperature[i]):
            temperature[i] = t_c
    bands: dict[str, list[float]] = {}
    text = session.get("program_text")
    if text:
        from devicebridge.core.routine import RoutineError, parse_routine

        try:
            routine = parse_routine(text, policy, label="program")
        except RoutineError:
            routine = None
        if routine is not None:
            for step in routine.steps:
                if isinstance(step, MassageStep) and step.zone not in bands:
                    bands[step.zone] = [step.pressure_min_kpa, step.pressure_max_kpa]
    caps = {
        z: policy.zones[policy_zone(z)].cap_kpa.value
        for z in zones
        if policy_zone(z) in policy.zones
    }
    return {
        "kind": "massager",
        "t": times,
        "zones": zones,
        "mean": mean,
        "peak": peak,
        "bands": bands,
        "caps": caps,
        "temperature": temperature,
    }
