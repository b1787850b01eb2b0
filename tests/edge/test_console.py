"""The operator console in a real browser (Debian's headless Chromium, driven by Playwright)
through nginx to the in-process app, with a real device over TLS MQTT: sign in, watch a device
come online and a task succeed live, cancel one, and be refused what the token may not do; work
on a business process's human steps from the work list and watch the instance move on.

SWARM_CONSOLE_SCREENSHOTS=1 also writes the main pages to docs/console/*.png."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from app.auth import CSRF_HEADER, SESSION_COOKIE, Scope, csrf_token, mint_token
from app.settings import Settings
from tests.conftest import ROOT, enrol, unique_device_id
from tests.e2e.test_processes import example, open_step, unique
from tests.e2e.test_sdk_device import make_device, running

CHROMIUM = "/usr/bin/chromium"
# What works on this machine's closed network (no downloads, no background connections).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A loaded 2-core box: generous waits (a wait ends as soon as its condition holds).
WAIT_MS = 30_000
# The tasks table's rows of one device.
TASK_ROW = "tr.task:has(a:text-is('%s'))"
SCREENSHOTS = ROOT / "docs" / "console" if os.environ.get("SWARM_CONSOLE_SCREENSHOTS") else None

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium profile; the stack's CA is not in its trust store, hence no HTTPS check."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            ignore_https_errors=True,
            viewport={"width": 1280, "height": 800},
        )
        context.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        try:
            yield context
        finally:
            await context.close()


def token(settings: Settings, *scopes: str) -> str:
    return mint_token(settings.auth, "operator", scopes, 3600)


async def sign_in(page: Page, edge_url: str, api_token: str) -> None:
    # nginx sends a browser without a session to the sign-in page.
    await page.goto(f"{edge_url}/console/tasks")
    await expect(page).to_have_url(f"{edge_url}/console/signin")
    await page.fill("#token", api_token)
    await page.click("button[type=submit]")


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def live(page: Page) -> None:
    """The page is subscribed to the event stream; a marker shows later that it never reloaded."""
    await expect(page.locator("#live.on")).to_be_visible()
    await page.evaluate("window.notReloaded = true")


async def assert_not_reloaded(page: Page) -> None:
    assert await page.evaluate("window.notReloaded === true"), "the page was reloaded"


async def test_operate_the_fleet_live(
    browser: BrowserContext, operator: httpx.AsyncClient, edge_url: str, settings: Settings, tmp_path: Path
) -> None:
    device_id = unique_device_id("console")
    offline_id = unique_device_id("console-off")
    creds = await enrol(operator, device_id, tmp_path)
    await enrol(operator, offline_id, tmp_path)
    desired = {"sample_rate_s": 30}
    assert (await operator.put(f"/devices/{device_id}/config", json=desired)).status_code == 200

    page = browser.pages[0] if browser.pages else await browser.new_page()
    await page.goto(f"{edge_url}/console/signin")
    await screenshot(page, "signin")
    await sign_in(page, edge_url, token(settings, *Scope))
    await expect(page).to_have_url(f"{edge_url}/console/devices")
    session = next(c for c in await browser.cookies() if c["name"] == SESSION_COOKIE)
    assert (session["httpOnly"], session["secure"], session["sameSite"]) == (True, True, "Strict")

    row = page.locator(f"#device-{device_id}")
    await expect(row).to_have_attribute("data-online", "false")
    await live(page)
    async with running(make_device(settings, creds)):
        await expect(row).to_have_attribute("data-online", "true")
        await assert_not_reloaded(page)
        await screenshot(page, "devices")

        await page.goto(f"{edge_url}/console/tasks")
        await live(page)
        form = page.locator("form[hx-post='/console/tasks']")
        await form.locator("[name=device_id]").fill(device_id)
        await form.locator("[name=method]").fill("echo")
        await form.locator("[name=params]").fill('{"hello": "console"}')
        await form.locator("button").click()
        await expect(page.locator("#flash .ok")).to_contain_text(f"queued for {device_id}")
        done = page.locator(TASK_ROW % device_id)
        await expect(done).to_have_attribute("data-status", "succeeded")
        await assert_not_reloaded(page)

        # A task for a device that is offline waits: cancel it from its row.
        await form.locator("[name=device_id]").fill(offline_id)
        await form.locator("[name=method]").fill("reboot")
        await form.locator("[name=params]").fill("")
        await form.locator("button").click()
        waiting = page.locator(TASK_ROW % offline_id)
        await expect(waiting).to_have_attribute("data-status", "queued")
        await waiting.locator("button.cancel").click()
        await expect(waiting).to_have_attribute("data-status", "canceled")
        await expect(page.locator("#flash .ok")).to_contain_text("canceled")
        await assert_not_reloaded(page)

        batch = page.locator("form[hx-post='/console/tasks/batch']")
        await batch.locator("[name=device_ids]").fill(device_id)
        await batch.locator("[name=method]").fill("echo")
        await batch.locator("button").click()
        await expect(page.locator("#flash .ok")).to_contain_text("1 tasks (echo) queued")
        await expect(done).to_have_count(2)
        await expect(page.locator(f"{TASK_ROW % device_id}[data-status=succeeded]")).to_have_count(2)
        # A task's audit history opens under its row.
        await done.first.locator("button.history").click()
        await expect(page.locator("#task-history ol.events")).to_contain_text("succeeded")
        await assert_not_reloaded(page)
        await screenshot(page, "tasks")

        await page.goto(f"{edge_url}/console/devices/{device_id}")
        await expect(page.locator(f"#history-{(await task_ids(operator, device_id))[0]}")).to_contain_text("succeeded")
        await expect(page.locator("table.config")).to_contain_text('"sample_rate_s": 30')
        # What the device said in its hello (not an event of the stream: shown as the page loads).
        await expect(page.locator("dl.facts")).to_contain_text("1.2.3 / sim")
        await screenshot(page, "device")

    # The device's own page hears it go offline.
    await expect(page.locator("#device-summary .badge").first).to_have_text("offline")

    await page.locator("header button", has_text="Sign out").click()
    await expect(page).to_have_url(f"{edge_url}/console/signin")
    assert SESSION_COOKIE not in {c["name"] for c in await browser.cookies()}


async def task_ids(operator: httpx.AsyncClient, device_id: str) -> list[str]:
    response = await operator.get("/tasks", params={"device_id": device_id})
    assert response.status_code == 200, response.text
    return [task["id"] for task in response.json()["items"]]


async def test_an_action_beyond_the_token_is_refused(
    browser: BrowserContext, operator: httpx.AsyncClient, edge_url: str, settings: Settings, tmp_path: Path
) -> None:
    device_id = unique_device_id("console-ro")
    await enrol(operator, device_id, tmp_path)
    page = browser.pages[0] if browser.pages else await browser.new_page()
    await sign_in(page, edge_url, token(settings, Scope.TASKS_READ))
    await expect(page).to_have_url(f"{edge_url}/console/tasks")
    # Only the pages the token opens are offered.
    await expect(page.locator("header nav a")).to_have_text(["Tasks"])
    form = page.locator("form[hx-post='/console/tasks']")
    await form.locator("[name=device_id]").fill(device_id)
    await form.locator("[name=method]").fill("echo")
    await form.locator("button").click()
    await expect(page.locator("#flash .error")).to_have_text("403: The token lacks the scope tasks:write.")
    assert await task_ids(operator, device_id) == []
    response = await page.request.get(f"{edge_url}/console/devices")
    assert response.status == 403

    # When the session is gone, the next action takes the whole page to the sign-in page.
    await browser.clear_cookies()
    await form.locator("button").click()
    await expect(page).to_have_url(f"{edge_url}/console/signin")


@pytest.fixture
async def signed_in(edge_url: str, edge_tls: ssl.SSLContext, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client like a signed-in browser: the session cookie, no Authorization header."""
    api_token = token(settings, *Scope)
    async with httpx.AsyncClient(base_url=edge_url, verify=edge_tls, timeout=30) as client:
        response = await client.post("/console/signin", data={"token": api_token})
        assert response.status_code == 303, response.text
        assert client.cookies[SESSION_COOKIE] == api_token
        yield client


