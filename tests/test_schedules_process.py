"""Schedules (spec §11) of real `stepd serve` processes: each tick fires exactly once across
restarts, SIGKILLs at any moment and several daemons on one PostgreSQL database.

Every schedule here fires every second ("* * * * * *", seconds first) with overlap
allow_all, so each of its fire times is a tick that fires (or is missed): what the tests
read back is checked for
- one tick per fire time, and no fire time passed over (the ticks of an every-second
  schedule are every second from its first fire time to its last);
- each fired tick's run exists, is a run of that schedule for that fire time, and no other
  run is: the schedule's runs are as many as its fired ticks;
- a tick missed while no daemon ran is recorded `missed`, with a reason and no run.
Before they are read back the schedules are paused, so the history holds still.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.process_helpers import TOKEN, Daemon, free_port, write_config
from tests.test_multi_daemon import Cluster, cluster  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(90)

EVERY_SECOND = "* * * * * *"
# A tick the scheduler handles at most this late fires whatever its catch-up window (its
# own latency, a start, a takeover): with catchup_window 0, only older ones are missed.
SLACK_S = 2.0


# -- reading what happened ---------------------------------------------------------------


def ms(text: str) -> int:
    """An ISO 8601 time (offset or Z) as epoch milliseconds."""
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def define(client: httpx.Client, name: str) -> int:
    body = {"name": name, "flow": {"start": {"tool": "echo", "args": {"n": 1}, "done": True}}}
    resp = client.post("/api/workflows", json={"definition": body})
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


def add_schedule(client: httpx.Client, def_id: int, **body: Any) -> dict[str, Any]:
    body = {"cron_expression": EVERY_SECOND, "overlap": "allow_all", **body}
    resp = client.post(f"/api/workflows/{def_id}/schedules", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["schedule"]


def set_paused(client: httpx.Client, sid: int, paused: bool) -> dict[str, Any]:
    resp = client.patch(f"/api/workflows/schedules/{sid}", json={"paused": paused})
    assert resp.status_code == 200, resp.text
    assert resp.json()["paused"] is paused
    return resp.json()


def all_ticks(client: httpx.Client, sid: int) -> list[dict[str, Any]]:
    """Every tick of a schedule, oldest fire time first."""
    out: list[dict[str, Any]] = []
    while True:
        resp = client.get(
            f"/api/workflows/schedules/{sid}/ticks", params={"limit": 500, "offset": len(out)}
        )
        assert resp.status_code == 200, resp.text
        page = resp.json()
        out += page["ticks"]
        if not page["ticks"] or len(out) >= page["total"]:
            assert len(out) == page["total"], (len(out), page["total"])
            return sorted(out, key=lambda t: ms(t["fire_time"]))


def tick_count(client: httpx.Client, sid: int, outcome: str | None = None) -> int:
    params: dict[str, Any] = {"limit": 1}
    if outcome:
        params["outcome"] = outcome
    resp = client.get(f"/api/workflows/schedules/{sid}/ticks", params=params)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["total"])


def definition_runs(client: httpx.Client, def_id: int) -> list[int]:
    ids: list[int] = []
    while True:
        resp = client.get(
            f"/api/workflows/{def_id}/runs", params={"limit": 200, "offset": len(ids)}
        )
        assert resp.status_code == 200, resp.text
        page = resp.json()
        ids += [int(r["id"]) for r in page["runs"]]
        if not page["runs"] or len(ids) >= page["total"]:
            assert len(set(ids)) == len(ids) == page["total"], (len(ids), page["total"])
            return ids


def run_schedules(client: httpx.Client, run_ids: list[int]) -> dict[int, tuple[int, int]]:
    """Each run's (schedule id, fire time in ms), from GET /api/workflow/{id}."""
    out = {}
    for run_id in run_ids:
        resp = client.get(f"/api/workflow/{run_id}")
        assert resp.status_code == 200, resp.text
        wf = resp.json()
        assert wf["schedule"] is not None, f"run {run_id} has no schedule: {wf}"
        out[run_id] = (int(wf["schedule"]["schedule_id"]), ms(wf["schedule"]["fire_time"]))
    return out


