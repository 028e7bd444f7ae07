"""Webhooks: signed POSTs from the durable outbox to a real local receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon import notify, signing
from daemon.api import create_app
from daemon.auth import webhook_secret
from daemon.storage.sqlite.store import SqliteStore as Store
from daemon.storage.sqlite.store import migrations, split_statements
from tests import backend
from tests.helpers import auth, make_config, wait_for, waiting_gate

SECRET = "whsec-test"
GATE_FLOW = {
    "start": {"name": "prepare", "tool": "echo", "args": {"title": "<<input.title>>"},
              "next": "gate"},
    "gate": {"name": "review", "tool": None, "next": "end"},
    "end": {"tool": "echo", "args": {"ok": True}, "done": True},
}  # fmt: skip


class Receiver:
    """A tiny HTTP server in a thread that records every POST and answers `statuses`
    in turn (then 200)."""

    def __init__(
        self,
        port: int = 0,
        statuses: list[int] | None = None,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        hold: threading.Event | None = None,
    ) -> None:
        """`hold`: each answer waits until it is set (or `delay` seconds at most)."""
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.connections = self.answered = self.open = self.most_open = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    outer.open += 1
                    outer.most_open = max(outer.most_open, outer.open)
                    outer.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body,
                         "at": time.monotonic()}
                    )  # fmt: skip
                status = outer.statuses.pop(0) if outer.statuses else 200
                if hold is None:
                    time.sleep(delay)
                else:
                    hold.wait(delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with lock:
                    outer.open -= 1
                    outer.answered += 1

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: Any, client_address: Any) -> bool:
                outer.connections += 1
                return True

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def bodies(self, event: str | None = None) -> list[dict[str, Any]]:
        out = [orjson.loads(r["body"]) for r in self.requests]
        return [b for b in out if event is None or b["event"] == event]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def closed_port() -> int:
    """A local port nothing listens on (connection refused)."""
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as srv:
        return int(srv.server_address[1])


@pytest.fixture(autouse=True)
def fast_notifier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "BACKOFF_S", 0.005)
    monkeypatch.setattr(notify, "IDLE_WAIT_S", 0.05)
    monkeypatch.setattr(notify, "MIN_PASS_S", 0.0)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The real app with its lifespan (executor and notifier), and a client for it."""
    overrides.setdefault("public_url", "http://stepd")
    app = create_app(make_config(tmp_path, **overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://stepd", headers=auth("james")
        ) as client:
            yield app, client


async def until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return value


async def start_gate(client: httpx.AsyncClient, **extra: Any) -> tuple[int, dict[str, Any]]:
    """Create a workflow whose second state is a gate; wait for the gate. (wf id, gate step)"""
    flow = extra.pop("flow", GATE_FLOW)
    body = {"name": "review-article", "flow": flow, "input": {"title": "New Policy"}, **extra}
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    gate = waiting_gate(wf)
    assert gate is not None
    return wf_id, gate


def outbox(tmp_path: Path) -> list[dict[str, Any]]:
    return backend.records(tmp_path / "stepd.db", "SELECT * FROM outbox ORDER BY id")


def check_signature(request: dict[str, Any], secret: bytes) -> None:
    """The documented formula: v1= + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    ts = request["headers"]["X-Stepd-Timestamp"]
    mac = hmac.new(secret, ts.encode() + b"." + request["body"], hashlib.sha256).hexdigest()
    assert request["headers"]["X-Stepd-Signature"] == "v1=" + mac
    assert abs(int(ts) - time.time()) < 60


def test_sign_and_backoff_helpers() -> None:
    body = b'{"event":"completed"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert notify.sign(b"k", 1700000000, body) == "v1=" + expected
    assert notify.retry_delay(30, 1.0) <= notify.MAX_BACKOFF_S * 1.25
    assert notify.retry_delay(3, 0.0) < notify.retry_delay(4, 0.0)


async def test_gate_and_completion_are_posted_signed(tmp_path: Path, receiver: Receiver) -> None:
    own = Receiver()
    try:
        async with running(tmp_path, webhook_url=receiver.url, webhook_secret=SECRET) as (
            _,
            client,
        ):
            wf_id, gate = await start_gate(client, notify_url=own.url)
            await until(lambda: receiver.bodies("gate_waiting") and own.bodies("gate_waiting"))
            resp = await client.post(f"/api/workflow/{gate['id']}/ready")
            assert resp.status_code == 200
            await until(lambda: receiver.bodies("completed") and own.bodies("completed"))
            await until(lambda: {r["status"] for r in outbox(tmp_path)} == {"sent"})
    finally:
        own.close()

    for r in (receiver, own):
        assert [b["event"] for b in r.bodies()] == ["gate_waiting", "completed"]
        for request in r.requests:
            check_signature(request, SECRET.encode())
            headers = request["headers"]
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Stepd-Event"] == orjson.loads(request["body"])["event"]
            assert headers["X-Stepd-Delivery"].isdigit()
        waiting, completed = r.bodies()
        assert waiting["workflow"] == {
            "id": wf_id, "name": "review-article", "status": "running", "created_by": "james",
            "error": None, "input": {"title": "New Policy"}, "input_bytes": 22,
        }  # fmt: skip
        assert waiting["step"] == {"id": gate["id"], "name": "review", "state": "gate"}
        links = waiting["links"]
        assert links["approve"].startswith("http://stepd/link/")
        assert links["reject"].startswith("http://stepd/link/")
        assert links["approve"] != links["reject"]
        assert 0 < links["expires_at"] - time.time() * 1000 <= 86_400_000
        assert completed["workflow"]["status"] == "completed"
        assert "step" not in completed and "links" not in completed
        assert completed["event_id"] > waiting["event_id"]
    rows = outbox(tmp_path)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"sent"}


async def test_creator_url_gets_no_links_when_creator_may_not_decide(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A workflow's own notify_url is chosen by its creator: a link sent there would let
    the creator decide a gate that forbids self-approval."""
    own = Receiver()
    flow = {**GATE_FLOW, "gate": {**GATE_FLOW["gate"], "allow_self_approval": False}}
    try:
        async with running(tmp_path, webhook_url=receiver.url) as (app, client):
            await start_gate(client, notify_url=own.url, flow=flow)
            await until(lambda: receiver.bodies("gate_waiting") and own.bodies("gate_waiting"))
            # The daemon's keys: shared through the database on PostgreSQL, else its files.
            hook_key = await app.state.store.secret("webhook") or webhook_secret(tmp_path)
            server_key = signing.secret(app.state.config.state_dir)
    finally:
        own.close()
    assert "links" in receiver.bodies("gate_waiting")[0]
    assert "links" not in own.bodies("gate_waiting")[0]
    # Without [webhooks] secret a generated key of its own signs: not the daemon's secret,
    # which signs sessions and links (a receiver holding it could forge links).
    check_signature(receiver.requests[0], hook_key)
    with pytest.raises(AssertionError):
        check_signature(receiver.requests[0], server_key)


async def test_links_expire_with_the_gate(tmp_path: Path, receiver: Receiver) -> None:
    flow = {**GATE_FLOW, "gate": {**GATE_FLOW["gate"], "timeout": 60}}
    async with running(tmp_path, webhook_url=receiver.url) as (_, client):
        _, gate = await start_gate(client, flow=flow)
        await until(lambda: receiver.bodies("gate_waiting"))
    links = receiver.bodies("gate_waiting")[0]["links"]
    assert links["expires_at"] <= gate["expires_at"]
    assert links["expires_at"] - time.time() * 1000 <= 61_000


async def test_no_public_url_means_no_links(tmp_path: Path, receiver: Receiver) -> None:
    async with running(tmp_path, webhook_url=receiver.url, public_url="") as (_, client):
        await start_gate(client)
        await until(lambda: receiver.bodies("gate_waiting"))
    assert "links" not in receiver.bodies("gate_waiting")[0]


async def test_retried_after_failures(tmp_path: Path) -> None:
    receiver = Receiver(statuses=[500, 503])
    try:
        async with running(tmp_path, webhook_url=receiver.url) as (_, client):
            await start_gate(client)
            await until(lambda: len(receiver.requests) >= 3)
            await until(lambda: outbox(tmp_path)[0]["status"] == "sent")
    finally:
        receiver.close()
    assert len(receiver.requests) == 3
    assert len({r["headers"]["X-Stepd-Delivery"] for r in receiver.requests}) == 1
    assert len({r["body"] for r in receiver.requests}) == 1
    (row,) = outbox(tmp_path)
    assert row["attempts"] == 3 and row["last_error"] is None


async def test_dead_after_max_attempts(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/hook"
    async with running(tmp_path, webhook_url=url, webhook_max_attempts=3) as (_, client):
        await start_gate(client)
        await until(lambda: [r for r in outbox(tmp_path) if r["status"] == "dead"])
        await asyncio.sleep(0.1)
    (row,) = outbox(tmp_path)
    assert row["status"] == "dead" and row["attempts"] == 3
    assert "Connect" in row["last_error"]


async def test_outbox_survives_a_restart(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_delivery(self: notify.Notifier) -> None:
        pass

    # First run: the notification is enqueued, then the daemon stops before delivering.
    with monkeypatch.context() as m:
        m.setattr(notify.Notifier, "deliver", no_delivery)
        async with running(tmp_path, webhook_url=receiver.url) as (_, client):
            _, gate = await start_gate(client)
            await until(lambda: outbox(tmp_path))
    assert receiver.requests == []
    assert [r["status"] for r in outbox(tmp_path)] == ["pending"]

    async with running(tmp_path, webhook_url=receiver.url) as (_, client):
        await until(lambda: receiver.requests)
        await until(lambda: outbox(tmp_path)[0]["status"] == "sent")
        await asyncio.sleep(0.2)  # time for a duplicate, were there one
    assert len(receiver.requests) == 1
    assert receiver.bodies()[0]["step"]["id"] == gate["id"]
    assert len(outbox(tmp_path)) == 1


async def test_a_stop_lets_a_delivery_under_way_finish(tmp_path: Path) -> None:
    receiver = Receiver(delay=0.3)
    try:
        async with running(tmp_path, webhook_url=receiver.url) as (_, client):
            await start_gate(client)
            await until(lambda: receiver.requests)  # the POST is under way: stop now
        assert [r["status"] for r in outbox(tmp_path)] == ["sent"]
    finally:
        receiver.close()


async def test_unwatched_events_only_move_the_cursor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "SAVE_EVERY_S", 0.0)
    async with running(tmp_path) as (app, client):
        wf_id, gate = await start_gate(client)
        await client.post(f"/api/workflow/{gate['id']}/ready")
        await wait_for(client, wf_id)
        store = app.state.store
        last = (await store.events(wf_id))[-1]["id"]
        deadline = time.monotonic() + 5
        while await store.cursor("webhooks") < last:
            assert time.monotonic() < deadline, "cursor did not advance"
            await asyncio.sleep(0.01)
    assert outbox(tmp_path) == []


async def test_only_notifying_events_are_read_and_batches_page(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, client):
        store = app.state.store
        ids = []
        for _ in range(3):
            wf_id, gate = await start_gate(client)
            await client.post(f"/api/workflow/{gate['id']}/ready")
            await wait_for(client, wf_id)
            ids.append(wf_id)
        all_events = [e for wf in ids for e in await store.events(wf)]
        wanted = [e["id"] for e in all_events if e["type"] in notify.EVENTS]
        events, up_to, caught_up = await store.events_of_types(0, notify.EVENTS, limit=1000)
        assert [e["id"] for e in events] == wanted
        assert up_to == max(e["id"] for e in all_events) and caught_up  # the log was covered
        # A full batch stops at its last event, so the next read carries on from there.
        first, up_to, caught_up = await store.events_of_types(0, notify.EVENTS, limit=2)
        assert [e["id"] for e in first] == wanted[:2] and up_to == wanted[1] and not caught_up
        rest, _, _ = await store.events_of_types(up_to, notify.EVENTS, limit=1000)
        assert [e["id"] for e in rest] == wanted[2:]
        # A bounded span: the log is read in steps, none skipped.
        seen, cursor, caught_up = [], 0, False
        while not caught_up:
            got, cursor, caught_up = await store.events_of_types(cursor, notify.EVENTS, span=3)
            seen += [e["id"] for e in got]
        assert seen == wanted


async def test_without_an_operator_url_only_workflows_with_their_own_url_are_read(
    tmp_path: Path,
) -> None:
    echo = {"name": "e", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    async with running(tmp_path) as (app, client):
        store = app.state.store
        plain = await client.post("/api/workflow", json=echo)
        own = await client.post(
            "/api/workflow", json={**echo, "notify_url": "http://127.0.0.1:9/hook"}
        )
        for resp in (plain, own):
            await wait_for(client, resp.json()["id"])
        events, _, _ = await store.events_of_types(0, notify.EVENTS, with_url_only=True)
        assert {e["workflow_id"] for e in events} == {own.json()["id"]}
        events, _, _ = await store.events_of_types(0, notify.EVENTS)
        assert {e["workflow_id"] for e in events} == {plain.json()["id"], own.json()["id"]}


async def test_a_refused_delivery_is_given_up_at_once_without_connecting(tmp_path: Path) -> None:
    """The operator's URL and a workflow's own (a name resolving to a denied address) obey
    [http] deny; each refused delivery is dead after one attempt, naming address and rule."""
    operator = Receiver(host="127.0.0.2")
    own = Receiver(host="127.0.0.3")
    by_name = f"http://localhost:{own.server.server_address[1]}/hook"
    try:
        async with running(tmp_path, webhook_url=operator.url,
                           http_deny=("127.0.0.2", "127.0.0.0/8")) as (_, client):  # fmt: skip
            await start_gate(client, notify_url=by_name)
            await until(lambda: {r["status"] for r in outbox(tmp_path)} == {"dead"})
    finally:
        operator.close()
        own.close()
    rows = {r["url"]: r for r in outbox(tmp_path)}
    assert set(rows) == {operator.url, by_name}
    assert all(r["attempts"] == 1 for r in rows.values())
    assert rows[operator.url]["last_error"] == (
        "refused by the egress policy: 127.0.0.2 matches [http] deny 127.0.0.2/32"
    )
    assert rows[by_name]["last_error"] == (
        "refused by the egress policy: 127.0.0.1 matches [http] deny 127.0.0.0/8 (from 'localhost')"
    )
    assert operator.connections == 0 and own.connections == 0


async def test_deliveries_obey_the_policy_and_go_out_when_allowed(tmp_path: Path) -> None:
    own = Receiver(host="127.0.0.3")
    try:
        async with running(tmp_path, http_deny=("127.0.0.0/8",),
                           http_allow=("127.0.0.3",)) as (_, client):  # fmt: skip
            await start_gate(client, notify_url=own.url)
            await until(lambda: own.bodies("gate_waiting"))
    finally:
        own.close()
    assert [r["status"] for r in outbox(tmp_path)] == ["sent"]


async def test_one_destinations_backlog_does_not_hide_the_others(tmp_path: Path) -> None:
    """The due-deliveries query picks per destination: a backlog of 500 old deliveries to
    one receiver still leaves room for the operator's and another receiver's."""
    store = backend.open_store(tmp_path / "stepd.db")  # no notifier: nothing is sent anywhere
    await store.open()
    try:
        slow = [{"event_id": i, "workflow_id": 1, "url": "http://slow:81/h",
                 "dest": "http://slow:81", "body_json": "{}"} for i in range(500)]  # fmt: skip
        await store.enqueue_deliveries("test", 0, slow, now=1000)
        others = [
            {"event_id": 1000, "workflow_id": 2, "url": "http://other/h", "dest": "http://other:80",
             "body_json": "{}"},
            {"event_id": 1001, "workflow_id": 2, "url": "http://op/h", "dest": notify.OPERATOR,
             "body_json": "{}"},
        ]  # fmt: skip
        await store.enqueue_deliveries("test", 0, others, now=2000)
        rows = await store.due_deliveries(per_dest=2, per_operator=4, limit=4, now=3000)
        assert [r["dest"] for r in rows] == [
            notify.OPERATOR,
            "http://slow:81",
            "http://slow:81",
            "http://other:80",
        ]
        assert [r["event_id"] for r in rows[1:3]] == [0, 1]  # oldest first
        rows = await store.due_deliveries(per_dest=2, per_operator=4, busy=["http://slow:81"],
                                          limit=4, now=3000)  # fmt: skip
        assert [r["dest"] for r in rows] == [notify.OPERATOR, "http://other:80"]
        rows = await store.due_deliveries(per_dest=2, per_operator=4, now=1500)
        assert [r["dest"] for r in rows] == ["http://slow:81"] * 2  # the others are not due
    finally:
        await store.close()


async def test_a_slow_receiver_delays_only_its_own_deliveries(tmp_path: Path) -> None:
    """Thirty deliveries to a receiver that holds each answer are queued first; the
    operator's URL and another workflow's receiver still get theirs while it holds them,
    and the slow one never has more than PER_DESTINATION requests open."""
    release = threading.Event()
    slow = Receiver(hold=release, delay=5.0)  # answers within 5 s even if never released
    fast, operator = Receiver(), Receiver()
    echo = {"start": {"tool": "echo", "args": {}, "done": True}}
    try:
        async with running(tmp_path, webhook_url=operator.url) as (app, client):
            for _ in range(30):
                body = {"name": "s", "flow": echo, "notify_url": slow.url}
                resp = await client.post("/api/workflow", json=body)
                await wait_for(client, resp.json()["id"])
            await until(lambda: len(outbox(tmp_path)) == 60)
            resp = await client.post("/api/workflow", json={"name": "f", "flow": echo,
                                                             "notify_url": fast.url})  # fmt: skip
            await until(lambda: fast.requests and len(operator.requests) == 31, timeout=20)
            assert slow.answered == 0  # all of that while the slow receiver held its requests
            assert slow.most_open == notify.PER_DESTINATION
            release.set()
            await until(lambda: slow.answered == 30, timeout=20)
    finally:
        release.set()
        for r in (slow, fast, operator):
            r.close()
    assert slow.most_open == notify.PER_DESTINATION
    assert {r["status"] for r in outbox(tmp_path)} == {"sent"}


@pytest.mark.sqlite_only  # SQLite's schema migration
async def test_the_migration_gives_queued_deliveries_their_destination(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "stepd.db")
    for number, script in migrations():
        if number < 5:
            for statement in split_statements(script):
                old.execute(statement)
            old.execute(f"PRAGMA user_version = {number}")
    for i, url in enumerate(["https://Hooks.Example:8443/a/b?c=d", "http://127.0.0.1:9/hook",
                             "http://host.example"]):  # fmt: skip
        old.execute("INSERT INTO outbox (event_id, workflow_id, url, body_json, next_at, "
                    "created_at) VALUES (?, 1, ?, '{}', 0, 0)", (i, url))  # fmt: skip
    old.commit()
    old.close()
    store = Store(tmp_path / "stepd.db")
    await store.open()
    try:
        rows = await store.due_deliveries(per_dest=2, per_operator=4)
    finally:
        await store.close()
    assert sorted(r["dest"] for r in rows) == [
        "http://127.0.0.1:9",
        "http://host.example",
        "https://hooks.example:8443",
    ]


async def test_large_inputs_stay_out_of_deliveries_and_sent_bodies_are_dropped(
    receiver: Receiver, tmp_path: Path
) -> None:
    # A gate looping on itself with a 900 kB input used to store the input again in every
    # delivery, and kept delivered bodies: 173 MB for one workflow in 9 s.
    async with running(tmp_path, webhook_url=receiver.url) as (_, client):
        loop = [{"if": "result == 'stop'", "then": "end"}, {"else": "start"}]  # never stops
        body = {"name": "looper", "input": {"blob": "b" * 900_000},
                "flow": {"start": {"tool": None, "branch": loop},
                         "end": {"tool": "echo", "done": True}}}  # fmt: skip
        wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
        decided: set[int] = set()
        for _ in range(5):
            wf = await wait_for(client, wf_id, lambda w: (waiting_gate(w) or {}).get("id")
                                not in (None, *decided))  # fmt: skip
            gate = waiting_gate(wf)
            assert gate is not None
            decided.add(gate["id"])
            assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 200
        await until(lambda: len(receiver.bodies("gate_waiting")) >= 6, timeout=10)
        first = receiver.bodies()[0]["workflow"]
        assert first["input"] is None and first["input_bytes"] == 900_011
        db = tmp_path / "stepd.db"
        pending = "SELECT count(*) FROM outbox WHERE status = 'pending'"
        await until(lambda: backend.query(db, pending)[0][0] == 0, timeout=10)
        [(stored,)] = backend.query(db, "SELECT sum(length(body_json)) FROM outbox")
        assert stored == 0


async def test_schedule_ticks_are_posted_fired_skipped_and_missed(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with running(tmp_path, webhook_url=receiver.url, webhook_secret=SECRET) as (_, client):
        flow = {"start": {"tool": None, "done": True}}
        resp = await client.post("/api/workflows", json={"definition": {"name": "d", "flow": flow}})
        assert resp.status_code == 201, resp.text
        resp = await client.post(
            "/api/workflows/d/schedules",
            json={"cron_expression": "@yearly", "timezone": "Europe/Paris"},
        )
        sid = resp.json()["schedule_id"]
        fired = (await client.post(f"/api/workflows/schedules/{sid}/trigger")).json()
        skipped = (await client.post(f"/api/workflows/schedules/{sid}/trigger")).json()
        assert (fired["outcome"], skipped["outcome"]) == ("fired", "skipped")
        await until(
            lambda: receiver.bodies("schedule_fired") and receiver.bodies("schedule_skipped")
        )
        (got,) = receiver.bodies("schedule_fired")
        assert got["schedule"]["schedule_id"] == sid and got["workflow"]["id"] == fired["run_id"]
        assert got["tick"]["run_id"] == fired["run_id"] and got["tick"]["kind"] == "trigger"
        (got,) = receiver.bodies("schedule_skipped")
        assert got["schedule"] == {
            "schedule_id": sid,
            "workflow_id": got["schedule"]["workflow_id"],
            "workflow_name": "d",
            "cron_expression": "@yearly",
            "timezone": "Europe/Paris",
        }
        assert got["tick"]["outcome"] == "skipped" and "overlap skip" in got["tick"]["reason"]
        for request in receiver.requests:
            check_signature(request, SECRET.encode())
        # A missed tick: a catch-up window of 0 and the daemon stopped past a fire time.
        resp = await client.post(
            "/api/workflows/d/schedules",
            json={"cron_expression": "* * * * * *", "catchup_window": 0, "overlap": "allow_all"},
        )
        assert resp.status_code == 201
        sid = resp.json()["schedule_id"]
        await client.patch(f"/api/workflows/schedules/{sid}", json={"paused": False})
    await asyncio.sleep(3.5)  # > MIN_CATCHUP_MS past the next fire time
    async with running(tmp_path, webhook_url=receiver.url, webhook_secret=SECRET) as (_, client):
        await until(lambda: receiver.bodies("schedule_missed"), timeout=10)
        got = receiver.bodies("schedule_missed")[0]
        assert got["schedule"]["schedule_id"] == sid and got["tick"]["run_id"] is None
        assert "missed while no daemon ran" in got["tick"]["reason"]
