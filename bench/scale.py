"""Scale: poll cost, API latency and memory of stepd as its database grows.

    python bench/scale.py [--quick] [--json PATH]

For databases holding 0, 100k and 1M finished steps (--quick: 0 and 100k), each
seeded in seconds with raw sqlite3 (bench/scale_seed.py):

  poll cost    in-process, the store calls the executor makes on every tick
               (`claim_steps(128)` with nothing runnable, `expired_gates`, `interrupted`,
               `next_due`, and `has_due` where the store has it) and a claim of a small
               runnable backlog, alone and queued behind 10,000 due steps of another
               token that is at its share of the run slots; p50/p95 in us
  API latency  a real `stepd serve` per database over loopback HTTP, keep-alive: create
               (a one-state echo flow), get an old finished workflow and a new one, list
               (default page and ?status=completed); p50/p95 in ms, and each p50's ratio
               to the empty database's (target: within +-20 %)
  idle cost    each daemon's CPU per second and RSS while idle

Sizes are measured side by side, not one after the other: every sample visits each
database in a shuffled order, so load from elsewhere on a shared machine falls on
all sizes alike; and the measured side runs on one CPU, the client on the other
(see `Cpus`). Then the resident memory (VmRSS, and the peak VmHWM) of a fresh
`stepd serve`: idle, with 10,000 waiting approval gates, and, another one, after a
burst of 2,000 two-step echo workflows (targets: idle <= 60 MB, <= 150 MB with
10k gates; figures in MiB).

Everything runs on loopback in a temporary directory; every daemon started here
is killed on exit, also when this script is interrupted or killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # scale_seed and bench_tools, however this is started

from common import CLAIM_BATCH, CONCURRENCY, TOKEN, bench_env, free_port, write_config  # noqa: E402
from scale_seed import Seeded, seed  # noqa: E402

from daemon.storage import now_ms  # noqa: E402
from daemon.storage.sqlite.store import SqliteStore as Store  # noqa: E402

BACKLOG = 32  # runnable steps for the "claim with a backlog" figure
HELD = 10_000  # due steps of a token at its share, queued before that backlog
SHARE = CONCURRENCY  # [executor] max_running_per_token of the bench daemons (common.py)
FLAT_TOLERANCE = 0.20  # target: every p50 within +-20 % of the empty database's
TARGET_IDLE_MIB = 60.0
TARGET_GATES_MIB = 150.0
GATES = 10_000
IDLE_CPU_S = 5.0  # how long the idle daemons' CPU use is watched
BURST = 2_000

ECHO_ONE = {"name": "scale", "flow": {"start": {"tool": "echo", "args": {"x": 1}, "done": True}}}
ECHO_TWO = {
    "name": "burst",
    "flow": {
        "start": {"tool": "echo", "args": {"n": "<<input.n>>"}, "next": "second"},
        "second": {"tool": "echo", "args": {"prev": "<<result.n>>"}, "done": True},
    },
}
GATE = {
    "name": "gated",
    "flow": {
        "start": {"name": "await_approval", "tool": None, "next": "write"},
        "write": {"tool": "echo", "args": {"title": "<<input.title>>"}, "done": True},
    },
}


# -- statistics and labels -----------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): a value that was actually measured."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def size_label(steps: int) -> str:
    """0, 100k, 1m: short and usable inside JSON keys."""
    if steps >= 1_000_000 and steps % 1_000_000 == 0:
        return f"{steps // 1_000_000}m"
    if steps >= 1_000 and steps % 1_000 == 0:
        return f"{steps // 1_000}k"
    return str(steps)


# -- child processes -------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it if this script dies, even by -9."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Cpus:
    """Where the measured code and the load generator run (None: wherever the kernel likes).

    aiosqlite runs each SQLite connection in a thread of its own, so every query is
    two thread hops; on this VM a hop to a thread the kernel put on the other CPU
    was seen to cost ~250 us more, depending on nothing but where each thread
    landed: three identical stores in one process measured 70 us and 320 us per
    read. Pinning the daemon (or the in-process store) to one CPU and the client to
    another takes that coin flip out of the comparison between database sizes.
    """

    server: set[int] | None
    client: set[int] | None

    @staticmethod
    def choose(pin: bool) -> Cpus:
        allowed = sorted(os.sched_getaffinity(0))
        if not pin or len(allowed) < 2:
            return Cpus(None, None)
        return Cpus({allowed[-1]}, {allowed[0]})


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run this thread (and the threads and processes it starts) on `cpus` for a while."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _kill_children() -> None:
    for proc in _children:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    _children.clear()


def _on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM/SIGHUP end the run like Ctrl-C: the finally blocks stop the daemons."""
    raise SystemExit(128 + signum)


