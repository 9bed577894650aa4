"""A real browser (Debian's Chromium, driven by Playwright) on a sandbox's origins.

Environment: OPENCODE_URL and APP_URL (ticket URLs agentd handed out), SHOTS (a directory
for the screenshots). Prints one JSON line with what it saw; exits non-zero on a failed check.
"""

import json
import os
import sys

from playwright.sync_api import sync_playwright


def main() -> int:
    shots = os.environ["SHOTS"]
    os.makedirs(shots, exist_ok=True)
    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()

        # A web app inside the sandbox, through its port's origin.
        page.goto(os.environ["APP_URL"])
        first = page.inner_text("body")
        page.reload()
        second = page.inner_text("body")
        seen["app_first"] = first.strip()
        seen["app_second"] = second.strip()
        seen["app_url"] = page.url
        seen["app_document_cookie"] = page.evaluate("document.cookie")
        page.screenshot(path=os.path.join(shots, "app.png"))

        # The sandbox's OpenCode web UI, through its origin.
        ui = context.new_page()
        ui.goto(os.environ["OPENCODE_URL"])
        # Its event stream stays open (no network idle): the page's load, then a moment.
        ui.wait_for_load_state("load", timeout=30000)
        ui.wait_for_timeout(4000)
        seen["ui_url"] = ui.url
        seen["ui_title"] = ui.title()
        seen["ui_text"] = ui.inner_text("body")[:2000]
        ui.screenshot(path=os.path.join(shots, "opencode-ui.png"))
        browser.close()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
