"""agentd's web UI in a real browser (Debian's Chromium, driven by Playwright).

Environment: BASE_URL (agentd's TCP listener), TOKEN (agentd's API token), LOGIN_URL (a
one-use link `agentd ui` printed), GIT_URL (a small repository), AXE (axe-core's axe.min.js),
SHOTS (a directory for the screenshots). The flow a person follows: log in; create a task of
two agents on the repository with bash on "ask"; watch it live; answer both permission
requests; open the ranked diff; open an attempt's OpenCode UI; open a terminal and run a
command; delete the task. Everything is found by role and accessible name. axe-core checks
the pages (no serious or critical violation). Prints one JSON line of what it measured;
exits non-zero (an exception) on a failed check.
"""

import json
import os
import re
import zipfile
import sys
import time

from playwright.sync_api import expect, sync_playwright

TIMEOUT = 180_000


def axe(page, name, shots):
    """Runs axe-core on the page; fails on serious or critical violations."""
    page.add_script_tag(path=os.environ["AXE"])
    result = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})"
    )
    bad = [
        {"id": v["id"], "impact": v["impact"], "help": v["help"],
         "nodes": [n["html"][:200] for n in v["nodes"][:3]]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    if bad:
        page.screenshot(path=os.path.join(shots, f"axe-{name}.png"), full_page=True)
        raise AssertionError(f"axe on {name}: {json.dumps(bad, indent=1)}")
    return len(result["violations"])


def main() -> int:
    shots = os.environ["SHOTS"]
    os.makedirs(shots, exist_ok=True)
    base = os.environ["BASE_URL"]
    seen = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox"],
        )
        # The one-use link logs a fresh browser in, and works only once.
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        page.goto(os.environ["LOGIN_URL"])
        expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
        again = ctx.new_page()
        r = again.goto(os.environ["LOGIN_URL"])
        assert r.status == 403, f"a used link answered {r.status}"
        again.close()
        ctx.close()

        # bypass_csp: only so that the test can inject axe-core; the pages' own scripts are
        # checked against the policy in the other context above.
        ctx = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        # First paint, and what the page loads.
        # The paint entry may come after `goto` returns: wait for it (5 s at most).
        paint = page.evaluate(
            """() => new Promise(done => {
                 const fcp = list => list.getEntriesByName('first-contentful-paint')[0];
                 new PerformanceObserver((list, o) => {
                   if (fcp(list)) { o.disconnect(); done(fcp(list).startTime); }
                 }).observe({type: 'paint', buffered: true});
                 setTimeout(() => done(null), 5000);
               })"""
        )
        assert paint, "the browser reported no first contentful paint"
        seen["first_contentful_paint_ms"] = round(paint, 1)
        seen["bundle_bytes"] = page.evaluate(
            "() => performance.getEntriesByType('resource').reduce((s, r) => s + (r.decodedBodySize || 0), 0)"
            " + (performance.getEntriesByType('navigation')[0] || {decodedBodySize: 0}).decodedBodySize"
        )
        # Log in with the token.
        expect(page.get_by_role("heading", name="Log in to agentd")).to_be_visible()
        seen["axe_login"] = axe(page, "login", shots)
        page.get_by_label("API token").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_text("That is not agentd's token.")).to_be_visible(timeout=10_000)
        page.get_by_label("API token").fill(os.environ["TOKEN"])
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
        seen["axe_tasks"] = axe(page, "tasks", shots)

        # A task of two agents on the repository, bash on ask.
        page.get_by_role("link", name="New task").click()
        expect(page.get_by_role("heading", name="New task")).to_be_visible()
        seen["axe_new_task"] = axe(page, "new-task", shots)
        page.get_by_label("Prompt").fill("write approved.txt")
        page.get_by_label("Repository URL").fill(os.environ["GIT_URL"])
        page.get_by_label("Agents in parallel").fill("2")
        page.get_by_label("Check command").fill("test -f approved.txt")
        page.get_by_label("Tool bash").select_option("ask")
        page.screenshot(path=os.path.join(shots, "new-task.png"), full_page=True)
        page.get_by_role("button", name="Start the task").click()
        expect(page).to_have_url(re.compile(r"#/tasks/[0-9a-f]+$"), timeout=60_000)
        task_id = page.url.rsplit("/", 1)[1]
        seen["task"] = task_id
        expect(page.get_by_role("heading", name=re.compile(f"Task {task_id}"))).to_be_visible()

        # Live: both agents ask; each request is answered from the page.
        answered = 0
        deadline = time.time() + 180
        while answered < 2:
            assert time.time() < deadline, "the permission requests never came"
            buttons = page.get_by_role("button", name="Allow once")
            if buttons.count() > 0:
                if answered == 0:
                    page.screenshot(path=os.path.join(shots, "approval.png"), full_page=True)
                    seen["axe_task_waiting"] = axe(page, "task-waiting", shots)
                buttons.first.click()
                answered += 1
                page.wait_for_timeout(1500)
            else:
                page.wait_for_timeout(500)
        seen["approvals_answered"] = answered
        # The agents' text streamed in, and the task ends.
        expect(page.get_by_label("What attempt 1's agent wrote")).to_contain_text("All done", timeout=TIMEOUT)
        expect(page.get_by_role("heading", name=re.compile("Results"))).to_be_visible(timeout=TIMEOUT)
        expect(page.get_by_role("heading", name=re.compile(f"Task {task_id}"))).to_contain_text("succeeded")
        # The ranked diff, unified then split.
        page.get_by_role("button", name=re.compile("View the diff of attempt")).first.click()
        diff = page.get_by_role("region", name="Diff")
        expect(diff.get_by_role("navigation", name="Changed files")).to_contain_text("approved.txt")
        expect(diff.get_by_role("table")).to_contain_text("approved")
        diff.get_by_role("button", name="Split view").click()
        expect(diff.get_by_role("button", name="Split view")).to_have_attribute("aria-pressed", "true")
        page.screenshot(path=os.path.join(shots, "task-results.png"), full_page=True)
        seen["axe_task_results"] = axe(page, "task-results", shots)

        # Take over: the attempt's OpenCode UI on its own origin.
        attempt1 = page.get_by_role("article", name="Attempt 1")
        with ctx.expect_page() as popup:
            attempt1.get_by_role("button", name="Open OpenCode").click()
        oc = popup.value
        oc.wait_for_load_state("load", timeout=30_000)
        oc.wait_for_timeout(3000)
        seen["opencode_url"] = oc.url
        seen["opencode_title"] = oc.title()
        oc.screenshot(path=os.path.join(shots, "opencode-ui.png"))
        oc.close()

        # A terminal in the attempt's sandbox.
        attempt1.get_by_role("link", name="Terminal").click()
        expect(page.get_by_role("heading", name=re.compile("Sandbox"))).to_be_visible(timeout=15_000)
        page.locator(".xterm").wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        page.keyboard.type("echo term-$((6*7)) && cat /workspace/approved.txt\n")
        expect(page.locator(".xterm-rows")).to_contain_text("term-42", timeout=30_000)
        expect(page.locator(".xterm-rows")).to_contain_text("approved", timeout=30_000)
        # Its files (the workspace the agent wrote in) and the ports that listen (OpenCode's).
        expect(page.get_by_role("table", name="Files in /workspace")).to_contain_text("approved.txt")
        expect(page.get_by_role("button", name="Open port 4096")).to_be_visible(timeout=15_000)
        page.screenshot(path=os.path.join(shots, "terminal.png"), full_page=True)
        seen["axe_sandbox"] = axe(page, "sandbox", shots)

        # A task from a zip archive uploaded from this computer (unpacked in the page, sent as
        # a tar): its files land in the workspace, without the archive's top folder.
        zpath = os.path.join(shots, "project.zip")
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("project-main/README.md", "zipped readme\n" * 50)
            z.writestr("project-main/src/lib.py", "print('hi')\n")
        page.goto(f"{base}/#/new")
        page.get_by_label("Prompt").fill("write approved.txt")
        page.get_by_label("From").select_option("tar")
        page.get_by_label("Archive").set_input_files(zpath)
        page.get_by_label("Agents in parallel").fill("1")
        page.get_by_role("button", name="Start the task").click()
        expect(page).to_have_url(re.compile(r"#/tasks/[0-9a-f]+$"), timeout=60_000)
        zip_task = page.url.rsplit("/", 1)[1]
        expect(page.get_by_role("heading", name=re.compile(f"Task {zip_task}"))).to_contain_text("succeeded", timeout=TIMEOUT)
        v = page.request.get(f"{base}/v1/tasks/{zip_task}").json()
        seen["zip_workspace"] = v["workspace"]
        assert v["workspace"]["entries"] >= 2, v["workspace"]
        page.get_by_role("article", name="Attempt 1").get_by_role("link", name="Terminal").click()
        expect(page.get_by_role("table", name="Files in /workspace")).to_contain_text("README.md")
        expect(page.get_by_role("table", name="Files in /workspace")).to_contain_text("src/")

        # Delete the task.
        page.goto(f"{base}/#/tasks/{task_id}")
        expect(page.get_by_role("heading", name=re.compile(f"Task {task_id}"))).to_be_visible()
        page.once("dialog", lambda d: d.accept())
        page.get_by_role("button", name="Delete").click()
        expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
        page.screenshot(path=os.path.join(shots, "tasks.png"), full_page=True)
        seen["page_errors"] = errors
        assert not errors, f"errors in the page: {errors}"
        browser.close()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