@dataclass
class Daemon:
    """A running `stepd serve` on its own port and database."""

    proc: subprocess.Popen[bytes]
    port: int
    db: Path
    log: Path
    startup_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def memory_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the daemon process in MiB, from /proc/PID/status."""
        fields: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_ns(self) -> int:
        """CPU time the daemon's threads have used so far (schedstat: ns, not 10 ms ticks)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
        return total


@contextlib.contextmanager
def daemon(
    workdir: Path, db: Path, *, cpus: set[int] | None = None, start_timeout: float = 120.0
) -> Iterator[Daemon]:
    """Start `stepd serve` on `db` (1 s poll, a bench token) and stop it afterwards.

    The settings of every other benchmark (bench/common.py), so the figures compare. It is this
    interpreter's `-m daemon`, so the daemon imported is the one this script sees.
    """
    port = free_port()
    config = write_config(workdir, port, concurrency=64, db=db)
    log = workdir / f"stepd-{port}.log"
    env = bench_env()
    t0 = time.perf_counter()
    with log.open("wb") as out, pinned(cpus):  # the child inherits the affinity
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
    _children.append(proc)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stepd exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stepd did not answer /healthz in {start_timeout:.0f}s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.02)
        yield Daemon(proc, port, db, log, time.perf_counter() - t0)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _children.remove(proc)


