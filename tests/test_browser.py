"""The web pages in a real browser: Debian's headless Chromium driven by Playwright, against
the real `stepd serve`. Screenshots of every page land in tests/screenshots/."""

from __future__ import annotations

import os
import re
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


def shot(page: Any, name: str, *, full_page: bool = True) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


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


def flow_with_groups(users: int) -> dict[str, Any]:
    """A parallel with a gate in one branch, a map over `users`, then a gate that branches."""
    return {
        "name": "Onboard the new team",
        "flow": {
            "start": {"name": "fetch roster", "tool": "echo", "args": {"n": users},
                      "next": "enrich"},
            "enrich": {"parallel": {
                "geo": {"start": {"tool": "sleep", "args": {"seconds": 0.1}, "done": True}},
                "crm": {"start": {"tool": "echo", "args": {}, "next": "check"},
                        "check": {"name": "check contracts", "tool": None, "done": True}},
            }, "next": "notify"},
            "notify": {"map": {"items": "<<input.users>>", "as": "user", "max_concurrency": 2,
                               "flow": {"start": {"name": "send invite", "tool": "sleep",
                                                  "args": {"seconds": 0.5}, "done": True}}},
                       "next": "review", "on_error": "report"},
            "review": {"name": "sign off", "tool": None,
                       "branch": [{"if": "result.ok", "then": "publish"}, {"else": "report"}]},
            "publish": {"tool": "echo", "args": {"users": "<<input.users>>"}, "done": True},
            "report": {"tool": "echo", "args": {"error": "<<error>>"}, "done": True},
        },
        "input": {"users": [f"user{i}@example.com" for i in range(users)]},
    }  # fmt: skip


