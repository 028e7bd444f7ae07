"""Several daemons on one PostgreSQL database: three real `stepd serve` processes.

They share one database and one state directory (so the chaos tools' execution record,
tests/chaos_tools.py, counts every execution whichever daemon ran it). Each is told its
name in STEPD_TEST_NODE, which the tools of tests/multi_tools.py put in their results.

What is proved here, each over real HTTP against real processes:
- a step created through one daemon starts on another that is free, at once (NOTIFY), not
  at the next poll;
- an event stream on one daemon shows every event the others write, in the log's order;
- each webhook goes out once, whichever daemon sends it;
- a daemon SIGKILLed mid-step: the others finish its workflows once its lease runs out,
  and a step that is not idempotent waits for a decision instead of running twice;
- a killed daemon restarted under the same node_id takes its own steps back at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon.auth import hash_token
from tests import backend
from tests.chaos_tools import executions
from tests.process_helpers import TOKEN, Daemon, create, free_port, wait_for
from tests.test_notify import Receiver

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[1]
APPROVER = "tok-multi-ann"
NAMES = ("a", "b", "c")


def write_config(
    path: Path,
    *,
    port: int,
    url: str,
    node: str,
    poll_interval: float,
    lease_s: float,
    concurrency: int,
    webhook_url: str = "",
) -> Path:
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f'node_id = "{node}"',
        "",
        "[database]",
        f'url = "{url}"',
        "",
        "[executor]",
        f"poll_interval = {poll_interval}",
        f"lease_s = {lease_s}",
        f"concurrency = {concurrency}",
        f"max_running_per_token = {concurrency}",
        "shutdown_grace = 1.0",
        "",
        "[tools]",
        'modules = ["tests.chaos_tools", "tests.multi_tools"]',
        "",
    ]
    if webhook_url:
        lines += ["[webhooks]", f'url = "{webhook_url}"', 'secret = "multi-secret"', ""]
    for name, token, perm in (("james", TOKEN, "workflow"), ("ann", APPROVER, "approve")):
        lines += ["[[auth.tokens]]", f'name = "{name}"', f'sha256 = "{hash_token(token)}"',
                  f'permissions = ["{perm}"]', ""]  # fmt: skip
    path.write_text("\n".join(lines))
    return path


class Cluster:
    """Three daemons (a, b, c) on one database, sharing one state directory."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        poll_interval: float = 5.0,
        lease_s: float = 30.0,
        concurrency: dict[str, int] | None = None,
        webhook_url: str = "",
    ) -> None:
        # A database of the test's own on the session's server (tests/backend.py).
        self.url = backend.database_url(tmp_path / "multi.db")
        assert self.url.startswith("postgresql://"), self.url
        self.state = tmp_path / "state"
        self.state.mkdir()
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.daemons: dict[str, Daemon] = {}
        self.clients: list[httpx.Client] = []  # closed with the cluster
        for name in NAMES:
            workdir = tmp_path / name
            workdir.mkdir()
            port = free_port()
            cfg = write_config(
                workdir / "stepd.toml", port=port, url=self.url, node=name,
                poll_interval=poll_interval, lease_s=lease_s,
                concurrency=(concurrency or {}).get(name, 4), webhook_url=webhook_url,
            )  # fmt: skip
            daemon = Daemon(workdir, cfg, port, PYTHONPATH=pythonpath, STEPD_TEST_NODE=name)
            daemon.env["STATE_DIRECTORY"] = str(self.state)  # shared: chaos.db, secrets
            self.daemons[name] = daemon

    def __getitem__(self, name: str) -> Daemon:
        return self.daemons[name]

    def start(self, names: str | tuple[str, ...] = NAMES) -> Cluster:
        # One at a time: the first migrates the database.
        for name in names:
            self.daemons[name].started(timeout=30)
        return self

    def kill(self) -> None:
        for client in self.clients:
            client.close()
        for daemon in self.daemons.values():
            daemon.kill()

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (run {d.runs}) stderr ---\n{d.stderr()[-3000:]}"
            for name, d in self.daemons.items()
        )

    def executions(self) -> list[tuple[str, int, str, int]]:
        return executions(self.state)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def build(start: str | tuple[str, ...] = NAMES, **kwargs: Any) -> Cluster:
        made.append(Cluster(tmp_path, **kwargs))
        return made[-1].start(start)

    yield build
    for c in made:
        c.kill()