def check_exactly_once(
    client: httpx.Client,
    def_ids: list[int],
    firsts: dict[int, str],
    *,
    step_s: int = 1,
    context: Callable[[], str] = str,
) -> dict[int, list[dict[str, Any]]]:
    """The invariants of the module docstring, for schedules {sid: first next_run} of the
    definitions `def_ids` (which have no other runs); every schedule's ticks by sid."""
    runs = run_schedules(client, [r for d in def_ids for r in definition_runs(client, d)])
    per_key = Counter(runs.values())
    twice = {key: n for key, n in per_key.items() if n > 1}
    assert not twice, f"several runs for one (schedule, fire time): {twice}\n{context()}"
    by_sid: dict[int, list[dict[str, Any]]] = {}
    for sid, first in firsts.items():
        ticks = all_ticks(client, sid)
        by_sid[sid] = ticks
        assert ticks, f"schedule {sid} never ticked\n{context()}"
        assert all(t["kind"] == "cron" for t in ticks), ticks
        times = [ms(t["fire_time"]) for t in ticks]
        assert len(set(times)) == len(times), f"schedule {sid}: a fire time twice: {ticks}"
        assert times[0] == ms(first), f"schedule {sid}: first tick {ticks[0]}, not at {first}"
        gaps = [(a, b) for a, b in zip(times, times[1:], strict=False) if b - a != step_s * 1000]
        assert not gaps, f"schedule {sid}: fire times passed over: {gaps}\n{context()}"
        fired = [t for t in ticks if t["outcome"] == "fired"]
        for t in ticks:
            assert t["outcome"] in ("fired", "missed"), (sid, t)
            if t["outcome"] == "missed":
                assert t["run_id"] is None and t["reason"], t
                continue
            run_id = t["run_id"]
            assert run_id in runs, f"tick {t} of schedule {sid}: its run is not a run"
            assert runs[run_id] == (sid, ms(t["fire_time"])), (t, runs[run_id])
        mine = [r for r, (s, _) in runs.items() if s == sid]
        assert len(mine) == len(fired), (
            f"schedule {sid}: {len(mine)} runs for {len(fired)} fired ticks\n{context()}"
        )
        assert {t["run_id"] for t in fired} == set(mine)
    assert {s for s, _ in runs.values()} <= set(firsts), "a run of an unknown schedule"
    return by_sid


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def sleep_to_second(offset: float) -> float:
    """Sleep until `offset` seconds past the next whole second of the wall clock; that
    whole second (epoch seconds)."""
    now = time.time()
    target = int(now) + 1
    if target + offset <= now + 0.05:
        target += 1
    time.sleep(target + offset - time.time())
    return float(target)


# -- one daemon ------------------------------------------------------------------------


class Proc(Daemon):
    """A daemon whose clients are closed with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clients: list[httpx.Client] = []

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        self.clients.append(super().client(token))
        return self.clients[-1]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Proc]:
    port = free_port()
    cfg = write_config(tmp_path / "stepd.toml", port=port, db=tmp_path / "stepd.db")
    d = Proc(tmp_path, cfg, port)
    try:
        yield d.started(timeout=20)  # type: ignore[misc]
    finally:
        for client in d.clients:
            client.close()
        d.kill()


def history(d: Daemon) -> Callable[[], str]:
    """Every run's stderr of a daemon (for failure messages)."""

    def logs() -> str:
        parts = []
        for i in range(1, d.runs + 1):
            err = d.workdir / f"run{i}.err"
            text = err.read_text(errors="replace") if err.exists() else ""
            parts.append(f"--- run {i} stderr ---\n{text[-2500:]}")
        return "\n".join(parts)

    return logs


def test_a_restart_fires_each_tick_once(daemon: Proc) -> None:
    c = daemon.client()
    def_id = define(c, "every-second")
    made = add_schedule(c, def_id)
    sid = made["schedule_id"]
    wait_until(lambda: tick_count(c, sid) >= 3, 6, "three ticks")
    assert daemon.stop() == 0, daemon.stderr()
    stopped = time.time()
    daemon.started(timeout=20)
    c = daemon.client()
    # It goes on, the second it was down included (catch-up, default window 60 s).
    wait_until(
        lambda: any(ms(t["fire_time"]) > stopped * 1000 + 2000 for t in all_ticks(c, sid)),
        8,
        "ticks after the restart",
    )
    set_paused(c, sid, True)
    ticks = check_exactly_once(c, [def_id], {sid: made["next_run"]}, context=history(daemon))[sid]
    assert all(t["outcome"] == "fired" for t in ticks), ticks
    assert len(ticks) >= 5