def watch(page: Any) -> list[str]:
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on(
        "response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    return problems


def signed_in_page(browser: Any, daemon: Daemon, token: str, width: int = 1100) -> Any:
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=daemon.url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.goto("/ui/login")
    page.fill("#token", token)
    page.click("button:has-text('Sign in')")
    sync_api.expect(page).to_have_url(f"{daemon.url}/ui/approvals")
    return page


def node(page: Any, state: str, kind: str | None = None) -> Any:
    selector = f"svg.flow .g-node[data-state='{state}']"
    return page.locator(selector + (f".k-{kind}" if kind else ""))


def test_the_flow_graph_follows_a_parallel_a_map_and_gates(daemon: Daemon, browser: Any) -> None:
    expect = sync_api.expect
    with daemon.client(JAMES) as api:
        wf_id = create(api, flow_with_groups(users=12))
        wait_for(api, wf_id, lambda w: any(s["awaiting"] == "ready" for s in w["steps"]))
    page = signed_in_page(browser, daemon, JAMES)
    problems = watch(page)
    page.goto(f"/ui/workflows/{wf_id}")
    graph = page.locator("#graph svg.flow")
    expect(graph).to_be_visible()
    # Groups: the parallel with its two branches, the map.
    labels = page.locator("svg.flow .group-label").all_text_contents()
    assert sorted(labels) == ["branch crm", "branch geo", "map notify", "parallel enrich"]
    expect(node(page, "start", "tool").first).to_have_class(re.compile(r"\bs-done\b"))
    expect(node(page, "check")).to_have_class(re.compile(r"\bs-waiting\b"))
    expect(node(page, "enrich", "parallel-fork")).to_have_class(re.compile(r"\bs-running\b"))
    expect(node(page, "review")).to_have_class(re.compile(r"\bs-none\b"))
    expect(page.locator("svg.flow .edge-label", has_text="result.ok")).to_have_count(1)
    expect(page.locator("svg.flow .g-edge.k-error")).to_have_count(1)
    # The parallel's row folds its inner steps; the gate inside is open to decide.
    expect(page.locator("details.inner[open] .step.s-waiting")).to_have_count(1)
    shot(page, "11-flow-parallel-gate")

    # Approve the gate in the branch: the graph follows without a reload.
    page.evaluate("window.__notReloaded = true")
    page.locator(".step.s-waiting button:has-text('Approve')").click()
    expect(node(page, "check")).to_have_class(re.compile(r"\bs-done\b"))
    page.evaluate("window.__notReloaded = true")  # the approve form's redirect was a load
    fork = node(page, "notify", "map-fork")
    expect(fork).to_have_class(re.compile(r"\bs-running\b"))
    expect(fork.locator("text.counts")).to_contain_text("pending")
    shot(page, "12-flow-map-running")
    expect(node(page, "review")).to_have_class(re.compile(r"\bs-waiting\b"), timeout=15_000)
    expect(fork.locator("text.counts")).to_have_text("12 done")
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded instead of updating"
    page.locator(".step.s-waiting summary:has-text('Add a result')").click()
    page.locator(".step.s-waiting textarea[name=result]").fill('{"ok": true}')
    page.locator(".step.s-waiting button:has-text('Approve')").click()
    expect(page.locator("#wf-status")).to_have_text("completed")
    expect(node(page, "publish")).to_have_class(re.compile(r"\bs-done\b"))
    expect(node(page, "report")).to_have_class(re.compile(r"\bs-none\b"))
    expect(page.locator("svg.flow .g-node.k-end")).to_have_class(re.compile(r"\bs-done\b"))
    shot(page, "13-flow-completed")
    # A node links to its step's row, opening the fold it is in.
    expect(page.locator("details.inner[open]")).to_have_count(0)
    node(page, "check").click()
    expect(page.locator("details.inner[open] .step:has-text('check contracts')")).to_be_visible()

    # A phone: the graph shrinks to fit, the page does not scroll sideways.
    page.set_viewport_size({"width": 375, "height": 812})
    page.reload()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the workflow page scrolls sideways on a phone ({width}px)"
    assert problems == [], problems


def test_pause_intervene_and_resume_from_the_page(daemon: Daemon, browser: Any) -> None:
    expect = sync_api.expect
    body = {
        "name": "Settle the invoice",
        "flow": {
            "start": {"name": "wait for payment", "wait": {"signal": "paid"}, "next": "book"},
            "book": {
                "tool": "echo",
                "args": {"amount": "<<input.amount>>", "paid": "<<steps.start.result>>"},
                "done": True,
            },
        },  # fmt: skip
        "input": {"amount": 120, "currency": "EUR", "note": "typo"},
    }
    with daemon.client(JAMES) as api:
        wf_id = create(api, body)
        wait_for(api, wf_id, lambda w: any(s["awaiting"] == "signal" for s in w["steps"]))
    page = signed_in_page(browser, daemon, JAMES)
    problems = watch(page)
    page.goto(f"/ui/workflows/{wf_id}")
    expect(node(page, "start")).to_have_class(re.compile(r"\bs-waiting\b"))
    page.fill("#pause-reason", "the amount looks wrong")
    page.click("form.pause button")
    expect(page.locator(".flash.ok")).to_contain_text(f"Paused workflow {wf_id}")
    expect(page.locator("#wf-status")).to_have_text("paused")
    expect(page.locator("form.resume")).to_be_visible()
    shot(page, "14-paused")

    # Edit the input while the page follows its events: a signal arrives meanwhile (kept
    # for later: the workflow is paused) and the form keeps what was typed.
    text = page.locator("#intervene-input")
    text.fill('{\n  "amount": 150,\n  "currency": "EUR"\n}')
    page.fill("#intervene-reason", "the customer paid 150")
    with daemon.client(JAMES) as api:
        resp = api.post(f"/api/workflow/{wf_id}/signal", json={"name": "paid", "data": 150})
        assert resp.status_code == 202, resp.text
    page.wait_for_timeout(1500)  # the page has reloaded its live part by now
    expect(text).to_have_value('{\n  "amount": 150,\n  "currency": "EUR"\n}')
    shot(page, "15-intervene-form")
    page.click("form.intervene button")
    expect(page.locator(".flash.ok")).to_contain_text(f"Changed the input of workflow {wf_id}")
    expect(page.locator("details.json").first).to_contain_text('"amount": 150')
    expect(page.locator("details.json").first).not_to_contain_text("typo")

    page.click("form.resume button")
    expect(page.locator(".flash.ok")).to_contain_text(f"Resumed workflow {wf_id}")
    expect(page.locator("#wf-status")).to_have_text("completed", timeout=15_000)
    expect(page.locator(".step").last).to_contain_text('"amount": 150')
    assert problems == [], problems


def test_the_inbox_and_the_list_update_live(daemon: Daemon, browser: Any) -> None:
    expect = sync_api.expect
    page = signed_in_page(browser, daemon, APPROVER)
    problems = watch(page)
    expect(page.locator(".empty")).to_contain_text("Nothing is waiting for you")
    page.evaluate("window.__notReloaded = true")
    with daemon.client(JAMES) as api:
        first = create(api, review_flow("Renew the certificate", pause=0.1))
        create(api, review_flow("Close the quarter", pause=0.1))
    expect(page.locator("article.gate")).to_have_count(2)
    expect(page.locator("#inbox-count")).to_have_text("2")
    shot(page, "16-inbox-live")

    page.click("nav a:has-text('Workflows')")
    page.evaluate("window.__notReloaded = true")
    row = page.locator(f".list li:has(a[href='/ui/workflows/{first}'])")
    expect(row.locator(".badge.s-running")).to_have_count(1)
    with daemon.client(APPROVER) as api:
        wf = wait_for(api, first, lambda w: any(s["awaiting"] == "ready" for s in w["steps"]))
        gate = next(s for s in wf["steps"] if s["awaiting"] == "ready")
        assert api.post(f"/api/workflow/{gate['id']}/ready").status_code == 200
    expect(row.locator(".badge.s-completed")).to_have_count(1)
    expect(page.locator("#inbox-count")).to_have_text("1")
    assert page.evaluate("window.__notReloaded === true"), "the list reloaded instead of updating"
    shot(page, "17-list-live")
    assert problems == [], problems


def test_long_workflows_fold_and_page_their_steps(daemon: Daemon, browser: Any) -> None:
    expect = sync_api.expect
    body = {
        "name": "Count to 150, then fan out",
        "flow": {
            "start": {"tool": "echo", "args": {"i": 0}, "next": "count"},
            "count": {"tool": "echo", "args": {"i": "<<result.i + 1>>"},
                      "branch": [{"if": "result.i < 150", "then": "count"}, {"else": "fan"}]},
            "fan": {"map": {"items": "<<input.items>>", "max_concurrency": 50,
                            "flow": {"start": {"tool": "echo", "args": {"x": "<<item>>"},
                                               "done": True}}}, "done": True},
        },
        "input": {"items": list(range(300))},
    }  # fmt: skip
    with daemon.client(JAMES) as api:
        wf_id = create(api, body)
        wf = wait_for(api, wf_id, timeout=60)
        assert wf["status"] == "completed", wf["error"]
        assert len(wf["steps"]) == 1 + 150 + 1 + 300
    page = signed_in_page(browser, daemon, JAMES)
    problems = watch(page)
    page.goto(f"/ui/workflows/{wf_id}")
    # The latest 100 top-level steps, the map's 300 items folded under its row.
    expect(page.locator(".timeline:not(.nested) > .step")).to_have_count(100)
    expect(page.locator(".older-steps")).to_contain_text("52 older steps not shown")
    fold = page.locator("details.inner")
    expect(fold).to_have_count(1)
    expect(fold.locator("summary").first).to_have_text("300 inner steps: 300 done")
    assert not fold.evaluate("d => d.open")
    fold.locator("summary").first.click()
    expect(fold.locator(".step")).to_have_count(50)
    expect(fold.locator(".older-inner")).to_contain_text("250 earlier inner steps not shown")
    page.locator(".older-steps").scroll_into_view_if_needed()
    shot(page, "18-long-workflow-older", full_page=False)
    fold.locator(".older-inner").scroll_into_view_if_needed()
    shot(page, "19-long-workflow-folded-map", full_page=False)
    page.click(".older-steps a:has-text('Show all')")
    expect(page.locator(".timeline:not(.nested) > .step")).to_have_count(152)
    expect(page.locator(".older-steps")).to_have_count(0)
    assert problems == [], problems


def test_a_definition_page_runs_it_from_its_schema_form(daemon: Daemon, browser: Any) -> None:
    expect = sync_api.expect
    definition = {
        "name": "Vet the supplier",
        "description": "Checks a supplier before the first order",
        "tags": ["procurement"],
        "flow": {
            "start": {"name": "look up", "tool": "echo", "args": {"who": "<<input.who>>"},
                      "next": "score"},
            "score": {"tool": "echo", "args": {"tier": "<<input.tier>>"}, "done": True},
        },
        "input_schema": {"type": "object", "required": ["who"], "properties": {
            "who": {"type": "string", "description": "The supplier's registered name"},
            "orders": {"type": "integer"},
            "tier": {"enum": ["gold", "silver", "bronze"]},
            "notes": {"type": "object"}}},
    }  # fmt: skip
    with daemon.client(JAMES) as api:
        resp = api.post("/api/workflows", json={"definition": definition})
        assert resp.status_code == 201, resp.text
        def_id = resp.json()["id"]
        changed = {**definition, "flow": {**definition["flow"], "score": {
            "tool": "echo", "args": {"tier": "<<input.tier>>", "orders": "<<input.orders>>"},
            "done": True}}}  # fmt: skip
        body = {"definition": changed, "change_summary": "Score by orders too"}
        resp = api.put(f"/api/workflows/{def_id}", json=body)
        assert resp.status_code == 200, resp.text
    page = signed_in_page(browser, daemon, JAMES)
    problems = watch(page)
    page.click("nav a:has-text('Definitions')")
    expect(page.locator(".list.defs li")).to_have_count(1)
    expect(page.locator(".list.defs .tag")).to_have_text("procurement")
    shot(page, "20-definitions")
    page.click(".list.defs a.row-link")
    expect(page).to_have_url(f"{daemon.url}/ui/definitions/{def_id}")
    expect(page.locator("#graph svg.flow")).to_be_visible()
    expect(node(page, "score")).to_have_count(1)
    expect(page.locator(".ops li")).not_to_have_count(0)
    shot(page, "21-definition")

    page.fill("input[name='in.who']", "Acme Ltd")
    page.fill("input[name='in.orders']", "12")
    page.select_option("select[name='in.tier']", label="silver")
    page.click("form.run button:has-text('Run')")
    expect(page.locator(".flash.ok")).to_contain_text("Started run")
    expect(page.locator(".run-origin")).to_contain_text("Run of Vet the supplier v2")
    expect(page.locator("#wf-status")).to_have_text("completed", timeout=15_000)
    expect(page.locator(".step").last).to_contain_text('"orders": 12')
    shot(page, "22-definition-run")
    page.click(".run-origin a:has-text('Vet the supplier')")
    expect(page.locator("#runs .list li")).to_have_count(1)
    expect(page.locator("#runs .badge.s-completed")).to_have_count(1)

    page.set_viewport_size({"width": 375, "height": 812})
    page.reload()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the definition page scrolls sideways on a phone ({width}px)"
    assert problems == [], problems


def test_a_schedule_added_from_the_definition_page(daemon: Daemon, browser: Any) -> None:
    expect = sync_api.expect
    definition = {
        "name": "Morning report",
        "flow": {"start": {"tool": "echo", "args": {"to": "<<input.to>>"}, "done": True}},
    }
    with daemon.client(JAMES) as api:
        resp = api.post("/api/workflows", json={"definition": definition})
        assert resp.status_code == 201, resp.text
        def_id = resp.json()["id"]
    page = signed_in_page(browser, daemon, JAMES)
    problems = watch(page)
    page.goto(f"/ui/definitions/{def_id}")
    expect(page.locator("#schedules")).to_contain_text("No schedules")
    form = page.locator("form.add-schedule")
    expect(form).to_be_visible()  # open while there are none
    form.locator("input[name=cron_expression]").fill("30 8 * * 1-5")
    form.locator("input[name=timezone]").fill("Europe/Paris")
    form.locator("textarea[name=input_data]").fill('{"to": "ops@example.com"}')
    form.locator("select[name=overlap]").select_option("buffer_one")
    form.locator("button:has-text('Add schedule')").click()
    expect(page.locator(".flash.ok")).to_contain_text("Added the schedule “30 8 * * 1-5”")
    schedule = page.locator("#schedules article.schedule")
    expect(schedule).to_have_count(1)
    expect(schedule.locator(".cron-words")).to_contain_text("08:30")
    runs = schedule.locator(".next-runs li")
    expect(runs).to_have_count(5)
    for text in runs.all_text_contents():  # Paris in winter, or in summer
        assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri) \d{4}-\d\d-\d\d 08:30 UTC\+0[12]:00", text), (
            text
        )
    shot(page, "23-definition-schedules")

    # Run now: the run starts and the schedule's page lists its tick.
    schedule.locator("button:has-text('Run now')").click()
    expect(page.locator(".flash.ok")).to_contain_text("Started run")
    expect(page.locator("#wf-status")).to_have_text("completed", timeout=15_000)
    page.goto(f"/ui/definitions/{def_id}")
    page.locator("#schedules a:has-text('Tick history')").click()
    expect(page.locator(".ticks .tick")).to_have_count(1)
    expect(page.locator(".ticks .tick")).to_contain_text("fired")
    shot(page, "24-schedule-ticks")

    page.set_viewport_size({"width": 375, "height": 812})
    page.goto(f"/ui/definitions/{def_id}")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the schedules scroll sideways on a phone ({width}px)"
    assert problems == [], problems