def flow(*states: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """A linear flow of (step name, tool, args); the first state is `start`."""
    keys = ["start", *(name for name, _, _ in states[1:])]
    out: dict[str, Any] = {}
    for i, (name, tool, args) in enumerate(states):
        out[keys[i]] = {"name": name, "tool": tool, "args": args}
        if i + 1 < len(states):
            out[keys[i]]["next"] = keys[i + 1]
        else:
            out[keys[i]]["done"] = True
    return {"name": "multi", "flow": out, "input": {}}


def result(step: dict[str, Any]) -> Any:
    return orjson.loads(step["result_json"]) if step.get("result_json") else None


def awaiting_decision(wf: dict[str, Any]) -> bool:
    return any(s.get("awaiting") == "decision" for s in wf["steps"])


def linger_running(c: Cluster, key_count: int, tool: str = "linger") -> None:
    """Until `key_count` first attempts of `tool` have recorded their start."""
    deadline = time.monotonic() + 15
    while sum(1 for _, att, t, _ in c.executions() if att == 1 and t.startswith(tool)) < key_count:
        assert time.monotonic() < deadline, f"{tool} did not start:\n{c.logs()}"
        time.sleep(0.05)


# -- wake-ups ---------------------------------------------------------------------------


def test_a_step_created_on_a_busy_daemon_starts_on_a_free_one_at_once(
    cluster: Callable[..., Cluster],
) -> None:
    # Polls 5 s apart: a start within a second is the NOTIFY's doing, not a poll's.
    c = cluster(poll_interval=5.0, concurrency={"a": 1})
    a = c["a"].client()
    c.clients.append(a)
    # a's one slot is taken: what is created through a cannot start there.
    busy = create(a, flow(("nap", "linger", {"seconds": 60})))
    wait_for(a, busy, lambda wf: wf["steps"] and wf["steps"][0]["status"] == "running")
    delays, nodes = [], []
    for i in range(6):
        time.sleep(0.3 + 0.4 * i)  # at different points of the pollers' cycles
        sent = time.time_ns()
        wf_id = create(a, flow(("where", "whereami", {"i": i})))
        wf = wait_for(a, wf_id, timeout=15)
        assert wf["status"] == "completed", (wf, c.logs())
        out = result(wf["steps"][0])
        delays.append((out["start_ns"] - sent) / 1e6)
        nodes.append(out["node"])
    assert set(nodes) <= {"b", "c"}, nodes
    # Well before the next poll (5 s); typically a few ms.
    assert max(delays) < 1000, (delays, c.logs())


# -- event streams ----------------------------------------------------------------------


class Follower(threading.Thread):
    """Reads /api/events of one daemon into `events` until `done(events)` holds."""

    def __init__(self, daemon: Daemon, done: Callable[[list[dict[str, Any]]], bool],
                 after: int = 0) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.done = done
        self.after = after
        self.events: list[dict[str, Any]] = []
        self.listening = threading.Event()
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            timeout = httpx.Timeout(5.0, read=30.0)
            with (
                self.daemon_.client() as client,
                client.stream(
                    "GET", "/api/events", params={"after": self.after}, timeout=timeout
                ) as resp,
            ):
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    self.listening.set()
                    if line.startswith("data:"):
                        self.events.append(orjson.loads(line[5:]))
                        if self.done(self.events):
                            return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.listening.set()
            self.finished.set()

    def result(self, timeout: float) -> list[dict[str, Any]]:
        assert self.finished.wait(timeout), f"stream incomplete: {len(self.events)} events"
        if self.error is not None:
            raise self.error
        return self.events


def completed(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: sum(e["type"] == "completed" for e in events) >= n


def test_a_stream_on_one_daemon_shows_every_daemons_events_in_order(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(poll_interval=1.0)
    workflows = 40
    live = Follower(c["b"], completed(workflows))
    live.start()
    assert live.listening.wait(10)
    time.sleep(0.5)  # subscribed (and anything before is replayed anyway: after=0)
    body = flow(("one", "echo", {"x": 1}), ("two", "whereami", {"y": "<<result.x>>"}))
    # Created through a, from several threads at once: the steps run on all three, and
    # their transactions commit out of id order.
    with ThreadPoolExecutor(8) as pool, c["a"].client() as a:
        ids = list(pool.map(lambda _: create(a, body), range(workflows)))
    seen = live.result(60)
    # The log read afresh (a replay from the start, on a third daemon) is the reference.
    replay = Follower(c["c"], completed(workflows))
    replay.start()
    reference = replay.result(30)
    seen_ids = [e["id"] for e in seen]
    assert len(seen_ids) == len(set(seen_ids)), "an event sent twice"
    assert sorted(seen_ids) == sorted(e["id"] for e in reference), "events missing on b"
    assert seen_ids == [e["id"] for e in reference], "b's order is not the log's"
    by_wf: dict[int, list[str]] = {}
    for e in seen:
        by_wf.setdefault(e["workflow_id"], []).append(e["type"])
    assert set(by_wf) == set(ids)
    for types in by_wf.values():
        assert types[0] == "created" and types[-1] == "completed", types
        assert Counter(types)["step_started"] == 2 and Counter(types)["step_done"] == 2, types
    nodes = set()
    with c["b"].client() as b:
        for wf_id in ids:
            nodes.add(result(b.get(f"/api/workflow/{wf_id}").json()["steps"][1])["node"])
    assert len(nodes) >= 2, f"every step ran on {nodes}: the test shows less than it should"


# -- webhooks ---------------------------------------------------------------------------


def test_each_webhook_is_delivered_once_by_one_of_the_daemons(
    cluster: Callable[..., Cluster],
) -> None:
    receiver = Receiver()
    try:
        c = cluster(poll_interval=1.0, webhook_url=receiver.url)
        body = flow(("one", "whereami", {}))
        clients = [c[name].client() for name in NAMES]
        try:
            with ThreadPoolExecutor(6) as pool:
                ids = list(pool.map(lambda i: create(clients[i % 3], body), range(30)))
            wait_for(clients[1], ids[-1])
            deadline = time.monotonic() + 30
            while len(receiver.bodies("completed")) < len(ids):
                assert time.monotonic() < deadline, (len(receiver.requests), c.logs())
                time.sleep(0.05)
            time.sleep(3)  # a second delivery of any of them would come by now
        finally:
            for client in clients:
                client.close()
        bodies = receiver.bodies()
        per_event = Counter(b["event_id"] for b in bodies)
        assert max(per_event.values()) == 1, [e for e, n in per_event.items() if n > 1]
        assert sorted(b["workflow"]["id"] for b in bodies) == sorted(ids)
        deliveries = [r["headers"]["X-Stepd-Delivery"] for r in receiver.requests]
        assert len(deliveries) == len(set(deliveries)) == len(ids)
    finally:
        receiver.close()


# -- a daemon killed mid-step -----------------------------------------------------------


def test_the_others_finish_a_killed_daemons_workflows_after_its_lease(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(poll_interval=0.5, lease_s=2.0)
    with c["a"].client() as a:
        ids = [create(a, flow(("nap", "linger", {"seconds": 60}), ("after", "whereami", {})))
               for _ in range(3)]  # fmt: skip
    linger_running(c, 3)
    # Handed off to a (it was free): a runs all three.
    assert {t for _, _, t, _ in c.executions()} == {"linger@a"}
    time.sleep(1.5)  # a renews its leases meanwhile: nobody takes them yet
    assert len(c.executions()) == 3
    killed = time.monotonic()
    c["a"].signal(signal.SIGKILL)
    c["a"].wait(5)
    with c["b"].client() as b:
        for wf_id in ids:
            wf = wait_for(b, wf_id, timeout=20)
            assert wf["status"] == "completed", (wf, c.logs())
            assert result(wf["steps"][0])["node"] in {"b", "c"}
            assert wf["steps"][0]["attempt"] == 2
    took = time.monotonic() - killed
    # Not before a's lease ran out (renewed every 2/3 s, for 2 s), and soon after it.
    assert 1.0 < took < 10, took
    runs = Counter((key, attempt) for key, attempt, _, _ in c.executions())
    assert sorted(attempt for _, attempt in runs) == [1, 1, 1, 2, 2, 2], runs
    assert max(runs.values()) == 1, runs


def test_a_step_that_is_not_idempotent_waits_for_a_decision_instead_of_running_twice(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(poll_interval=0.5, lease_s=2.0)
    with c["a"].client() as a:
        wf_id = create(a, flow(("charge", "linger_charge", {"seconds": 60}),
                               ("after", "whereami", {})))  # fmt: skip
    linger_running(c, 1, "linger_charge")
    c["a"].signal(signal.SIGKILL)
    c["a"].wait(5)
    with c["b"].client() as b, c["c"].client(APPROVER) as approver:
        wf = wait_for(b, wf_id, awaiting_decision, timeout=20)
        step = wf["steps"][0]
        assert step["awaiting"] == "decision" and wf["status"] == "running", wf
        time.sleep(3)  # more than a lease and several polls: still nobody runs it again
        assert [(att, t) for _, att, t, _ in c.executions()] == [(1, "linger_charge@a")]
        assert awaiting_decision(b.get(f"/api/workflow/{wf_id}").json())
        # A person decides to run it again: now it runs a second time, and once only.
        resp = approver.post(f"/api/workflow/{step['id']}/retry", json={})
        assert resp.status_code == 200, resp.text
        wf = wait_for(b, wf_id, timeout=20)
        assert wf["status"] == "completed", (wf, c.logs())
    attempts = sorted(att for _, att, _, _ in c.executions())
    assert attempts == [1, 2], c.executions()


def test_a_restarted_daemon_takes_back_its_own_steps_at_once(
    cluster: Callable[..., Cluster],
) -> None:
    # A lease far longer than the test: only a's own start-up recovery can take them back.
    c = cluster(poll_interval=1.0, lease_s=60.0)
    with c["a"].client() as a:
        ids = [create(a, flow(("nap", "linger", {"seconds": 120}), ("after", "whereami", {})))
               for _ in range(2)]  # fmt: skip
    linger_running(c, 2)
    c["a"].signal(signal.SIGKILL)
    c["a"].wait(5)
    time.sleep(2)  # b and c leave a's steps alone: their lease has not run out
    assert len(c.executions()) == 2
    restarted = time.monotonic()
    c["a"].started(timeout=30)
    with c["a"].client() as a:
        for wf_id in ids:
            wf = wait_for(a, wf_id, timeout=20)
            assert wf["status"] == "completed", (wf, c.logs())
            assert wf["steps"][0]["attempt"] == 2
    took = time.monotonic() - restarted
    assert took < 15, took  # far less than the 60 s lease
    assert sorted(att for _, att, _, _ in c.executions()) == [1, 1, 2, 2]


def test_a_long_step_keeps_its_lease_between_polls(cluster: Callable[..., Cluster]) -> None:
    # Leases of 2 s, polls 5 s apart: the renewals must not wait for the poll, or another
    # daemon would take a step that is still running and run it a second time. b and c
    # start while it runs, so their first look at the leases is off a's poll cycle.
    c = cluster(poll_interval=5.0, lease_s=2.0, start="a")
    with c["a"].client() as a:
        wf_id = create(a, flow(("nap", "linger", {"seconds": 8}), ("after", "whereami", {})))
        linger_running(c, 1)
        time.sleep(1.0)
        c.start("bc")
        wf = wait_for(a, wf_id, timeout=20)
    assert wf["status"] == "completed", (wf, c.logs())
    assert [(att, t) for _, att, t, _ in c.executions()] == [(1, "linger@a")], c.logs()
    assert wf["steps"][0]["attempt"] == 1, wf