def test_sigkill_around_ticks_loses_and_repeats_none(daemon: Proc) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    c = daemon.client()
    def_id = define(c, "every-second")
    # A catch-up window wide enough for every restart: each tick fires, late or not.
    made = add_schedule(c, def_id, catchup_window=3600)
    sid = made["schedule_id"]
    kills = []
    wait_until(lambda: tick_count(c, sid) >= 2, 6, "two ticks")
    for _ in range(5):
        # Within a second of a tick: from just before its fire time to half a second after
        # (the first kill of a start may fall in its catch-up of the ticks of the down time).
        offset = rng.uniform(-0.3, 0.5)
        second = sleep_to_second(offset)
        daemon.kill()
        kills.append((second, round(offset, 3)))
        daemon.started(timeout=20)
        c = daemon.client()
    seen = tick_count(c, sid)
    wait_until(lambda: tick_count(c, sid) > seen + 1, 5, "ticks after the last start")
    set_paused(c, sid, True)

    def context() -> str:
        return f"seed {seed}, kills (second, offset) {kills}\n{history(daemon)()}"

    ticks = check_exactly_once(c, [def_id], {sid: made["next_run"]}, context=context)[sid]
    assert all(t["outcome"] == "fired" for t in ticks), (ticks, context())


def test_ticks_missed_while_down_fire_within_the_catchup_window_only(daemon: Proc) -> None:
    c = daemon.client()
    def_id = define(c, "every-second")
    wide = add_schedule(c, def_id, catchup_window=3600)
    none = add_schedule(c, def_id, catchup_window=0)
    wait_until(
        lambda: min(tick_count(c, wide["schedule_id"]), tick_count(c, none["schedule_id"])) >= 2,
        6,
        "ticks of both",
    )
    daemon.kill()
    down = time.time()
    time.sleep(5)
    up = time.time()
    daemon.started(timeout=20)
    healthy = time.time()  # the scheduler's first pass is about now
    c = daemon.client()
    wait_until(
        lambda: any(
            ms(t["fire_time"]) > healthy * 1000 + 1000 for t in all_ticks(c, none["schedule_id"])
        ),
        8,
        "ticks after the start",
    )
    for s in (wide, none):
        set_paused(c, s["schedule_id"], True)
    firsts = {s["schedule_id"]: s["next_run"] for s in (wide, none)}
    by_sid = check_exactly_once(c, [def_id], firsts, context=history(daemon))
    # The wide window: every tick of the 5 s down fired on the start.
    late = [t for t in by_sid[wide["schedule_id"]] if down * 1000 < ms(t["fire_time"]) < up * 1000]
    assert len(late) >= 3 and all(t["outcome"] == "fired" for t in late), late
    assert all(t["outcome"] == "fired" for t in by_sid[wide["schedule_id"]])
    # catchup_window 0: a tick is missed only when it was handled late, past the
    # scheduler's own slack (SLACK_S): those of the down time and of the daemon's start,
    # recorded with a reason and no run. The ticks handled while the daemon ran fired.
    ticks = by_sid[none["schedule_id"]]
    for t in ticks:
        if t["outcome"] == "missed":
            assert t["run_id"] is None
            assert t["reason"] == "missed while no daemon ran (catchup_window 0 s)", t
            assert ms(t["recorded_at"]) - ms(t["fire_time"]) > 1000, f"missed on time: {t}"
            assert down * 1000 - 1000 < ms(t["fire_time"]) < healthy * 1000, (t, down, healthy)
    gone = [t for t in ticks if down * 1000 < ms(t["fire_time"]) < (up - SLACK_S) * 1000]
    assert len(gone) >= 2 and all(t["outcome"] == "missed" for t in gone), (gone, ticks)
    assert any(t["outcome"] == "fired" for t in ticks if ms(t["fire_time"]) < down * 1000), ticks
    assert any(t["outcome"] == "fired" for t in ticks if ms(t["fire_time"]) > healthy * 1000), ticks


def test_unpausing_never_fires_the_paused_time(daemon: Proc) -> None:
    c = daemon.client()
    def_id = define(c, "every-second")
    made = add_schedule(c, def_id, catchup_window=3600)
    sid = made["schedule_id"]
    wait_until(lambda: tick_count(c, sid) >= 2, 6, "two ticks")
    set_paused(c, sid, True)
    paused = time.time()
    before = all_ticks(c, sid)
    # Paused for ~4 s, a restart in the middle: its catch-up does not fire them either.
    time.sleep(1)
    assert daemon.stop() == 0, daemon.stderr()
    time.sleep(1)
    daemon.started(timeout=20)
    c = daemon.client()
    time.sleep(1.5)
    assert all_ticks(c, sid) == before, "a paused schedule ticked"
    unpausing = time.time()
    resumed = set_paused(c, sid, False)
    assert ms(resumed["next_run"]) > unpausing * 1000
    wait_until(lambda: tick_count(c, sid) >= len(before) + 2, 5, "ticks after the unpause")
    set_paused(c, sid, True)
    ticks = all_ticks(c, sid)
    inside = [t for t in ticks if paused * 1000 < ms(t["fire_time"]) <= unpausing * 1000]
    assert not inside, f"ticks of the paused time: {inside}\n{history(daemon)()}"
    assert all(t["outcome"] == "fired" for t in ticks), ticks
    times = [ms(t["fire_time"]) for t in ticks]
    assert len(set(times)) == len(times)
    runs = run_schedules(c, definition_runs(c, def_id))
    assert sorted(runs.values()) == [(sid, ms(t["fire_time"])) for t in ticks]


