"""The admin in a real browser: Debian's chromium, headless, driven by Playwright, against the real
server (`python -m crosslogic.serve`) and a Celery worker on the test database.

A staff member logs in from the bare host, launches a local node (the vLLM simulator) from the
launch form and watches it become ready on its page, revokes a key through its confirmation page,
and opens the dashboard, where every chart must draw with data and refresh itself. Every page
must log no console error. Slow tier: it starts processes and a browser.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest
from django.conf import settings

from tests import browser_support as bs

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

USERNAME, PASSWORD = "ops", "browser-pw-0123456789"


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[dict[str, object]]:
    """The server and a worker, sharing the test database, this run's Redis db and a var dir."""
    bs.chromium_or_skip()
    root = tmp_path_factory.mktemp("browser")
    port = bs.free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CROSSLOGIC_ENV_FILE": "",
        # Development mode serves static files straight from static/ (no collectstatic step).
        "DEBUG": "true",
        "DATABASE_URL": bs.database_url(),
        "DB_CONN_MAX_AGE": "0",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.REDIS_URL,
        "CROSSLOGIC_VAR_DIR": str(root / "var"),
        "CONTROL_PLANE_URL": base,
        "FLEET_LAUNCH_POLL_S": "1",
        "FLEET_LOCAL_STARTUP_DELAY_S": "0.3",
        "FLEET_HEALTH_TIMEOUT_S": "2",
        "DASHBOARD_REFRESH_S": "5",  # the shortest allowed: the test sees one refresh
    }
    with ExitStack() as stack:
        stack.enter_context(bs.server(env, port, root / "server.log"))
        worker_log = stack.enter_context(bs.worker(env, root / "worker.log"))
        yield {"base": base, "worker_log": worker_log, "server_log": root / "server.log"}


@pytest.fixture(scope="module")
def browser(stack) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread, which makes Django refuse database
    # calls from the test ("async context"); they are plain blocking calls here, in one thread.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        chromium = playwright.chromium.launch(executable_path=str(bs.CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, stack, transactional_db) -> Iterator[object]:
    """A fresh browser context, logged in as staff; fails the test on any console error."""
    bs.create_staff_user(USERNAME, PASSWORD)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(20_000)
    console = bs.ConsoleErrors()
    console.watch(context)
    tab = context.new_page()
    bs.login(tab, str(stack["base"]), USERNAME, PASSWORD)
    yield tab
    context.close()
    assert not console.errors, "the browser console logged errors:\n" + "\n".join(console.errors)


@pytest.fixture
def no_node_left_behind() -> Iterator[None]:
    yield
    from apps.fleet.models import Node

    for node in Node.objects.all():
        pid = node.launcher_state.get("pid")
        if isinstance(pid, int):
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _log_tail(path: object) -> str:
    return Path(str(path)).read_text(errors="replace")[-3000:]


def test_launch_a_local_node_from_the_admin_and_watch_it_become_ready(page, stack, no_node_left_behind) -> None:
    from apps.catalog.services import model_create
    from apps.fleet.models import Node, NodeStatus

    model_create(name="browser-llama", storage_uri="s3://weights/browser-llama", max_replicas=2)
    base = str(stack["base"])

    page.goto(base + "/admin/fleet/node/")
    page.click("text=Launch nodes")
    page.select_option("#id_model", label="browser-llama")
    page.select_option("#id_launcher", "local")
    page.fill("#id_count", "1")
    page.click("input[name=preview]")
    assert "run_local_node" in page.inner_text("#launch-preview")
    assert page.locator("#replica-warning").count() == 0
    page.click("input[name=confirm]")
    page.wait_for_url("**/admin/fleet/node/")
    assert "Launching" in page.inner_text(".messagelist")

    page.click("#result_list tbody tr th a")
    node = Node.objects.get(model__name="browser-llama")
    assert page.url.endswith(f"/admin/fleet/node/{node.pk}/change/")
    deadline = time.monotonic() + 120
    seen: list[str] = []
    while True:
        status = page.inner_text(".field-status .readonly").strip()
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == NodeStatus.READY.label:
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"the node page never showed Ready (saw {seen})\n--- worker ---\n{_log_tail(stack['worker_log'])}"
            )
        if page.locator("#object-action-check-health").count():
            page.click("#object-action-check-health")  # registered and loading: the button's check makes it ready
            page.wait_for_selector(".messagelist")
        else:
            time.sleep(1)
            page.reload()

    assert Node.objects.get(pk=node.pk).status == NodeStatus.READY
    for button in ("#object-action-drain", "#object-action-terminate", "#object-action-relaunch"):
        assert page.locator(button).count() == 1
    page.wait_for_function("document.getElementById('node-log').textContent.includes('registered')")

    # Terminate from the page, through its confirmation.
    page.click("#object-action-terminate")
    assert "Yes, terminate" in page.input_value("#confirm-submit")
    page.fill("#id_reason", "browser test done")
    page.click("#confirm-submit")
    page.wait_for_selector(".messagelist .success")
    node.refresh_from_db()
    assert node.status in {NodeStatus.TERMINATING, NodeStatus.TERMINATED}
    assert node.status_reason == "browser test done"


