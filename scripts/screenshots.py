"""Screenshots of the admin for the README: the dashboard, a model page with its economics and a
node page, written to docs/img/*.png.

Run it against a running control plane with data, e.g. `make run` (development data and a day of
synthetic usage come from bootstrap_demo) in one terminal, then:

    .venv/bin/python scripts/screenshots.py                    # http://127.0.0.1:8000, admin/admin
    .venv/bin/python scripts/screenshots.py --base-url http://127.0.0.1:8001 --model demo-llama

It drives Debian's chromium (`apt-get install chromium`) headless through Playwright; it never
downloads a browser. The password comes from --password or CROSSLOGIC_SCREENSHOT_PASSWORD
(default: the development login admin/admin).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def _login(page: Any, base: str, username: str, password: str) -> None:
    page.goto(base + "/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    with page.expect_navigation():
        page.click("input[type=submit]")
    if "/admin/login/" in page.url:
        raise SystemExit(f"error: could not log in as {username} at {base}")


def _first_link(page: Any, changelist: str) -> str:
    page.goto(changelist)
    link = page.locator("#result_list tbody tr th a").first
    if not link.count():
        raise SystemExit(f"error: {changelist} lists nothing to photograph")
    return str(link.get_attribute("href"))


def _dashboard(page: Any, base: str, out: Path) -> Path:
    page.goto(base + "/admin/dashboard/")
    # dashboard.js marks each canvas once Chart.js has drawn it.
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#cl-dashboard canvas')).every(c => c.dataset.drawn === '1')"
    )
    path = out / "dashboard.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _model(page: Any, base: str, out: Path, name: str) -> Path:
    changelist = base + "/admin/catalog/servedmodel/" + (f"?q={name}" if name else "")
    page.goto(base + _first_link(page, changelist))
    economics = page.locator("#model-economics, .field-economics, fieldset:has-text('Economics')").first
    if economics.count():
        economics.scroll_into_view_if_needed()
    path = out / "model-economics.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _node(page: Any, base: str, out: Path) -> Path:
    ready = base + "/admin/fleet/node/?status__exact=ready"
    page.goto(ready)
    if not page.locator("#result_list tbody tr th a").count():
        ready = base + "/admin/fleet/node/"
    page.goto(base + _first_link(page, ready))
    page.wait_for_function("!document.getElementById('node-log').textContent.startsWith('Loading')")
    path = out / "node.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password", default=os.environ.get("CROSSLOGIC_SCREENSHOT_PASSWORD", "admin"))
    parser.add_argument("--model", default="", help="served model name for the model page (default: the first)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--width", type=int, default=1440)
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    base = args.base_url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
        context.set_default_timeout(30_000)
        # The pictures are about the page: Django's navigation sidebar stays folded.
        context.add_init_script("window.localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
        page = context.new_page()
        _login(page, base, args.username, args.password)
        for path in (
            _dashboard(page, base, args.out),
            _model(page, base, args.out, args.model),
            _node(page, base, args.out),
        ):
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
