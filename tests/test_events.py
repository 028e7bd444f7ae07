"""Event streams: every stream gets every event once and in order, however many are open,
whenever they start, and whether or not they keep up (daemon/hub.py, daemon/events.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse

from tests import backend
from tests.helpers import wait_for
from tests.process_helpers import TOKEN, Daemon, free_port, write_config

ECHO = {"name": "once", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}


def chain(name: str) -> dict[str, Any]:
    """Four steps, one of them a short sleep: its events span many commits."""
    return {
        "name": name,
        "flow": {
            "start": {"tool": "echo", "args": {"n": 1}, "next": "b"},
            "b": {"tool": "sleep", "args": {"seconds": 0.4}, "next": "c"},
            "c": {"tool": "echo", "args": {"n": 3}, "next": "d"},
            "d": {"tool": "echo", "args": {"n": 4}, "done": True},
        },
        "input": {},
    }


def start_daemon(tmp: Path) -> Daemon:
    port = free_port()
    config = write_config(tmp / "stepd.toml", port=port, db=tmp / "stepd.db")
    return Daemon(tmp, config, port).started()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    proc = start_daemon(tmp_path_factory.mktemp("events"))
    yield proc
    proc.kill()


def logged_events(db: Path, after: int = 0) -> list[tuple[int, int]]:
    """(id, workflow_id) of the events in the daemon's database, in the log's order: by id
    on SQLite, by commit (then id) on PostgreSQL, where a later commit may hold a smaller id."""
    order = "txid, id" if backend.POSTGRES else "id"
    rows = backend.query(db, f"SELECT id, workflow_id FROM events ORDER BY {order}")
    ids = [(int(i), int(w)) for i, w in rows]
    start = next((n + 1 for n, (i, _) in enumerate(ids) if i == after), 0)
    return ids[start:]


async def read_stream(client: httpx.AsyncClient, path: str, after: int) -> list[dict[str, Any]]:
    """A stream's events until it ends."""
    got: list[dict[str, Any]] = []
    async with aconnect_sse(client, "GET", path, params={"after": after}) as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            event = orjson.loads(sse.data)
            assert sse.event == event["type"] and int(sse.id) == event["id"]
            got.append(event)
    return got


async def test_many_streams_each_receive_every_event_once_in_order(daemon: Daemon):
    db = daemon.workdir / "stepd.db"
    start = ([0] + [i for i, _ in logged_events(db)])[-1]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=daemon.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(20, read=None)) as client:  # fmt: skip
        # All-events streams read until the last event, whose id is known only at the end.
        reached: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        early = [asyncio.create_task(read_until_set(client, start, reached)) for _ in range(40)]
        await asyncio.sleep(0.3)  # subscribed before anything happens
        ids = [(await client.post("/api/workflow", json=chain(f"w{i}"))).json()["id"]
               for i in range(5)]  # fmt: skip
        # Mid-run: these replay the log, then go live while events keep coming.
        await asyncio.sleep(0.25)
        late = [asyncio.create_task(read_until_set(client, start, reached)) for _ in range(6)]
        per_workflow = [
            asyncio.create_task(read_stream(client, f"/api/workflow/{wf}/events", 0))
            for wf in ids
            for _ in range(2)
        ]
        for wf in ids:
            assert (await wait_for(client, wf, timeout=20))["status"] == "completed"
        logged = logged_events(db, start)
        reached.set_result(logged[-1][0])
        await client.post("/api/workflow", json=ECHO)  # a later event: readers look again
        streams = await asyncio.wait_for(asyncio.gather(*early, *late), 30)
        own = await asyncio.wait_for(asyncio.gather(*per_workflow), 30)  # they end by themselves

    expected = [i for i, _ in logged]
    assert len(expected) == 5 * 10  # created, 4 x (started, done), completed
    for got in streams:
        assert [e["id"] for e in got][: len(expected)] == expected
    for n, got in enumerate(own):
        wf = ids[n // 2]
        assert [e["id"] for e in got] == [i for i, w in logged if w == wf]
        assert got[0]["type"] == "created" and got[-1]["type"] == "completed"


async def read_until_set(
    client: httpx.AsyncClient, after: int, reached: asyncio.Future[int]
) -> list[dict[str, Any]]:
    """An all-events stream, read until the event whose id `reached` will hold."""
    got: list[dict[str, Any]] = []
    async with aconnect_sse(client, "GET", "/api/events", params={"after": after}) as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            event = orjson.loads(sse.data)
            assert sse.event == event["type"] and int(sse.id) == event["id"]
            got.append(event)
            if reached.done() and event["id"] >= reached.result():
                break
    return got


async def test_a_stream_that_does_not_read_is_dropped_to_the_log_and_misses_nothing(
    app: Any, client: httpx.AsyncClient
):
    store, hub = app.state.store, app.state.events
    hub.queue_size = 5
    start = await store.max_event_id()
    stream = hub.follow(start)
    first = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.05)
    assert hub.subscribers == 1
    await client.post("/api/workflow", json=ECHO)
    got = [e.id for e in await asyncio.wait_for(first, 10)]
    # Now it stops reading while 10 workflows (40 events) happen.
    for wf in [(await client.post("/api/workflow", json=ECHO)).json()["id"] for _ in range(10)]:
        await wait_for(client, wf)
    assert hub.subscribers == 0  # dropped at 5 queued events, not queuing without bound
    final = await store.max_event_id()
    while got[-1] < final:  # it reads again: from the log, then live
        got += [e.id for e in await asyncio.wait_for(anext(stream), 10)]
    expected = [e["id"] for e in await store.events_after(start, limit=1000)]
    assert got == expected and len(expected) == 11 * 4
    assert hub.subscribers == 1  # live again
    await client.post("/api/workflow", json=ECHO)
    more = [e.type for e in await asyncio.wait_for(anext(stream), 10)]
    assert more[0] == "created"
    await stream.aclose()
    assert hub.subscribers == 0


def test_sigterm_ends_open_streams_instead_of_waiting_for_them(tmp_path: Path):
    daemon = start_daemon(tmp_path)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=daemon.url, headers=headers, timeout=10) as client:
            wf = client.post("/api/workflow", json={**chain("held"), "flow": {
                "start": {"tool": None, "next": "end"},
                "end": {"tool": "echo", "args": {}, "done": True},
            }}).json()["id"]  # fmt: skip
            with client.stream("GET", f"/api/workflow/{wf}/events") as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("event: ")) == (
                    "event: created"
                )
                daemon.signal(signal.SIGTERM)
                rest = list(lines)  # the stream ends cleanly: no error, no hang
        assert not any(line.startswith("event: ") and "completed" in line for line in rest)
        assert daemon.wait(20) == 0
    finally:
        daemon.kill()
    assert "timeout graceful shutdown exceeded" not in daemon.stderr()