def test_revoke_a_key_through_its_confirmation_page(page, stack) -> None:
    from apps.tenancy.models import ApiKey
    from apps.tenancy.services import api_key_issue, api_key_verify, tenant_create

    key, raw = api_key_issue(tenant=tenant_create(slug="browser-co"), name="ci-key", scopes=["inference"])
    base = str(stack["base"])

    page.goto(base + f"/admin/tenancy/apikey/{key.pk}/change/")
    page.click("#object-action-revoke")
    assert key.prefix in page.inner_text("#confirm-objects")
    page.click("#confirm-submit")  # no reason given: the form says so and nothing is revoked
    assert "This field is required." in page.inner_text(".errorlist")
    assert api_key_verify(raw=raw) is not None

    page.fill("#id_reason", "leaked in a CI log")
    page.click("#confirm-submit")

    page.wait_for_selector(".messagelist .success")
    assert page.url.endswith(f"/admin/tenancy/apikey/{key.pk}/change/")
    assert "leaked in a CI log (staff:ops)" in page.inner_text(".field-revoked_reason")
    assert page.locator("#object-action-revoke").count() == 0
    assert api_key_verify(raw=raw) is None
    assert ApiKey.objects.get(pk=key.pk).revoked_reason == "leaked in a CI log (staff:ops)"


def test_the_dashboard_draws_every_chart_with_data_and_refreshes(page, stack) -> None:
    from django.utils import timezone

    from apps.catalog.services import model_create
    from apps.fleet.models import NodeStatus
    from apps.fleet.services import node_create
    from apps.fleet.transitions import node_transition
    from apps.metering.synthetic import synthetic_usage_create
    from apps.tenancy.services import api_key_issue, tenant_create

    model = model_create(
        name="dash-llama",
        storage_uri="s3://weights/dash-llama",
        price_input_per_mtok="0.20",
        price_output_per_mtok="0.60",
        total_bytes=16_000_000_000,
    )
    tenants = []
    for slug in ("dash-a", "dash-b"):
        tenant = tenant_create(slug=slug)
        tenants.append((tenant, api_key_issue(tenant=tenant, name="k", scopes=["inference"])[0]))
    # Two days of usage (so the 30-day spend chart has more than one day), its rollups and a
    # billed history node; plus one live node for the fleet panel.
    synthetic_usage_create(tenants=tenants, models=[model], days=2, now=timezone.now(), peak_per_minute=2.0)
    live = node_create(
        model=model, launcher="static", endpoint_url="http://127.0.0.1:9", accelerator="L4:1", hourly_cost="0.80"
    )
    node_transition(node=live, to=NodeStatus.LOADING)
    node_transition(node=live, to=NodeStatus.READY)

    page.goto(str(stack["base"]) + "/admin/")
    page.click("#dashboard-link a")
    page.wait_for_url("**/admin/dashboard/")
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#cl-dashboard canvas')).every(c => c.dataset.drawn === '1')"
    )
    drawn = page.eval_on_selector_all(
        "#cl-dashboard canvas",
        "els => els.map(c => ({id: c.id, points: Number(c.dataset.points), total: Number(c.dataset.total),"
        " width: c.clientWidth, height: c.clientHeight}))",
    )
    assert len(drawn) >= 5, drawn
    for chart in drawn:
        assert chart["points"] > 0 and chart["total"] > 0, f"{chart['id']} drew no data: {chart}"
        assert chart["width"] > 100 and 100 < chart["height"] <= 600, f"{chart['id']} is not sized to draw: {chart}"
    # A responsive chart whose container takes its height from the chart grows on every resize.
    page.set_viewport_size({"width": 1200, "height": 800})
    page.wait_for_timeout(1000)
    resized = page.eval_on_selector_all("#cl-dashboard canvas", "els => els.map(c => c.clientHeight)")
    assert all(100 < h <= 600 for h in resized), f"charts changed height after a resize: {resized}"
    for table in ("#table-top-tenants", "#table-top-models", "#table-economics", "#table-fleet-nodes"):
        assert int(page.get_attribute(table, "data-rows") or 0) > 0, f"{table} is empty"
    assert "dash-llama" in page.inner_text("#table-economics")

    first = page.get_attribute("#cl-dashboard", "data-updated-at")
    page.wait_for_function(
        f"document.getElementById('cl-dashboard').dataset.updatedAt !== {first!r}", timeout=30_000
    )  # refetched data.json by itself
    assert page.locator("#dashboard-error").is_hidden()