async def test_the_session_cookie_authenticates_the_api_and_its_stream(signed_in: httpx.AsyncClient) -> None:
    assert (await signed_in.get("/api/v1/tasks", params={"limit": 1})).status_code == 200
    async with signed_in.stream("GET", "/api/v1/events", params={"heartbeat": 1}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")


async def test_a_cookie_action_needs_the_csrf_token_and_our_origin(
    signed_in: httpx.AsyncClient, operator: httpx.AsyncClient, edge_url: str, tmp_path: Path
) -> None:
    device_id = unique_device_id("console-csrf")
    await enrol(operator, device_id, tmp_path)
    task = {"method": "reboot", "params": {}}
    url = f"/api/v1/devices/{device_id}/tasks"
    right = {CSRF_HEADER: csrf_token(signed_in.cookies[SESSION_COOKIE])}

    for headers in ({}, {CSRF_HEADER: "0" * 64}, right | {"Origin": "https://evil.example"}):
        response = await signed_in.post(url, json=task, headers=headers)
        assert response.status_code == 403, (headers, response.text)
    assert await task_ids(operator, device_id) == []
    response = await signed_in.post(url, json=task, headers=right | {"Origin": edge_url})
    assert response.status_code == 201, response.text
    # The bearer path is as it was: no CSRF token for an API client.
    assert (await operator.post(f"/devices/{device_id}/tasks", json=task)).status_code == 201


async def test_the_edge_refuses_a_bad_session(edge: httpx.AsyncClient, settings: Settings) -> None:
    expired = mint_token(settings.auth, "operator", list(Scope), -60)
    for cookie in ("not-a-jwt", expired):
        edge.cookies.set(SESSION_COOKIE, cookie)
        try:
            assert (await edge.get("/api/v1/tasks")).status_code == 401
            response = await edge.get("/console/tasks")
            assert (response.status_code, response.headers["location"]) == (303, "/console/signin")
            page = await edge.post("/console/signin", data={"token": cookie})
            assert page.status_code == 401
            assert SESSION_COOKIE not in page.cookies
        finally:
            edge.cookies.clear()


# Whoever works on process steps: the work list, the instance pages, the event stream (tasks:read).
WORKER = (Scope.PROCESSES_READ, Scope.PROCESSES_WORK, Scope.TASKS_READ)


@pytest.fixture
async def predicted_defect(
    operator: httpx.AsyncClient, app_client: httpx.AsyncClient, db: asyncpg.Connection, tmp_path: Path
) -> str:
    """The id of an instance of the seed's example whose criteria fire: its operator's review is open."""
    # The work list shows the oldest 200 open steps: instances that other tests left running must
    # not push this one's step off the page. Canceled in-process, past nginx's rate limit.
    for _ in range(20):
        page = await app_client.get("/processes/instances", params={"status": "running", "limit": 500})
        running = page.json()["items"]
        if not running:
            break
        for instance in running:
            canceled = await app_client.post(f"/processes/instances/{instance['id']}/cancel")
            assert canceled.status_code == 200, canceled.text
    name = unique("predictive-maintenance")
    created = await operator.post("/processes/definitions", json=example(name))
    assert created.status_code == 201, created.text
    device_id = unique_device_id("console-pm")
    await enrol(operator, device_id, tmp_path)
    state = {"vibration_mm_s": 9.1, "bearing_temp_c": 95.0}
    await db.execute(
        "UPDATE devices SET reported_state = $2::jsonb, reported_at = now() WHERE id = $1", device_id, json.dumps(state)
    )
    limits = {"vibration_limit": 7.0, "temperature_limit": 80.0}
    started = await operator.post(
        "/processes/instances", json={"definition": name, "device_id": device_id, "input": limits}
    )
    assert started.status_code == 201, started.text
    body = started.json()
    assert open_step((await operator.get(f"/processes/instances/{body['id']}")).json(), "operator_review")
    return str(body["id"])


async def work_list(browser: BrowserContext, edge_url: str, api_token: str) -> Page:
    """Signed in with a token that may work on steps: the console opens on the work list."""
    page = browser.pages[0] if browser.pages else await browser.new_page()
    await sign_in(page, edge_url, api_token)
    await expect(page).to_have_url(f"{edge_url}/console/processes/work")
    return page


async def test_work_on_a_process_step_live(
    browser: BrowserContext, predicted_defect: str, edge_url: str, settings: Settings
) -> None:
    instance_id = predicted_defect
    page = await work_list(browser, edge_url, token(settings, *WORKER, "role:operator", "role:technologist"))
    review = page.locator(f"#role-operator tr.step[data-instance='{instance_id}'][data-step=operator_review]")
    await expect(review).to_contain_text("Confirm the prediction")
    await expect(review.locator("button.outcome")).to_have_text(["confirmed", "rejected"])
    repair = page.locator(f"#role-technologist tr.step[data-instance='{instance_id}'][data-step=technologist_repair]")
    await expect(repair).to_have_count(0)
    await live(page)
    await screenshot(page, "worklist")

    await review.locator("button[data-outcome=confirmed]").click()
    await expect(page.locator("#flash .ok")).to_contain_text("operator_review")
    # The event stream moves the step off the operator's list and the technologist's onto theirs.
    await expect(review).to_have_count(0)
    await expect(repair).to_contain_text("Repair the device")
    await assert_not_reloaded(page)

    await repair.locator(f"a[href='/console/processes/instances/{instance_id}']").click()
    await expect(page).to_have_url(f"{edge_url}/console/processes/instances/{instance_id}")
    done = page.locator("tr.step[data-step=operator_review]")
    await expect(done).to_have_attribute("data-status", "done")
    await expect(done).to_contain_text("confirmed")
    await expect(page.locator("#instance-history")).to_contain_text("step.completed operator_review")
    await live(page)
    # Done from the instance page: it shows the instance move on without a reload.
    step = page.locator("tr.step[data-step=technologist_repair]")
    await step.locator("button[data-outcome=done]").click()
    await expect(step).to_have_attribute("data-status", "done")
    await expect(page.locator("tr.step[data-step=repair_task]")).to_have_attribute("data-status", "open")
    await expect(page.locator("#instance-status")).to_have_text("running")
    await assert_not_reloaded(page)
    await screenshot(page, "process")


async def test_a_step_of_another_role_is_refused(
    browser: BrowserContext, predicted_defect: str, operator: httpx.AsyncClient, edge_url: str, settings: Settings
) -> None:
    instance_id = predicted_defect
    page = await work_list(browser, edge_url, token(settings, *WORKER, "role:engineer"))
    # The console's home is the work list too, for such a token.
    await page.goto(f"{edge_url}/console")
    await expect(page).to_have_url(f"{edge_url}/console/processes/work")
    # Only the roles the token holds have a list.
    await expect(page.locator("section.role h2")).to_have_text(["engineer"])
    await expect(page.locator(f"tr.step[data-instance='{instance_id}']")).to_have_count(0)

    await page.goto(f"{edge_url}/console/processes/instances/{instance_id}")
    review = page.locator("tr.step[data-step=operator_review]")
    await review.locator("button[data-outcome=confirmed]").click()
    await expect(page.locator("#flash .error")).to_contain_text("403: completing step 'operator_review' needs the role")
    await expect(review).to_have_attribute("data-status", "open")
    body = (await operator.get(f"/processes/instances/{instance_id}")).json()
    assert open_step(body, "operator_review") is not None

    # A token without processes:work has no work list.
    await browser.clear_cookies()
    await sign_in(page, edge_url, token(settings, Scope.TASKS_READ, Scope.PROCESSES_READ, "role:operator"))
    await expect(page).to_have_url(f"{edge_url}/console/tasks")
    assert (await page.request.get(f"{edge_url}/console/processes/work")).status == 403