def test_a_backfill_does_not_run_a_fire_time_again(daemon: Proc) -> None:
    """The run's idempotency key is the schedule and the fire time (spec §11): a backfill
    over fire times the schedule has fired already starts no second run for them."""
    c = daemon.client()
    def_id = define(c, "every-second")
    made = add_schedule(c, def_id)
    sid = made["schedule_id"]
    wait_until(lambda: tick_count(c, sid) >= 3, 6, "three ticks")
    set_paused(c, sid, True)
    ticks = all_ticks(c, sid)
    window = {"start": ticks[0]["fire_time"], "end": ticks[-1]["fire_time"], "overlap": "allow_all"}
    resp = c.post(f"/api/workflows/schedules/{sid}/backfill", json=window)
    assert resp.status_code == 202, resp.text
    runs = run_schedules(c, definition_runs(c, def_id))
    twice = {key: n for key, n in Counter(runs.values()).items() if n > 1}
    assert not twice, f"backfill {resp.json()}: several runs for one (schedule, fire time): {twice}"


# -- several daemons on one PostgreSQL database ------------------------------------------


def fired_here(d: Daemon) -> float:
    """The daemon's stepd_schedule_ticks_total{outcome="fired"}: ticks it fired itself."""
    resp = httpx.get(f"{d.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200, resp.text
    for line in resp.text.splitlines():
        if line.startswith('stepd_schedule_ticks_total{outcome="fired"}'):
            return float(line.split()[-1])
    raise AssertionError("no stepd_schedule_ticks_total in /metrics")


def leader(c: Cluster, alive: list[str]) -> str:
    """The daemon whose fired ticks go up (the one holding the scheduler's lock)."""
    before = {n: fired_here(c[n]) for n in alive}
    deadline = time.monotonic() + 5
    while True:
        time.sleep(0.3)
        grew = [n for n in alive if fired_here(c[n]) > before[n]]
        if len(grew) == 1:
            return grew[0]
        assert not grew[1:], f"several daemons fire ticks at once: {grew}"
        assert time.monotonic() < deadline, f"no daemon fires ticks\n{c.logs()}"


@pytest.mark.postgresql_only
@pytest.mark.timeout(120)
def test_several_daemons_fire_each_tick_once_and_take_over_from_a_killed_leader(
    cluster: Callable[..., Cluster],  # noqa: F811
) -> None:
    c = cluster()
    alive = ["a", "b", "c"]
    client = c["a"].client()
    c.clients.append(client)
    def_ids = [define(client, f"fleet-{i}") for i in range(4)]
    made = [add_schedule(client, def_ids[i % 4]) for i in range(20)]
    firsts = {s["schedule_id"]: s["next_run"] for s in made}
    kills: list[tuple[str, float]] = []
    for _ in range(2):  # the leader, then the one that took over from it
        time.sleep(1.5)
        lead = leader(c, alive)
        offset = random.uniform(-0.2, 0.5)
        sleep_to_second(offset)
        c[lead].kill()
        kills.append((lead, time.time()))
        alive.remove(lead)
    time.sleep(2.5)
    (last,) = alive
    client = c[last].client()
    c.clients.append(client)
    for sid in firsts:
        set_paused(client, sid, True)

    def context() -> str:
        return f"kills {kills}\n{c.logs()}"

    by_sid = check_exactly_once(client, def_ids, firsts, context=context)
    # Takeover: from a kill to the first tick recorded after it; and no tick waited long.
    report = []
    for name, at in kills:
        after = [ms(t["recorded_at"]) for ts in by_sid.values() for t in ts]
        first = min(r for r in after if r > at * 1000)
        report.append((name, round(first / 1000 - at, 3)))
    lags = [ms(t["recorded_at"]) - ms(t["fire_time"]) for ts in by_sid.values() for t in ts]
    print(f"takeover after a kill (daemon, s): {report}; longest tick lag {max(lags)} ms")
    assert all(t["outcome"] == "fired" for ts in by_sid.values() for t in ts), context()
    assert all(s < 3.0 for _, s in report), (report, context())
    assert max(lags) < 4000, (max(lags), context())
    assert sum(len(ts) for ts in by_sid.values()) >= 20 * 6