def count(db: Path, sql: str) -> int:
    """One number from the database, read-only and beside the daemon (WAL readers never wait)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


# -- 1a. poll cost, in-process ---------------------------------------------------------


async def _timed_us(call: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter_ns()
    await call()
    return (time.perf_counter_ns() - t0) / 1000


def _add_backlog(
    db: Path, first_id: int, *, steps: int = BACKLOG, token: str = "bench", running: int = 0
) -> int:
    """A running workflow of `token` with `steps` pending echo steps (ids from first_id),
    and `running` more of them running under a lease; its id."""
    now = now_ms()
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO workflows (id, name, flow_json, input_json, status, created_by,"
            " created_at, updated_at) VALUES (?, 'backlog', ?, '{}', 'running', ?, ?, ?)",
            (first_id, json.dumps(ECHO_ONE["flow"]), token, now, now),
        )
        # Due a second before the small backlog: a held one is queued ahead of it.
        due = now - 1000 if running else now
        conn.executemany(
            "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at,"
            " created_at, lease_until, created_by) VALUES (?, ?, 'start', 'start', 'echo', ?,"
            " 1, ?, ?, ?, ?)",
            [(first_id + 1 + i, first_id, "running" if i < running else "pending", due, now,
              now + 3_600_000 if i < running else None, token)
             for i in range(steps + running)],
        )  # fmt: skip
        conn.execute("COMMIT")
    finally:
        conn.close()
    return first_id


def _requeue_backlog(conn: sqlite3.Connection, workflow_id: int) -> None:
    conn.execute(
        "UPDATE steps SET status = 'pending', attempt = 0, started_at = NULL, lease_until = NULL"
        " WHERE workflow_id = ?",
        (workflow_id,),
    )


async def _tick(store: Store) -> dict[str, float]:
    """One idle executor tick's store calls, in `Executor.tick`'s order; us per call.

    `tick` sums what an idle tick makes: expired gates, interrupted steps, the claim
    and next_due. A store with `has_due` (a read that spares the idle tick the claim's
    write transaction) is measured as its executor uses it: has_due instead of the
    claim; the claim with nothing runnable is timed all the same.
    """
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "expired_gates": lambda: store.expired_gates(CLAIM_BATCH),
        "interrupted": lambda: store.interrupted(limit=CLAIM_BATCH),
        "claim": lambda: store.claim_steps(CLAIM_BATCH),
        "next_due": lambda: store.next_due(),
    }
    has_due = getattr(store, "has_due", None)
    if has_due is not None:
        calls["has_due"] = has_due
    out = {name: await _timed_us(call) for name, call in calls.items()}
    skip = "claim" if has_due is not None else "has_due"
    out["tick"] = sum(us for name, us in out.items() if name != skip)
    return out


async def poll_cost(dbs: dict[str, Path], reps: int) -> dict[str, dict[str, float]]:
    """What one idle executor tick costs, and a claim of BACKLOG runnable steps, per database.

    The stores are the daemon's own (`daemon.store.Store`, synchronous=FULL, the bench
    daemons' share of SHARE steps per token), one per database, all open at once; every
    repetition visits each in a shuffled order, so noise from other work on the machine
    is shared out evenly between the sizes. See `_tick` for what `tick` sums. The
    backlog is requeued by another connection between claims, untimed, and removed at
    the end with its events. Then the same claim again, with HELD due steps of another
    token queued before the backlog, that token running SHARE steps (at its share).
    """
    rng = random.Random(4)
    stores: dict[str, Store] = {}
    sides: dict[str, sqlite3.Connection] = {}
    backlogs: dict[str, int] = {}
    held: dict[str, int] = {}
    times: dict[str, dict[str, list[float]]] = {label: {} for label in dbs}
    try:
        for label, db in dbs.items():
            sql = (
                "SELECT max(coalesce((SELECT max(id) FROM workflows), 0),"
                " coalesce((SELECT max(id) FROM steps), 0))"
            )
            backlogs[label] = _add_backlog(db, count(db, sql) + 1)
            side = sides[label] = sqlite3.connect(db, isolation_level=None, timeout=10)
            side.execute("PRAGMA synchronous = NORMAL")
            side.execute("PRAGMA foreign_keys = ON")
            # Held out of the queue (as done) while the idle tick is measured.
            side.execute(
                "UPDATE steps SET status = 'done' WHERE workflow_id = ?", (backlogs[label],)
            )
            stores[label] = Store(db, max_running_per_token=SHARE)
            await stores[label].open()
        labels = list(dbs)
        for i in range(reps + 20):  # the first 20 warm the caches and are not counted
            rng.shuffle(labels)
            for label in labels:
                for name, us in (await _tick(stores[label])).items():
                    if i >= 20:
                        times[label].setdefault(name, []).append(us)
        await _claims(stores, sides, backlogs, times, f"claim_backlog{BACKLOG}", reps, rng)
        for label, db in dbs.items():
            held[label] = _add_backlog(db, count(db, sql) + 1, steps=HELD, token="held",
                                       running=SHARE)  # fmt: skip
        key = f"claim_backlog{BACKLOG}_behind_held{HELD // 1000}k"
        await _claims(stores, sides, backlogs, times, key, reps, rng)
    finally:
        for store in stores.values():
            await store.close()
        for label, side in sides.items():
            for wf in (backlogs.get(label), held.get(label)):
                side.execute("DELETE FROM workflows WHERE id = ?", (wf,))  # cascades
            side.close()
    return {label: _percentiles("poll", "us", t) for label, t in times.items()}


async def _claims(
    stores: dict[str, Store],
    sides: dict[str, sqlite3.Connection],
    backlogs: dict[str, int],
    times: dict[str, dict[str, list[float]]],
    key: str,
    reps: int,
    rng: random.Random,
) -> None:
    """Time claims of the requeued BACKLOG, every database in turn (shuffled)."""
    labels = list(stores)
    for i in range(reps // 2 + 5):  # each such claim commits with an fsync: fewer
        rng.shuffle(labels)
        for label in labels:
            _requeue_backlog(sides[label], backlogs[label])
            t0 = time.perf_counter_ns()
            claimed = await stores[label].claim_steps(CLAIM_BATCH)
            us = (time.perf_counter_ns() - t0) / 1000
            assert len(claimed) == BACKLOG, len(claimed)
            if i >= 5:
                times[label].setdefault(key, []).append(us)


def _percentiles(prefix: str, unit: str, times: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, values in times.items():
        out[f"{prefix}_{name}_{unit}_p50"] = pct(values, 0.50)
        out[f"{prefix}_{name}_{unit}_p95"] = pct(values, 0.95)
    return out


# -- 1b. API latency over HTTP ---------------------------------------------------------


def _timed_ms(client: httpx.Client, method: str, url: str, expect: int, **kw: Any) -> float:
    t0 = time.perf_counter_ns()
    resp = client.request(method, url, **kw)
    ms = (time.perf_counter_ns() - t0) / 1e6
    if resp.status_code != expect:
        raise RuntimeError(f"{method} {url}: {resp.status_code} {resp.text[:200]}")
    return ms


def api_latency(
    daemons: dict[str, Daemon], seeded: dict[str, Seeded], samples: int
) -> dict[str, dict[str, float]]:
    """p50/p95 of create, get (old and new), list (default and ?status=completed), per size.

    One daemon per database, all running; requests go one at a time, each daemon
    on its own keep-alive connection, visiting the daemons in a shuffled order
    per sample, so that noise (other processes' fsyncs on a shared disk, above all)
    falls on every size alike. Old workflows are a random sample of the seeded
    history (on the empty database: those created here); new ones are those the
    create samples made, once finished.
    """
    rng = random.Random(5)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    labels = list(daemons)
    times: dict[str, dict[str, list[float]]] = {lb: {} for lb in labels}
    created: dict[str, list[int]] = {lb: [] for lb in labels}
    with contextlib.ExitStack() as stack:
        clients = {
            lb: stack.enter_context(httpx.Client(base_url=d.url, headers=headers, timeout=30))
            for lb, d in daemons.items()
        }
        for client in clients.values():
            for _ in range(20):  # warm-up: the connection, caches, the executor's first runs
                client.post("/api/workflow", json=ECHO_ONE).raise_for_status()
                client.get("/api/workflow").raise_for_status()

        def each(name: str, request: Callable[[str, int], float]) -> None:
            for i in range(samples):
                rng.shuffle(labels)
                for lb in labels:
                    times[lb].setdefault(name, []).append(request(lb, i))

        def create(lb: str, _i: int) -> float:
            t0 = time.perf_counter_ns()
            resp = clients[lb].post("/api/workflow", json=ECHO_ONE)
            ms = (time.perf_counter_ns() - t0) / 1e6
            if resp.status_code != 201:
                raise RuntimeError(f"create: {resp.status_code} {resp.text[:200]}")
            created[lb].append(resp.json()["id"])
            return ms

        each("create", create)
        for lb, client in clients.items():
            wait_until(
                lambda c=client: not c.get("/api/workflow", params={"status": "running"}).json(),
                60,
                f"the workflows created on the {lb} database to finish",
            )
        old: dict[str, list[int]] = {}
        for lb in labels:
            n = seeded[lb].workflows
            picks = rng.sample(range(n), samples) if n else []
            old[lb] = [seeded[lb].workflow_id(k) for k in picks] or rng.sample(
                created[lb], len(created[lb])
            )

        def get(ids: dict[str, list[int]]) -> Callable[[str, int], float]:
            return lambda lb, i: _timed_ms(clients[lb], "GET", f"/api/workflow/{ids[lb][i]}", 200)

        def list_(**params: str) -> Callable[[str, int], float]:
            return lambda lb, _i: _timed_ms(clients[lb], "GET", "/api/workflow", 200, params=params)

        each("get_old", get(old))
        each("get_new", get(created))
        each("list", list_())
        each("list_completed", list_(status="completed"))
    return {lb: _percentiles("api", "ms", t) for lb, t in times.items()}


# -- 2. memory ---------------------------------------------------------------------------


async def _submit(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[int]:
    """POST every body to /api/workflow, `concurrency` at a time; the new ids."""
    ids: list[int] = []
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=limits
    ) as client:

        async def worker() -> None:
            while queue:
                resp = await client.post("/api/workflow", json=queue.pop())
                if resp.status_code != 201:
                    raise RuntimeError(f"create: {resp.status_code} {resp.text[:200]}")
                ids.append(resp.json()["id"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


def memory(workdir: Path) -> dict[str, float]:
    """RSS of a fresh daemon idle and with GATES waiting gates; of another after a burst.

    Two daemons on two fresh databases, so the burst's figure does not carry the
    gates' (and the gates' not the burst's). Each figure is read a second after
    the daemon went quiet; VmHWM is the peak so far, i.e. while submitting.
    """
    out: dict[str, float] = {}
    gates_db = workdir / "mem-gates.db"
    with daemon(workdir, gates_db) as d:
        time.sleep(1.0)
        out["mem_idle_rss_mib"], out["mem_idle_hwm_mib"] = d.memory_mib()
        t0 = time.perf_counter()
        bodies = [{**GATE, "input": {"title": f"t{i}"}} for i in range(GATES)]
        asyncio.run(_submit(d.url, bodies, concurrency=16))
        waiting = "SELECT count(*) FROM steps WHERE awaiting = 'ready' AND status = 'running'"
        wait_until(lambda: count(gates_db, waiting) >= GATES, 120, f"{GATES} waiting gates")
        out["mem_gates_create_s"] = time.perf_counter() - t0
        time.sleep(1.0)
        out["mem_gates_rss_mib"], out["mem_gates_hwm_mib"] = d.memory_mib()
    burst_db = workdir / "mem-burst.db"
    with daemon(workdir, burst_db) as d:
        time.sleep(1.0)
        t0 = time.perf_counter()
        bodies = [{**ECHO_TWO, "input": {"n": i}} for i in range(BURST)]
        asyncio.run(_submit(d.url, bodies, concurrency=32))
        done = "SELECT count(*) FROM workflows WHERE status = 'completed'"
        wait_until(lambda: count(burst_db, done) >= BURST, 300, f"{BURST} completed workflows")
        out["mem_burst_s"] = time.perf_counter() - t0
        failed = count(burst_db, "SELECT count(*) FROM workflows WHERE status <> 'completed'")
        if failed:
            raise RuntimeError(f"{failed} burst workflows did not complete")
        time.sleep(1.0)
        out["mem_burst_rss_mib"], out["mem_burst_hwm_mib"] = d.memory_mib()
    return out


# -- the run -----------------------------------------------------------------------------


API_ROWS = ["create", "get_old", "get_new", "list", "list_completed"]
POLL_ROWS = [
    "claim",
    "has_due",
    "expired_gates",
    "interrupted",
    "next_due",
    "tick",
    f"claim_backlog{BACKLOG}",
    f"claim_backlog{BACKLOG}_behind_held{HELD // 1000}k",
]


def scale_sizes(workdir: Path, sizes: list[int], samples: int, cpus: Cpus) -> dict[str, Any]:
    """Seed every size, measure the poll in-process, then the API on real daemons."""
    out: dict[str, Any] = {"sizes_steps": sizes}
    labels = [size_label(s) for s in sizes]
    dbs = {lb: workdir / f"scale-{lb}.db" for lb in labels}
    rows: dict[str, dict[str, float]] = {}
    seeded: dict[str, Seeded] = {}
    for steps, lb in zip(sizes, labels, strict=True):
        print(f"seeding {lb} finished steps...", file=sys.stderr, flush=True)
        seeded[lb] = seed(dbs[lb], steps)
        db_bytes = sum(p.stat().st_size for p in workdir.glob(f"{dbs[lb].name}*"))
        rows[lb] = {"seed_s": seeded[lb].seconds, "db_mib": db_bytes / 2**20}
    print("poll cost...", file=sys.stderr, flush=True)
    with pinned(cpus.server):  # before the stores start their threads
        poll = asyncio.run(poll_cost(dbs, samples))
    for lb, figures in poll.items():
        rows[lb] |= figures
    print("API latency...", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        daemons = {
            lb: stack.enter_context(daemon(workdir, dbs[lb], cpus=cpus.server)) for lb in labels
        }
        time.sleep(1.0)
        # What polling costs a real daemon: CPU while idle (1 s poll, notifier, server).
        cpu0 = {lb: d.cpu_ns() for lb, d in daemons.items()}
        time.sleep(IDLE_CPU_S)
        for lb, d in daemons.items():
            rows[lb]["startup_s"] = d.startup_s
            rows[lb]["idle_cpu_ms_per_s"] = (d.cpu_ns() - cpu0[lb]) / 1e6 / IDLE_CPU_S
            rows[lb]["idle_rss_mib"], _ = d.memory_mib()
        with pinned(cpus.client):
            api = api_latency(daemons, seeded, samples)
        for lb, figures in api.items():
            rows[lb] |= figures
    for lb, row in rows.items():
        for key, value in row.items():
            out[f"{key}_{lb}_steps"] = value
    for path in workdir.glob("scale-*"):
        path.unlink()
    base = labels[0]
    worst = 0.0
    for lb in labels[1:]:
        for name in [f"api_{n}_ms_p50" for n in API_ROWS] + [f"poll_{n}_us_p50" for n in POLL_ROWS]:
            if f"{name}_{base}_steps" not in out:
                continue  # has_due: only in a store that has it
            ratio = out[f"{name}_{lb}_steps"] / out[f"{name}_{base}_steps"]
            out[f"{name}_ratio_{lb}_vs_{base}_steps"] = ratio
            if not name.startswith("poll_claim_backlog"):  # fsync-bound, not size-bound
                worst = max(worst, abs(ratio - 1))
    out["flat_worst_p50_deviation_pct"] = 100 * worst
    out["flat_target_met"] = worst <= FLAT_TOLERANCE
    return out


def table(res: dict[str, Any]) -> str:
    """The results as aligned text: one column per database size, then memory."""
    sizes = res.get("sizes_steps", [])
    labels = [size_label(s) for s in sizes]
    base = labels[0] if labels else ""
    lines: list[str] = []
    if labels:
        head = f"{'finished steps in the database':<34}" + "".join(f"{lb:>24}" for lb in labels)
        lines += [head, "-" * len(head)]

        def line(title: str, key: str, fmt: str, ratio: bool = False) -> None:
            cells = []
            for lb in labels:
                value = res[f"{key}_{lb}_steps"]
                cell = format(value, fmt)
                if ratio and lb != base:
                    r = res[f"{key}_ratio_{lb}_vs_{base}_steps"]
                    cell += f" ({r:4.2f}x)"
                cells.append(f"{cell:>24}")
            lines.append(f"{title:<34}" + "".join(cells))

        line("seed time, s", "seed_s", ".1f")
        line("database size, MiB", "db_mib", ".0f")
        line("daemon start to /healthz, s", "startup_s", ".2f")
        line("daemon idle RSS, MiB", "idle_rss_mib", ".1f")
        line("daemon idle CPU, ms per s", "idle_cpu_ms_per_s", ".2f")
        lines.append("poll cost, in-process (us)          p50 (ratio to empty) / p95")
        for name in POLL_ROWS:
            if f"poll_{name}_us_p50_{base}_steps" not in res:
                continue
            line(f"  {name} p50", f"poll_{name}_us_p50", ".0f", ratio=True)
            line(f"  {name} p95", f"poll_{name}_us_p95", ".0f")
        lines.append("API latency over HTTP (ms)          p50 (ratio to empty) / p95")
        for name in API_ROWS:
            line(f"  {name} p50", f"api_{name}_ms_p50", ".2f", ratio=True)
            line(f"  {name} p95", f"api_{name}_ms_p95", ".2f")
        verdict = "met" if res["flat_target_met"] else "MISSED"
        lines.append(
            f"flat within ±{FLAT_TOLERANCE:.0%} (p50s, backlog claim aside): {verdict}; "
            f"worst deviation {res['flat_worst_p50_deviation_pct']:.1f} %"
        )
    if "mem_idle_rss_mib" in res:
        lines.append("")
        lines.append(f"{'memory of stepd serve (MiB)':<34}{'VmRSS':>10}{'VmHWM':>10}  target")
        for title, key, target in (
            ("idle", "mem_idle", f"<= {TARGET_IDLE_MIB:.0f}"),
            (f"{GATES:,} waiting gates", "mem_gates", f"<= {TARGET_GATES_MIB:.0f}"),
            (f"after a {BURST:,}-workflow burst", "mem_burst", ""),
        ):
            lines.append(
                f"{title:<34}{res[key + '_rss_mib']:>10.1f}{res[key + '_hwm_mib']:>10.1f}  {target}"
            )
        lines.append(
            f"(creating the gates took {res['mem_gates_create_s']:.1f} s; the burst "
            f"{res['mem_burst_s']:.1f} s)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="0 and 100k steps only")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--samples", type=int, default=200, help="samples per figure (default 200)")
    ap.add_argument("--sizes", help="finished steps per database, comma-separated (overrides)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the memory figures")
    ap.add_argument(
        "--no-pin", action="store_true", help="let the kernel place daemon and client (noisier)"
    )
    args = ap.parse_args()
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [0, 100_000] if args.quick else [0, 100_000, 1_000_000]
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    cpus = Cpus.choose(not args.no_pin)
    results: dict[str, Any] = {
        "samples": args.samples,
        "server_cpus": sorted(cpus.server) if cpus.server else "any",
        "client_cpus": sorted(cpus.client) if cpus.client else "any",
    }
    try:
        with tempfile.TemporaryDirectory(prefix="stepd-scale-") as tmp:
            workdir = Path(tmp)
            results |= scale_sizes(workdir, sizes, args.samples, cpus)
            if not args.skip_memory:
                print("memory...", file=sys.stderr, flush=True)
                results |= memory(workdir)
                results["mem_idle_target_met"] = results["mem_idle_rss_mib"] <= TARGET_IDLE_MIB
                results["mem_gates_target_met"] = results["mem_gates_rss_mib"] <= TARGET_GATES_MIB
    finally:
        _kill_children()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
