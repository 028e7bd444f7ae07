"""The web pages in a real browser: Debian's headless Chromium driven by Playwright, against
the real `stepd serve`. Screenshots of every page land in tests/screenshots/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.process_helpers import Daemon, create, free_port, wait_for, write_config

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).parent / "screenshots"
JAMES, APPROVER = "tok-browser-james", "tok-browser-approver"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")


def review_flow(name: str, pause: float) -> dict[str, Any]:
    """A gate, then a short pause (so "running" can be seen), then a step using the decision."""
    return {
        "name": name,
        "flow": {
            "start": {"name": "review", "tool": None, "next": "pause"},
            "pause": {"tool": "sleep", "args": {"seconds": pause}, "next": "publish"},
            "publish": {
                "tool": "echo",
                "args": {"decision": "<<steps.start.result>>", "title": "{{input.title}}"},
                "done": True,
            },
        },
        "input": {"title": f"{name} for the handbook", "pages": 3},
    }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    tokens = (("james", JAMES, "workflow"), ("approver", APPROVER, "approve"))
    config = write_config(tmp_path / "stepd.toml", port=port, db=tmp_path / "stepd.db",
                          tokens=tokens)  # fmt: skip
    proc = Daemon(tmp_path, config, port)
    try:
        yield proc.started()
    finally:
        proc.kill()


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_sign_in_approve_watch_live_reject(daemon: Daemon, browser: Any) -> None:
    with daemon.client(JAMES) as api:
        approved = create(api, review_flow("Publish the policy", pause=2.0))
        rejected = create(api, review_flow("Delete the archive", pause=0.1))
        for wf in (approved, rejected):
            wait_for(api, wf, lambda w: any(s["awaiting"] == "ready" for s in w["steps"]))

    context = browser.new_context(viewport={"width": 1100, "height": 800}, base_url=daemon.url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on(
        "response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    expect = sync_api.expect

    # Signing in: a wrong token is refused, the right one lands on the inbox.
    page.goto("/ui/approvals")
    expect(page).to_have_url(f"{daemon.url}/ui/login?next=/ui/approvals")
    page.fill("#token", "not-a-token")
    page.click("button:has-text('Sign in')")
    expect(page.locator(".flash.error")).to_contain_text("not valid")
    shot(page, "01-login")
    problems.clear()  # the refused sign-in was a 401, as it should be
    page.fill("#token", APPROVER)
    page.click("button:has-text('Sign in')")
    expect(page).to_have_url(f"{daemon.url}/ui/approvals")
    expect(page.locator("article.gate")).to_have_count(2)
    expect(page.locator("#inbox-count")).to_have_text("2")
    expect(page.locator(".who .name")).to_have_text("approver")
    shot(page, "02-inbox")

    # Approve the first from the inbox with a JSON result and a comment.
    card = page.locator(f"article.gate:has(a[href='/ui/workflows/{approved}'])")
    card.locator("summary:has-text('Add a result')").click()
    card.locator("textarea[name=result]").fill('{"approved": true, "ticket": 42}')
    card.locator("input[name=comment]").fill("looks good")
    card.locator("button:has-text('Approve')").click()
    expect(page.locator(".flash.ok")).to_contain_text("Approved")
    expect(page.locator("article.gate")).to_have_count(1)

    # Its page is still running (the pause), then turns completed without a reload.
    page.goto(f"/ui/workflows/{approved}")
    expect(page.locator("#wf-status")).to_have_text("running")
    page.evaluate("window.__notReloaded = true")
    expect(page.locator(".step.s-done .decision")).to_contain_text("Decided by approver")
    shot(page, "04-detail-running")
    expect(page.locator("#wf-status")).to_have_text("completed", timeout=15_000)
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded instead of updating"
    expect(page.locator(".step").last).to_contain_text('"ticket": 42')
    expect(page.locator(".step.s-done .decision").first).to_contain_text("“looks good”")
    shot(page, "05-detail-completed")

    # Reject the second from its own page.
    page.goto(f"/ui/workflows/{rejected}")
    expect(page.locator(".step.s-waiting")).to_have_count(1)
    expect(page.locator("form.cancel")).to_have_count(0)  # approve-only: no cancel button
    shot(page, "06-detail-waiting")
    page.locator(".step.s-waiting input[name=reason]").fill("too risky")
    page.click("button:has-text('Reject')")
    expect(page.locator("#wf-status")).to_have_text("failed")
    expect(page.locator(".step.s-failed")).to_contain_text("rejected by approver: too risky")
    expect(page.locator(".step.s-failed .decision")).to_contain_text("too risky")
    shot(page, "07-detail-rejected")

    # The inbox is empty now, and says what to do.
    page.click("nav a:has-text('Approvals')")
    expect(page.locator(".empty")).to_contain_text("Nothing is waiting for you")
    expect(page.locator("#inbox-count")).to_have_count(0)
    shot(page, "03-inbox-empty")

    # The list, and its status filter.
    page.click("nav a:has-text('Workflows')")
    expect(page.locator(".list li")).to_have_count(2)
    shot(page, "08-list")
    page.click(".chips a:has-text('failed')")
    expect(page).to_have_url(f"{daemon.url}/ui/workflows?status=failed")
    expect(page.locator(".list li")).to_have_count(1)
    expect(page.locator(".list li")).to_contain_text("Delete the archive")
    page.click(".chips a:has-text('cancelled')")
    expect(page.locator(".empty")).to_contain_text("No cancelled workflows")

    # A phone: a new gate fits 375 px without sideways scrolling.
    with daemon.client(JAMES) as api:
        phone_wf = create(api, review_flow("Rotate the signing keys", pause=0.1))
        wait_for(api, phone_wf, lambda w: any(s["awaiting"] == "ready" for s in w["steps"]))
    page.set_viewport_size({"width": 375, "height": 812})
    for path, name in (("/ui/approvals", "09-phone-inbox"), (f"/ui/workflows/{phone_wf}",
                                                             "10-phone-detail")):  # fmt: skip
        page.goto(path)
        page.locator("details.extra summary").first.click()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{path} scrolls sideways on a phone ({width}px)"
        shot(page, name)

    # Sign out: back to the sign-in page, and the pages ask for it again.
    page.click("button:has-text('Sign out')")
    expect(page.locator(".flash.ok")).to_contain_text("Signed out approver")
    page.goto("/ui/workflows")
    expect(page).to_have_url(f"{daemon.url}/ui/login?next=/ui/workflows")
    assert problems == [], problems
    context.close()
