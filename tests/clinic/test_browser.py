"""The whole loop in a real browser: headless Chromium (Debian's, driven by Playwright)
against `devicebridge clinic serve`, a private Mosquitto and a bridge service over
simulated devices. A therapist logs in, writes a program (the validator answers live),
signs and pushes it, sees it accepted and installed; the client runs it, and the session
appears with its adherence and plot without a reload. Screenshots of every step go to
the test's artifacts folder (``--sim-artifacts``, default ``sim-artifacts/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.cli import main
from devicebridge.core.signed_program import key_id, load_public_key
from devicebridge.qa.pytest_plugin import artifacts_dir
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from tests.broker import Mosquitto
from tests.clinic.rig import SHORT_ROUTINE, data_dir, start_with_guided_massager
from tests.service.conftest import BRIDGE, WAIT_S, service_rig

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PASSWORD = "a long enough password"
UI_TIMEOUT_MS = 20_000  # a hang net: pages update every 2-3 s
SERVE = "from devicebridge.cli import main; main()"

async_api = pytest.importorskip("playwright.async_api")


def chromium() -> str:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("the browser test needs Debian's chromium: apt-get install chromium")
    return CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium"))


def cli(env: dict[str, str], *args: str) -> str:
    result = CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@contextlib.asynccontextmanager
async def clinic_serve(env: dict[str, str], *args: str) -> AsyncIterator[str]:
    """`devicebridge clinic serve` in its own process; yields the address it prints."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE,
        *args,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "clinic serve exited"
                found = re.search(r"clinic console on (http://\S+)", line)
                if found:
                    break
        yield found.group(1).rstrip("/")
    finally:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_therapist_pushes_a_program_and_watches_the_session_arrive(
    mosquitto: Mosquitto,
    tmp_path: Path,
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    executable = chromium()
    shots = artifacts_dir(request.config, request.node.nodeid)
    shots.mkdir(parents=True, exist_ok=True)
    env = {"DEVICEBRIDGE_KEY_DIR": str(tmp_path / "keys"), "DEVICEBRIDGE_CLINIC_PASSWORD": PASSWORD}
    database = ["--database", database_url]
    public_key = (
        cli(env, "therapist", "keygen", "--id", "dr-lee").split("public key:")[1].split()[0]
    )
    cli(env, "clinic", "user", "add", "lee", "--therapist-id", "dr-lee", *database)
    cli(env, "clinic", "assign", BRIDGE, "lee", *database)
    bridge_dir = data_dir(tmp_path)
    # The client trusts the therapist's key (what `devicebridge trust add` does).
    store = ProgramStore(bridge_dir / PROGRAMS_FILENAME)
    store.trust(key_id(load_public_key(public_key)), "dr-lee", public_key)
    store.close()

    async with (
        clinic_serve(
            env,
            "--data-dir",
            str(tmp_path / "console"),
            "clinic",
            "serve",
            "--broker",
            f"127.0.0.1:{mosquitto.port}",
            "--port",
            "0",
            *database,
        ) as address,
        service_rig(bridge_dir, broker_port=mosquitto.port, massagers=0) as rig,
        async_api.async_playwright() as playwright,
    ):
        worker = await start_with_guided_massager(rig)
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        page = await browser.new_page(viewport={"width": 1300, "height": 900})
        page.set_default_timeout(UI_TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on(
            "response",
            lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
        )
        expect = async_api.expect
        expect.set_options(timeout=UI_TIMEOUT_MS)
        try:
            await page.goto(address + "/")
            await page.fill("input[name=username]", "lee")
            await page.fill("input[name=password]", PASSWORD)
            await page.screenshot(path=shots / "01-login.png")
            await page.click("button[type=submit]")
            row = page.locator(f"tr[data-client={BRIDGE}]")
            await expect(row.locator(".pill.online")).to_be_visible()
            await page.screenshot(path=shots / "02-clients.png")

            await row.locator("a").click()
            await page.click("text=New program for this client")
            await page.wait_for_load_state("load")  # htmx is set up: edits get validated
            editor = page.locator("textarea#program")
            unsafe = SHORT_ROUTINE.replace("max = 12.0", "max = 40.0", 1)
            await editor.fill(unsafe)
            problems = page.locator("#validation-problems")
            await expect(problems).to_contain_text("steps[1].pressure_kpa")
            await expect(problems).to_contain_text("source")
            await expect(problems).to_contain_text("line 18")
            await page.screenshot(path=shots / "03-validation.png", full_page=True)
            await editor.fill(SHORT_ROUTINE)
            await expect(page.locator("#validation-ok")).to_contain_text("Short firming")
            await page.screenshot(path=shots / "04-program.png", full_page=True)

            await page.click("#sign-and-push")
            push = page.locator("#push-rows tr").first
            await expect(push.locator(".pill")).to_have_text("accepted")
            await expect(push.locator("td.installed")).to_contain_text(worker.serial)
            await page.screenshot(path=shots / "05-acknowledged.png", full_page=True)

            await push.locator("a").click()
            await expect(page.locator("#live")).to_contain_text("0 of 2 sessions this week")
            weeks = page.locator("#weeks-chart")
            await expect(weeks).to_have_attribute("data-points", "0")
            await page.evaluate("window.devicebridgeNoReload = true")

            program_id = rig.service.programs.programs()[0].id
            await rig.service.start_program(worker.serial, program_id)
            await rig.wait(lambda: worker.runner is not None)
            await rig.wait(lambda: worker.runner is None)
            session = page.locator("tr.session.completed")
            await expect(session).to_have_count(1)
            await expect(page.locator("#live")).to_contain_text("1 of 2 sessions this week")
            await expect(weeks).to_have_attribute("data-points", "1")
            assert await page.evaluate("window.devicebridgeNoReload === true")
            await page.screenshot(path=shots / "06-client.png", full_page=True)

            await session.locator("a").click()
            await expect(page.locator("[data-chart=pressure] canvas")).to_be_visible()
            await expect(page.locator("h2").first).to_contain_text("Short firming")
            await page.screenshot(path=shots / "07-session.png", full_page=True)
            assert errors == []
        except BaseException:
            await page.screenshot(path=shots / "failure.png", full_page=True)
            (shots / "page-errors.txt").write_text("\n".join(errors))
            raise
        finally:
            await browser.close()
        await rig.stop()
