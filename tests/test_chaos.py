"""Chaos: the real daemon, SIGKILLed at random moments while it works, loses nothing.

~200 workflows (chains of work, sleeps, gates, retried flaky steps, non-idempotent
charges, branches; parallels of two or three branches, one with a gate and one with
a sleep or a step that fails; maps over 5-20 items, 2-4 at a time, some items
failing within or past tolerated_failures; 0.2-1 s timers; signal waits, the signal
sent before the wait is reached or once it waits) are submitted over HTTP, each with
an Idempotency-Key so that a POST cut off by a kill is sent again, while the daemon is
killed with SIGKILL at random moments (some while it starts up, some during a graceful
stop after SIGTERM) and restarted on the same database. Throughout, and until every
workflow has ended, a "person" approves every waiting gate (in branches too), declines
(POST /fail) every interrupted non-idempotent step, sends the signals, and pauses about
one workflow in ten for a while, then resumes it. Then:

- every acknowledged workflow exists and is terminal (nothing lost, nothing stuck);
- every workflow's steps, and each parallel branch's and map item's (by `parent_id`
  and `scope`), are a walk of its flow: each failure is one the scenario allows (a
  flaky step out of retries, a step out of recovery attempts, a step a person failed,
  an item or branch planned to fail), so a completed workflow did exactly the expected
  states, in order; no (scope, state) visit is done twice; no step of an ended workflow
  is left pending or running (awaiting "branches", "timer" or "signal" included), and
  no branch row open;
- a completed workflow's `output` is its last step's result and what the plan says:
  the parallel's result by branch (each branch seeing its own `steps.start`, not the
  enclosing flow's), the map's in item order with an error in the slot of each failed
  item, the signal's data, a timer not ended early;
- a done parallel or map step's result is built from its branches' last results; a
  failed one has a failed branch (more failed items than tolerated), the rest
  cancelled, and nothing inside finished after it; a map never had more items open
  than its max_concurrency;
- the tools' own log (tests/chaos_tools.py) shows no idempotent step executed more
  often than its final attempt, and no non-idempotent step executed twice;
- both SQLite files (the chaos tools' log, and stepd.db on SQLite) pass `PRAGMA integrity_check`.

The same run against three daemons on one PostgreSQL database (`ClusterChaosRun`: each
kill picks one of them, some stay down until the others take their steps over, the
clients send each request to whichever daemon is up) runs on the PostgreSQL pass, and at
scale as `python bench/chaos.py --database postgresql`.

Deterministic given STEPD_CHAOS_SEED (default 1): the flows, the gate answers and
the kill delays come from one seeded RNG (where a kill lands still depends on timing).
The same scenario, bigger, is `python bench/chaos.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.auth import hash_token
from tests import backend, chaos_tools
from tests.process_helpers import TERMINAL, TOKEN, Daemon, free_port

REPO = Path(__file__).resolve().parents[1]
PERSON = "james"  # the token's name: created_by, and decided_by of gates and decisions
RECOVERY_ATTEMPTS = 3  # the daemon's default [executor] recovery_attempts
FLAKY_RETRY = {"max_attempts": 3, "backoff_s": 0.01}
IDEMPOTENT_TOOLS = {"chaos_work", "chaos_work_sync", "chaos_flaky", "chaos_item", "chaos_once"}
SEED_ENV = "STEPD_CHAOS_SEED"


def chaos_seed() -> int:
    return int(os.environ.get(SEED_ENV, "1"))


# -- the workflows ---------------------------------------------------------------------


@dataclass
class Plan:
    """One workflow to submit, and what it should do when nothing goes wrong."""

    index: int
    kind: str
    flow: dict[str, dict[str, Any]]
    success: dict[str, str | None]  # state -> the state after it succeeds (None: done)
    answers: dict[str, dict[str, Any]]  # gate state -> the body the person sends to ready
    key: str  # Idempotency-Key: a submission lost in a kill is retried with the same key
    input: dict[str, Any] = field(default_factory=dict)  # more input (a map's items)
    output: Any = None  # the output of a completed run that went as planned (None: unchecked)
    signal: str | None = None  # "early" (sent on creation) or "late" (sent once it waits)
    signal_data: Any = None
    pause: float | None = None  # pause it once while it runs, for this long
    fails: bool = False  # a branch or more items than tolerated fail: on_error handles it

    def body(self, seed: int) -> dict[str, Any]:
        return {
            "name": f"chaos-{self.kind}",
            "flow": self.flow,
            "input": {"plan": self.index, "seed": seed, **self.input},
        }

    def expected(self) -> list[str]:
        """The states done, in order, when no step fails."""
        path, state = [], "start"
        while state is not None:
            path.append(state)
            state = self.success[state]
        return path


class _Builder:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.flow: dict[str, dict[str, Any]] = {}
        self.success: dict[str, str | None] = {}
        self.answers: dict[str, dict[str, Any]] = {}

    def _add(self, state: str, spec: dict[str, Any], nxt: str | None, **extra: Any) -> None:
        spec = {**spec, **extra}
        if "branch" not in spec:
            spec.update({"next": nxt} if nxt is not None else {"done": True})
        self.flow[state] = spec
        self.success[state] = nxt

    def work(self, state: str, nxt: str | None, ms: int | None = None, **extra: Any) -> None:
        tool = self.rng.choice(["chaos_work", "chaos_work_sync"])
        ms = self.rng.randint(5, 80) if ms is None else ms
        self._add(state, {"tool": tool, "args": {"ms": ms}}, nxt, **extra)

    def gate(self, state: str, nxt: str | None, **extra: Any) -> None:
        self._add(state, {"tool": None, "args": {}}, nxt, **extra)
        self.answers[state] = {"approve": True}

    def echo(self, state: str, nxt: str | None, **args: Any) -> None:
        self._add(state, {"tool": "echo", "args": args}, nxt)


def gate_key(state: str, scope: list[Any] | None) -> str:
    """Where a gate is, for Plan.answers: its state, after its scope path if nested."""
    return "/".join([*(str(p) for p in scope or ()), state])


def _parallel(b: _Builder, plan: dict[str, Any]) -> None:
    """start (work) -> fan (two or three branches: work, a gate, a short sleep or a step that
    fails) -> after (echo of the joined result); a failed fan goes to handle."""
    rng = b.rng
    b.work("start", "fan", ms=rng.randint(5, 40))
    top_ms = b.flow["start"]["args"]["ms"]
    inner_ms = rng.randint(41, 80)  # not the top-level start's: the branch's own is seen
    branches: dict[str, Any] = {
        "a": {
            "start": {
                "tool": rng.choice(["chaos_work", "chaos_work_sync"]),
                "args": {"ms": inner_ms},
                "next": "a_end",
            },
            "a_end": {
                "tool": "echo",
                "args": {"branch": "a", "ms": "<<steps.start.result.ms>>"},
                "done": True,
            },
        },  # fmt: skip
        "b": {
            "start": {"tool": None, "args": {}, "next": "b_end"},
            "b_end": {
                "tool": "echo",
                "done": True,
                "args": {"branch": "b", "approved": "<<steps.start.result.approve>>"},
            },
        },  # fmt: skip
    }
    b.answers["fan/b/start"] = {"approve": True}
    expected: dict[str, Any] = {
        "a": {"branch": "a", "ms": inner_ms},
        "b": {"branch": "b", "approved": True},
    }
    fails = rng.random() < 0.25
    if fails:
        branches["c"] = {"start": {"tool": "chaos_item", "args": {"i": 0, "v": 0, "fail": True,
                                                                  "ms": rng.randint(5, 40)},
                                   "done": True}}  # fmt: skip
    elif rng.random() < 0.5:
        seconds = rng.choice([0.05, 0.1, 0.2])
        branches["c"] = {
            "start": {"tool": "sleep", "args": {"seconds": seconds}, "next": "c_end"},
            "c_end": {"tool": "echo", "args": {"branch": "c", "slept": "<<result.slept>>"},
                      "done": True},
        }  # fmt: skip
        expected["c"] = {"branch": "c", "slept": seconds}
    b._add("fan", {"parallel": branches}, "after", on_error="handle")
    b.echo("after", None, fan="<<steps.fan.result>>", first="<<steps.start.result.ms>>")
    b.echo("handle", None, handled=True, message="<<error.message>>")
    b.success["handle"] = None
    plan.update(fails=fails, output={"fan": expected, "first": top_ms})


def _map(b: _Builder, plan: dict[str, Any]) -> None:
    """start: a map over 5-20 items, 2-4 at a time, some failing (within the tolerated
    count, or one more: the map fails into handle)."""
    rng = b.rng
    n = rng.randint(5, 20)
    tolerated = rng.randint(0, 2)
    fails = rng.random() < 0.25
    failing = set(rng.sample(range(n), tolerated + 1 if fails else rng.randint(0, tolerated)))
    items = [{"v": rng.randint(0, 999), "fail": i in failing, "ms": rng.randint(5, 30)}
             for i in range(n)]  # fmt: skip
    args = {"i": "<<index>>", "v": "<<it.v>>", "fail": "<<it.fail>>", "ms": "<<it.ms>>"}
    item = {"tool": "chaos_item", "args": args, "done": True}
    spec = {"map": {"items": "<<input.items>>", "as": "it",
                    "max_concurrency": rng.randint(2, 4), "tolerated_failures": tolerated,
                    "flow": {"start": item}}}  # fmt: skip
    b._add("start", spec, None, on_error="handle")
    b.echo("handle", None, handled=True, message="<<error.message>>")
    b.success["handle"] = None
    output = [None if it["fail"] else {"i": i, "v": it["v"]} for i, it in enumerate(items)]
    plan.update(fails=fails, input={"items": items}, output=output)


def _redrive(b: _Builder, plan: dict[str, Any]) -> None:
    """start (work) -> fan (a: an item; c: a step that fails the first time) -> after: the
    workflow fails, a person redrives it (POST resume), c runs again and a does not (unless
    the failure cancelled it)."""
    rng = b.rng
    b.work("start", "fan", ms=rng.randint(5, 40))
    v = rng.randint(0, 999)
    branches = {
        "a": {"start": {"tool": "chaos_item", "args": {"i": 1, "v": v, "ms": rng.randint(5, 60)},
                        "done": True}},
        "c": {"start": {"tool": "chaos_once", "args": {"key": "wf-{{workflow.id}}"}, "done": True}},
    }  # fmt: skip
    b._add("fan", {"parallel": branches}, "after")
    b.echo("after", None, fan="<<steps.fan.result>>")
    plan["output"] = {"fan": {"a": {"i": 1, "v": v}, "c": {"once": None}}}  # c: its workflow id


def _wait(b: _Builder, plan: dict[str, Any], kind: str) -> None:
    """start (work) -> hold (a 0.2-1 s timer, or a signal wait) -> after (echo of both)."""
    rng = b.rng
    b.work("start", "hold", ms=rng.randint(5, 80))
    top_ms = b.flow["start"]["args"]["ms"]
    if kind == "timer":
        seconds = round(rng.uniform(0.2, 1.0), 2)
        b._add("hold", {"wait": {"seconds": seconds}}, "after")
        plan["output"] = {"first": top_ms, "held": None}
    else:
        b._add("hold", {"wait": {"signal": "go"}}, "after")
        data = {"n": rng.randint(0, 10**6)}
        plan.update(signal=rng.choice(["early", "late"]), signal_data=data,
                    output={"first": top_ms, "held": data})  # fmt: skip
    b.echo("after", None, first="<<steps.start.result.ms>>", held="<<steps.hold.result>>")


def make_plan(rng: random.Random, index: int, seed: int) -> Plan:
    b = _Builder(rng)
    kind = rng.choices(
        ["chain", "sleep", "gate", "flaky", "charge", "branch", "gate_branch",
         "parallel", "map", "timer", "signal", "redrive"],
        weights=[25, 10, 15, 15, 20, 10, 5, 8, 8, 5, 7, 4],
    )[0]  # fmt: skip
    more: dict[str, Any] = {}
    if kind in ("parallel", "map", "timer", "signal", "redrive"):
        builders = {"parallel": _parallel, "map": _map, "redrive": _redrive}
        builders.get(kind, lambda b, p: _wait(b, p, kind))(b, more)
    elif kind == "chain":
        n = rng.randint(2, 4)
        names = ["start", *(f"w{i}" for i in range(2, n + 1))]
        for i, name in enumerate(names):
            b.work(name, names[i + 1] if i + 1 < n else None)
    elif kind == "sleep":
        seconds = rng.choice([0.05, 0.1, 0.2, 0.4])
        b._add("start", {"tool": "sleep", "args": {"seconds": seconds}}, "work")
        b.work("work", None)
    elif kind == "gate":
        b.gate("start", "work")
        if rng.random() < 0.5:
            b.work("work", "more")
            b.work("more", None)
        else:
            b.work("work", None)
    elif kind == "flaky":
        fail_first = rng.choice([0, 1, 1, 2, 2, 3])
        extra: dict[str, Any] = {"retry": FLAKY_RETRY}
        if rng.random() < 0.5:
            extra["on_error"] = "handle"
            b.echo("handle", "after", handled=True, message="{{error.message}}")
        b._add("start", {"tool": "chaos_flaky", "args": {"fail_first": fail_first}}, "after",
               **extra)  # fmt: skip
        b.work("after", None)
    elif kind == "charge":
        b.work("start", "charge")
        extra = {}
        if rng.random() < 0.5:
            extra["on_error"] = "refund"
            b.echo("refund", None, refunded=True, why="{{error.message}}")
        b._add("charge", {"tool": "chaos_charge", "args": {"ms": rng.randint(10, 80)}},
               "receipt", **extra)  # fmt: skip
        b.work("receipt", None)
    elif kind == "branch":
        ms = rng.randint(5, 80)
        branch = [{"if": "result.ms >= 40", "then": "big"}, {"else": "small"}]
        b.work("start", "big" if ms >= 40 else "small", ms=ms, branch=branch)
        b.work("big", None)
        b.work("small", "finish")
        b.work("finish", None)
    else:  # gate_branch: the person's answer picks the way
        approve = rng.random() < 0.6
        branch = [{"if": "result.approve == true", "then": "yes"}, {"else": "no"}]
        b.gate("start", "yes" if approve else "no", branch=branch)
        b.answers["start"] = {"approve": approve}
        b.work("yes", None)
        b.echo("no", None, declined=True)
    if rng.random() < 0.1:  # paused once while it runs, then resumed
        more["pause"] = rng.uniform(0.1, 0.5)
    return Plan(index, kind, b.flow, b.success, b.answers, key=f"chaos-{seed}-{index}", **more)


def make_plans(rng: random.Random, count: int, seed: int) -> list[Plan]:
    return [make_plan(rng, i, seed) for i in range(count)]


# -- the daemon ------------------------------------------------------------------------


def write_chaos_config(path: Path, *, port: int, db: Path, concurrency: int = 8) -> Path:
    # On PostgreSQL, the test's database that stands for this path.
    database = f'url = "{backend.database_url(db)}"' if backend.POSTGRES else f'path = "{db}"'
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"

[database]
{database}

[executor]
poll_interval = 0.05
shutdown_grace = 0.5
concurrency = {concurrency}
recovery_attempts = {RECOVERY_ATTEMPTS}

[tools]
modules = ["daemon.tools.demo", "tests.chaos_tools"]

[[auth.tokens]]
name = "{PERSON}"
sha256 = "{hash_token(TOKEN)}"
permissions = ["workflow"]
"""
    )
    return path


def chaos_daemon(workdir: Path, *, concurrency: int = 8) -> Daemon:
    """A daemon whose state directory (stepd.db, chaos.db) is `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = write_chaos_config(
        workdir / "stepd.toml", port=port, db=workdir / "stepd.db", concurrency=concurrency
    )
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return Daemon(workdir, cfg, port, PYTHONPATH=pythonpath)


# -- the run ---------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    workflows: int = 0  # acknowledged (201)
    submissions: int = 0  # POSTs sent, retries with the same Idempotency-Key included
    replayed: int = 0  # 201s that were Idempotent-Replayed (the first answer was lost)
    kills: int = 0
    startup_kills: int = 0  # of those, kills of a daemon still starting up
    stopping_kills: int = 0  # of those, kills of a daemon stopping after SIGTERM
    sigterms: int = 0  # graceful stops begun (some finished before the SIGKILL)
    restarts: int = 0
    gates_approved: int = 0
    decisions: int = 0  # interrupted non-idempotent steps a person failed
    kinds: Counter[str] = field(default_factory=Counter)  # acknowledged plans by kind
    signals: int = 0  # signals accepted (202), resent ones included
    early_signals: int = 0  # of those, sent before the wait was seen waiting
    pauses: int = 0  # pause calls answered 200
    redrives: int = 0  # failed workflows redriven (resume answered 200, redriven)
    resumes: int = 0  # resume calls answered 200
    outputs_checked: int = 0  # completed workflows whose output was compared with the plan's
    nested_steps: int = 0  # steps inside parallel branches and map items
    cancelled_inside: int = 0  # steps cancelled inside a failed parallel or map
    statuses: Counter[str] = field(default_factory=Counter)
    as_planned: int = 0  # completed along the expected path with no failed step
    executions: int = 0
    steps_rerun: Counter[str] = field(default_factory=Counter)  # tool -> steps run > once
    reruns: Counter[str] = field(default_factory=Counter)  # tool -> runs beyond the first
    flaky_retries: int = 0  # of the reruns: retries of a flaky step's deliberate failures
    retry_failures: int = 0  # flaky steps out of retries
    recovery_failures: int = 0  # steps out of recovery attempts after interruptions
    lost: list[int] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    integrity: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def failures(self) -> list[str]:
        out = [f"lost workflow {i}" for i in self.lost]
        out += [f"stuck: {s}" for s in self.stuck]
        out += [f"5xx: {s}" for s in self.server_errors]
        out += self.problems
        out += [f"integrity of {n}: {v}" for n, v in self.integrity.items() if v != "ok"]
        return out

    def rows(self) -> list[tuple[str, str]]:
        terminal = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return [
            ("seed", str(self.seed)),
            ("workflows submitted (acknowledged)", str(self.workflows)),
            ("POSTs (retries with the same key)", f"{self.submissions} ({self.replayed} replayed)"),
            ("kills (SIGKILL) / restarts", f"{self.kills} / {self.restarts}"),
            ("kills during start-up", str(self.startup_kills)),
            (
                "kills during a graceful stop (of SIGTERMs)",
                f"{self.stopping_kills} (of {self.sigterms})",
            ),
            ("final statuses", terminal),
            ("completed as planned", str(self.as_planned)),
            ("gates approved", str(self.gates_approved)),
            ("decisions taken (POST /fail)", str(self.decisions)),
            (
                "parallel / map / timer / signal workflows",
                " / ".join(str(self.kinds[k]) for k in ("parallel", "map", "timer", "signal")),
            ),
            ("signals accepted (sent before the wait)", f"{self.signals} ({self.early_signals})"),
            ("pauses / resumes / redrives", f"{self.pauses} / {self.resumes} / {self.redrives}"),
            (
                "steps in branches and items (cancelled)",
                f"{self.nested_steps} ({self.cancelled_inside})",
            ),
            ("outputs checked", str(self.outputs_checked)),
            ("tool executions recorded", str(self.executions)),
            ("steps re-run (ran > once)", _by_tool(self.steps_rerun)),
            ("executions beyond the first per step", _by_tool(self.reruns)),
            ("  of which retries of deliberate failures", str(self.flaky_retries)),
            ("flaky steps out of retries", str(self.retry_failures)),
            ("steps out of recovery attempts", str(self.recovery_failures)),
            ("lost", "0" if not self.lost else ", ".join(map(str, self.lost))),
            ("stuck", "0" if not self.stuck else str(len(self.stuck))),
            ("5xx answers", str(len(self.server_errors))),
            ("other problems", str(len(self.problems))),
            ("integrity", ", ".join(f"{n} {v}" for n, v in self.integrity.items())),
            ("wall time", f"{self.seconds:.1f} s"),
        ]

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())


class ChaosRun:
    """Submit plans, kill and restart the daemon, play the person, then check everything."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int,
        workflows: int = 200,
        kills: int = 5,
        kill_delay: tuple[float, float] = (0.1, 1.0),
        concurrency: int = 8,
        settle_timeout: float = 30.0,
    ) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.plans = make_plans(rng, workflows, seed)
        self.delays = [rng.uniform(*kill_delay) for _ in range(kills)]
        # About one restart in three is itself killed while it starts up (perhaps while it
        # recovers the steps of the previous run): the delay after spawning it, or None.
        self.early = [
            rng.uniform(0.15, 0.45) if rng.random() < 0.35 else None for _ in range(kills)
        ]
        # About one kill in four comes while the daemon stops gracefully (SIGTERM first,
        # the SIGKILL this long after it, unless it exited by then).
        self.graceful = [
            rng.uniform(0.0, 0.4) if rng.random() < 0.25 else None for _ in range(kills)
        ]
        self.setup(workdir, concurrency)
        self.settle_timeout = settle_timeout
        self.report = Report(seed=seed)
        self.ids: dict[int, int] = {}  # plan index -> acknowledged workflow id
        self.phase = 0  # plans up to a phase's share may be submitted
        self.signalled: set[int] = set()  # plans whose signal was accepted
        self.paused: dict[int, float] = {}  # plan index -> when to resume it (monotonic)
        self.was_paused: set[int] = set()  # plans paused once (not to pause again)
        self.redriven: set[int] = set()  # plans whose failed workflow was redriven
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.submitted_all = threading.Event()

    def setup(self, workdir: Path, concurrency: int) -> None:
        """Make the daemon (not started yet)."""
        self.daemon = chaos_daemon(workdir, concurrency=concurrency)

    @property
    def state_dir(self) -> Path:
        """Where the chaos tools keep their log of executions (chaos.db)."""
        return self.daemon.workdir

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """One statement on the daemon's database, as another process would run it."""
        return backend.query(self.daemon.workdir / "stepd.db", sql)

    def check_integrity(self) -> None:
        if backend.SQLITE:
            self.report.integrity["stepd.db"] = chaos_tools.integrity(
                self.daemon.workdir / "stepd.db"
            )
        self.report.integrity["chaos.db"] = chaos_tools.integrity(
            self.state_dir / chaos_tools.DB_NAME
        )

    def close(self) -> None:
        """Stop the threads and SIGKILL whatever still runs (after a failure)."""
        self.stop.set()
        self.daemon.kill()

    # -- HTTP, tolerant of a daemon that is down ------------------------------------

    def _client(self) -> httpx.Client:
        # A new connection per request: on a kept-alive connection every answer of this
        # daemon currently waits ~40 ms for a delayed ACK (its listening socket is made
        # without IPPROTO_TCP, so asyncio does not set TCP_NODELAY on accepted sockets).
        return httpx.Client(
            base_url=self.daemon.url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5.0,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def _note(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code >= 500:
            with self.lock:
                self.report.server_errors.append(f"{what}: {resp.status_code} {resp.text[:300]}")
        return resp

    def _released(self, index: int) -> bool:
        phases = len(self.delays) + 1
        return index * phases // len(self.plans) <= self.phase

    def submitter(self) -> None:
        """Submit every plan in order, each phase's share once the phase began; a POST that
        got no answer is sent again with the same Idempotency-Key."""
        try:
            with self._client() as c:
                for plan in self.plans:
                    while not self._released(plan.index) and not self.stop.is_set():
                        time.sleep(0.01)
                    while not self.stop.is_set():
                        try:
                            self.report.submissions += 1
                            resp = c.post(
                                "/api/workflow",
                                json=plan.body(self.seed),
                                headers={"Idempotency-Key": plan.key},
                            )
                        except httpx.TransportError:
                            time.sleep(0.05)  # the daemon is down: wait for the restart
                            continue
                        self._note(resp, f"POST /api/workflow (plan {plan.index})")
                        if resp.status_code == 201:
                            with self.lock:
                                self.ids[plan.index] = int(resp.json()["id"])
                                self.report.replayed += bool(
                                    resp.headers.get("Idempotent-Replayed")
                                )
                            if plan.signal == "early":
                                with contextlib.suppress(httpx.TransportError):
                                    self.send_signal(c, plan, early=True)
                            break
                        if resp.status_code < 500:
                            with self.lock:
                                self.report.problems.append(
                                    f"plan {plan.index} rejected: {resp.status_code} {resp.text}"
                                )
                            break
                        time.sleep(0.05)
        finally:
            self.submitted_all.set()

    def running_workflows(self, c: httpx.Client, status: str | None = None) -> list[int]:
        """Workflows that have not ended: running and paused (or those of one status)."""
        ids: list[int] = []
        for one in [status] if status else ["running", "paused"]:
            before: int | None = None
            while True:
                params: dict[str, Any] = {"status": one, "limit": 1000}
                if before is not None:
                    params["before"] = before
                resp = self._note(c.get("/api/workflow", params=params), "GET /api/workflow")
                resp.raise_for_status()
                page = [int(w["id"]) for w in resp.json()]
                ids += page
                if len(page) < 1000:
                    break
                before = page[-1]
        return ids

    def send_signal(self, c: httpx.Client, plan: Plan, *, early: bool = False) -> None:
        wf_id = self.ids[plan.index]
        body = {"name": "go", "data": plan.signal_data}
        r = self._note(c.post(f"/api/workflow/{wf_id}/signal", json=body), f"signal {wf_id}")
        if r.status_code == 202:
            with self.lock:
                self.signalled.add(plan.index)
                self.report.signals += 1
                self.report.early_signals += early
        elif r.status_code != 409:  # 409: it ended (a signal resent after the first took)
            with self.lock:
                self.report.problems.append(f"signal {wf_id}: {r.status_code} {r.text[:200]}")

    def to_redrive(self, c: httpx.Client) -> list[tuple[int, int]]:
        """(plan index, id) of the failed workflows of redrive plans not redriven yet."""
        out = []
        by_id = {wf_id: i for i, wf_id in self.ids.items()}
        for wf_id in self.running_workflows(c, "failed"):
            index = by_id.get(wf_id)
            if index is not None and self.plans[index].kind == "redrive":
                if index not in self.redriven:
                    out.append((index, wf_id))
        return out

    def control_pass(self, c: httpx.Client) -> None:
        """Redrive the failed workflows of redrive plans (once); resume the paused workflows
        whose time is up (or that nobody meant to keep paused: a pause whose answer was lost
        in a kill)."""
        for index, wf_id in self.to_redrive(c):
            r = self._note(c.post(f"/api/workflow/{wf_id}/resume", json={"reason": "redrive"}),
                           f"redrive {wf_id}")  # fmt: skip
            if r.status_code == 200 and r.json().get("redriven"):
                with self.lock:
                    self.redriven.add(index)
                    self.report.redrives += 1
        for wf_id in self.running_workflows(c, "paused"):
            resp = self._note(c.get(f"/api/workflow/{wf_id}"), f"GET /api/workflow/{wf_id}")
            if resp.status_code != 200:
                continue
            index = resp.json()["input"]["plan"]
            if time.monotonic() < self.paused.get(index, 0.0):
                continue
            r = self._note(c.post(f"/api/workflow/{wf_id}/resume", json={"reason": "chaos"}),
                           f"resume {wf_id}")  # fmt: skip
            if r.status_code == 200:
                with self.lock:
                    self.paused.pop(index, None)
                    self.report.resumes += 1

    def person_pass(self, c: httpx.Client) -> None:
        """Approve every waiting gate (with the plan's answer); fail every step that waits
        for a retry-or-fail decision; send the signals of workflows that wait for one;
        pause the workflows the plans pause, and resume them when their time is up."""
        self.control_pass(c)
        for wf_id in self.running_workflows(c, "running"):
            resp = self._note(c.get(f"/api/workflow/{wf_id}"), f"GET /api/workflow/{wf_id}")
            if resp.status_code != 200:
                continue
            wf = resp.json()
            plan = self.plans[wf["input"]["plan"]]
            if plan.pause is not None and plan.index not in self.was_paused:
                r = self._note(c.post(f"/api/workflow/{wf_id}/pause", json={"reason": "chaos"}),
                               f"pause {wf_id}")  # fmt: skip
                if r.status_code in (200, 409):
                    with self.lock:
                        self.was_paused.add(plan.index)
                        if r.status_code == 200:
                            self.paused[plan.index] = time.monotonic() + plan.pause
                            self.report.pauses += 1
                    if r.status_code == 200:
                        continue
            waits = any(s["awaiting"] == "signal" for s in wf["steps"])
            if (
                plan.signal
                and plan.index not in self.signalled
                and (waits or plan.signal == "early")
            ):
                self.send_signal(c, plan)
            for step in wf["steps"]:
                if step["awaiting"] == "ready":
                    answer = plan.answers[gate_key(step["state"], step["scope"])]
                    r = c.post(f"/api/workflow/{step['id']}/ready", json=answer)
                    self._note(r, f"POST ready {step['id']}")
                    with self.lock:
                        self.report.gates_approved += r.status_code == 200
                elif step["awaiting"] == "decision":
                    body = {"reason": "chaos: a person declines to repeat the side effect"}
                    r = c.post(f"/api/workflow/{step['id']}/fail", json=body)
                    self._note(r, f"POST fail {step['id']}")
                    with self.lock:
                        self.report.decisions += r.status_code == 200

    def person(self) -> None:
        with self._client() as c:
            while not self.stop.is_set():
                try:
                    self.person_pass(c)
                except httpx.HTTPError:
                    pass  # the daemon is down (or was killed mid-request)
                self.stop.wait(0.1)

    def _threads(self) -> list[threading.Thread]:
        return [
            threading.Thread(target=self.submitter, name="chaos-submitter", daemon=True),
            threading.Thread(target=self.person, name="chaos-person", daemon=True),
        ]

    def run(self) -> Report:
        t0 = time.monotonic()
        threads = self._threads()
        try:
            self.daemon.started()
            for t in threads:
                t.start()
            for delay, early, graceful in zip(self.delays, self.early, self.graceful, strict=True):
                time.sleep(delay)
                self.kill(graceful)
                if early is not None:
                    self.daemon.start()
                    self.report.restarts += 1
                    time.sleep(early)
                    if self.alive():
                        self.daemon.kill()
                        self.report.kills += 1
                        self.report.startup_kills += 1
                self.daemon.started()
                self.report.restarts += 1
                self.phase += 1
            self.settle()
        finally:
            self.stop.set()
            for t in threads:
                if t.is_alive():
                    t.join(10)
            self.finish()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def kill(self, after_sigterm: float | None) -> None:
        """SIGKILL the daemon (reaped); with `after_sigterm`, that long into a graceful stop."""
        if after_sigterm is not None:
            self.daemon.signal(signal.SIGTERM)
            self.report.sigterms += 1
            deadline = time.monotonic() + after_sigterm
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            if not self.alive():
                assert self.daemon.proc is not None
                if self.daemon.proc.returncode != 0:
                    self.report.problems.append(
                        f"stepd exited {self.daemon.proc.returncode} on SIGTERM: "
                        + self.daemon.stderr()[-500:]
                    )
                return
            self.report.stopping_kills += 1
        self.daemon.kill()
        self.report.kills += 1

    def settle(self) -> None:
        """Wait (bounded) until every plan is acknowledged and no workflow runs."""
        deadline = time.monotonic() + self.settle_timeout
        with self._client() as c:
            while time.monotonic() < deadline:
                if self.submitted_all.is_set() and not self.running_workflows(c):
                    if not self.to_redrive(c):
                        return
                time.sleep(0.1)
            for wf_id in self.running_workflows(c):
                wf = c.get(f"/api/workflow/{wf_id}").json()
                steps = [
                    f"{s['state']}:{s['tool']}:{s['status']}"
                    f"{'/' + s['awaiting'] if s['awaiting'] else ''}@{s['attempt']}"
                    for s in wf["steps"]
                ]
                self.report.stuck.append(f"workflow {wf_id} ({wf['name']}): {' -> '.join(steps)}")
        if not self.submitted_all.is_set():
            self.report.stuck.append("the submitter did not finish")

    def finish(self) -> None:
        """Read every acknowledged workflow, stop the daemon, check the logs and the files."""
        workflows: dict[int, dict[str, Any]] = {}
        if self.alive():
            workflows = self.read_workflows()
            self.daemon.signal(signal.SIGTERM)
            code = self.daemon.wait(15)
            if code != 0:
                self.report.problems.append(f"stepd exited {code} on SIGTERM")
        self.daemon.kill()
        self.verify(workflows)

    def read_workflows(self) -> dict[int, dict[str, Any]]:
        """Every acknowledged workflow as the API shows it, by plan index (404s: lost)."""
        workflows: dict[int, dict[str, Any]] = {}
        with self._client() as c:
            for index, wf_id in sorted(self.ids.items()):
                try:
                    resp = self._note(c.get(f"/api/workflow/{wf_id}"), f"GET {wf_id}")
                except httpx.HTTPError as exc:
                    self.report.problems.append(f"GET workflow {wf_id}: {exc!r}")
                    continue
                if resp.status_code == 404:
                    self.report.lost.append(wf_id)
                elif resp.status_code == 200:
                    workflows[index] = resp.json()
        return workflows

    # -- checks -------------------------------------------------------------------

    def verify(self, workflows: dict[int, dict[str, Any]]) -> None:
        r = self.report
        r.workflows = len(self.ids)
        missing = [p.index for p in self.plans if p.index not in self.ids]
        if missing:
            r.problems.append(f"plans never acknowledged: {missing[:20]}")
        unread = [self.ids[i] for i in sorted(self.ids) if i not in workflows]
        if unread and not r.lost:
            r.problems.append(
                f"{len(unread)} acknowledged workflows could not be read: {unread[:10]}"
            )
        if len(set(self.ids.values())) != len(self.ids):
            r.problems.append("two plans were acknowledged with the same workflow id")
        runs = chaos_tools.executions(self.state_dir)
        per_key = Counter(key for key, _, _, _ in runs)
        tool_of = {key: tool for key, _, tool, _ in runs}
        r.executions = len(runs)
        for key, n in per_key.items():
            if n > 1:
                r.steps_rerun[tool_of[key]] += 1
                r.reruns[tool_of[key]] += n - 1
        given_back = attempts_given_back(
            self.query("SELECT step_id, data_json FROM events WHERE type = 'step_requeued'")
        )
        for index, wf in sorted(workflows.items()):
            r.statuses[wf["status"]] += 1
            if wf["status"] not in TERMINAL:
                r.stuck.append(f"workflow {wf['id']} is {wf['status']}")
                continue
            self.check_walk(self.plans[index], wf)
            self.check_executions(wf, per_key, given_back)
            r.flaky_retries += flaky_retries(self.plans[index], wf, per_key)
        open_branches = self.query(
            "SELECT b.parent_id, b.key, b.status, w.status FROM branches b"
            " JOIN workflows w ON w.id = b.workflow_id"
            " WHERE b.status IN ('pending', 'running')"
            " AND w.status IN ('completed', 'failed', 'cancelled')"
        )
        for parent, key, status, wf_status in open_branches[:20]:
            r.problems.append(
                f"branch {key} of step {parent} is {status} in a {wf_status} workflow"
            )
        r.kinds.update(self.plans[i].kind for i in self.ids)
        self.check_paused(workflows)
        self.check_integrity()
        [(count,)] = self.query("SELECT count(*) FROM workflows")
        if count != len(self.plans):
            r.problems.append(f"{count} workflows in the database for {len(self.plans)} plans")

    def check_paused(self, workflows: dict[int, dict[str, Any]]) -> None:
        """Nothing started in a workflow while it was paused (between its `paused` and
        `resumed` events, in the log's order)."""
        ids = [str(self.ids[i]) for i in sorted(self.was_paused) if i in workflows]
        if not ids:
            return
        rows = self.query(
            "SELECT workflow_id, id, type, step_id, at FROM events WHERE type IN"
            f" ('paused', 'resumed', 'step_started') AND workflow_id IN ({', '.join(ids)})"
            " ORDER BY workflow_id, id"
        )
        steps = {s["id"]: s for wf in workflows.values() for s in wf["steps"]}
        paused_since: dict[int, tuple[int, int]] = {}
        for wf_id, event_id, kind, step_id, at in rows:
            if kind == "paused":
                paused_since[wf_id] = (event_id, at)
            elif kind == "resumed":
                paused_since.pop(wf_id, None)
            elif wf_id in paused_since:
                s = steps.get(step_id, {})
                self.report.problems.append(
                    f"workflow {wf_id}: step {step_id} ({s.get('state')} in {s.get('scope')},"
                    f" created {s.get('created_at')}) started (event {event_id} at {at}) while "
                    f"paused (since event {paused_since[wf_id][0]} at {paused_since[wf_id][1]})"
                )

    def check_walk(self, plan: Plan, wf: dict[str, Any]) -> None:
        """The steps must be a walk of the flow where every failure is an allowed one; so
        must each parallel branch's and map item's steps; a completed workflow's output is
        the plan's; no state visit is done twice; nothing is left waiting."""
        r = self.report
        where = f"workflow {wf['id']} (plan {plan.index}, {plan.kind}, {wf['status']})"
        children: dict[int, list[dict[str, Any]]] = {}
        for s in wf["steps"]:
            if s["parent_id"] is not None:
                children.setdefault(s["parent_id"], []).append(s)
        top = [s for s in wf["steps"] if s["parent_id"] is None]
        ended = self.walks(plan, plan.flow, plan.success, top, where, children)
        if ended is None:
            return
        trail = _trail(top)
        if ended != wf["status"]:
            r.problems.append(f"{where}: the steps end as {ended}: {trail}")
            return
        done = Counter((json.dumps(s["scope"]), s["state"]) for s in wf["steps"]
                       if s["status"] == "done")  # fmt: skip
        twice = [k for k, n in done.items() if n > 1]
        if twice:
            r.problems.append(f"{where}: visits done more than once: {twice}")
        for s in wf["steps"]:
            if s["status"] in ("pending", "running"):
                r.problems.append(f"{where}: step {s['id']} {s['state']} in {s['scope']} is "
                                  f"{s['status']} (awaiting {s['awaiting']})")  # fmt: skip
        for s in top:
            if s["kind"] in ("parallel", "map") and s["status"] in ("done", "failed"):
                self.check_composite(plan, wf, s, children.get(s["id"], []), where)
        if wf["status"] == "completed":
            self.check_output(plan, wf, top, where)
        failed_steps = sum(s["status"] == "failed" for s in top)
        done_top = [s["state"] for s in top if s["status"] == "done"]
        if wf["status"] == "completed" and failed_steps == 0:
            if done_top != plan.expected():
                r.problems.append(f"{where}: did {done_top}, expected {plan.expected()}")
            else:
                r.as_planned += 1

    def walks(
        self,
        plan: Plan,
        flow: dict[str, Any],
        success: dict[str, str | None],
        steps: list[dict[str, Any]],
        where: str,
        children: dict[int, list[dict[str, Any]]],
        *,
        cut: bool = False,
    ) -> str | None:
        """walk; for a workflow that was redriven, each run up to a failure or a
        cancellation is a walk of its own, the redrive going on from there."""
        if plan.index not in self.redriven:
            return self.walk(plan, flow, success, steps, where, children, cut=cut)
        runs: list[list[dict[str, Any]]] = [[]]
        for step in steps:
            runs[-1].append(step)
            if step["status"] in ("failed", "cancelled"):
                runs.append([])
        if not runs[-1] and len(runs) > 1:
            runs.pop()
        for run in runs[:-1]:
            first = run[0]["state"]
            ended = self.walk(plan, flow, {**success}, run, where, children, cut=True,
                              start=first)  # fmt: skip
            if ended not in ("failed", "cancelled"):
                if ended is not None:
                    self.report.problems.append(f"{where}: a redriven run ended {ended}")
                return None
        return self.walk(plan, flow, success, runs[-1], where, children, cut=cut,
                         start=runs[-1][0]["state"] if runs[-1] else "start")  # fmt: skip

    def walk(
        self,
        plan: Plan,
        flow: dict[str, Any],
        success: dict[str, str | None],
        steps: list[dict[str, Any]],
        where: str,
        children: dict[int, list[dict[str, Any]]],
        *,
        cut: bool = False,
        start: str = "start",
    ) -> str | None:
        """Check that `steps` (one flow's, in order, from state `start`) walk `flow` with
        allowed failures only. Returns how they end ("completed", "failed", or, with `cut`
        (a branch of a failed parallel or map), "cancelled"), or None after noting a
        problem."""
        r = self.report
        trail = _trail(steps)
        state: str | None = start
        ended: str | None = None
        for i, step in enumerate(steps):
            if state is None or step["state"] != state:
                r.problems.append(
                    f"{where}: step {i} is {step['state']}, expected {state}: {trail}"
                )
                return None
            spec = flow[state]
            if step["status"] == "done":
                if "tool" in spec and spec["tool"] is None:
                    key = gate_key(state, step["scope"])
                    answer = json.loads(step["result_json"] or "null")
                    if answer != plan.answers[key] or step["decided_by"] != PERSON:
                        r.problems.append(
                            f"{where}: gate {key} done with {answer!r} by "
                            f"{step['decided_by']!r}, approved with {plan.answers[key]!r}"
                        )
                elif step["result_json"] is not None and spec.get("tool"):
                    result = json.loads(step["result_json"])
                    if isinstance(result, dict) and "attempt" in result:
                        if result["attempt"] != step["attempt"]:
                            r.problems.append(
                                f"{where}: {state} result is from attempt {result['attempt']}, "
                                f"the step says {step['attempt']}"
                            )
                state = success[state]
                ended = "completed" if state is None else None
            elif step["status"] == "failed":
                why = self.allowed_failure(plan, spec, step, children)
                if why is None:
                    r.problems.append(
                        f"{where}: {state} failed unexpectedly "
                        f"({step['error']!r}, attempt {step['attempt']}): {trail}"
                    )
                    return None
                state = spec.get("on_error")
                ended = "failed" if state is None else None
            elif step["status"] == "cancelled" and cut and i == len(steps) - 1:
                return "cancelled"
            else:
                r.problems.append(f"{where}: {state} is still {step['status']}: {trail}")
                return None
            if ended is not None and i != len(steps) - 1:
                r.problems.append(f"{where}: steps after the end: {trail}")
                return None
        if ended is None:
            r.problems.append(f"{where}: the steps stop before an end: {trail}")
        return ended

    def check_composite(
        self,
        plan: Plan,
        wf: dict[str, Any],
        step: dict[str, Any],
        kids: list[dict[str, Any]],
        where: str,
    ) -> None:
        """The branches (items) of a parallel (map) step that ended: each a walk of its flow;
        a done step's result is its branches' results (by name; in item order); a failed one
        has a failed branch (more failed items than tolerated) and nothing left running
        inside, and nothing inside finished after it."""
        r = self.report
        r.nested_steps += len(kids)
        spec = plan.flow[step["state"]]
        where = f"{where} {step['kind']} {step['state']} (step {step['id']})"
        by_branch: dict[str, list[dict[str, Any]]] = {}
        for kid in kids:
            scope = kid["scope"] or []
            if len(scope) != 2 or scope[0] != step["state"]:
                r.problems.append(f"{where}: step {kid['id']} has scope {scope}")
                return
            by_branch.setdefault(str(scope[1]), []).append(kid)
        failed = step["status"] == "failed"
        ends: dict[str, str | None] = {}
        flows_: dict[str, dict[str, Any]] = {}
        if step["kind"] == "parallel":
            flows_ = dict(spec["parallel"])
            if set(by_branch) != set(flows_):
                r.problems.append(
                    f"{where}: branches {sorted(by_branch)}, planned {sorted(flows_)}"
                )
                return
        else:
            items = plan.input["items"]
            keys = {str(i) for i in range(len(items))}
            if not set(by_branch) <= keys or (not failed and set(by_branch) != keys):
                r.problems.append(f"{where}: items {sorted(by_branch, key=int)} of {len(items)}")
                return
            flows_ = {k: spec["map"]["flow"] for k in by_branch}
            self.check_concurrency(kids, spec["map"]["max_concurrency"], where)
        for key, sub in flows_.items():
            success = {s: sub_spec.get("next") for s, sub_spec in sub.items()}
            ends[key] = self.walks(plan, sub, success, by_branch.get(key, []),
                                   f"{where} branch {key}", {}, cut=failed)  # fmt: skip
        if None in ends.values():
            return
        finished = step["completed_at"] or 0
        late = [
            k["id"] for k in kids if k["status"] == "done" and (k["completed_at"] or 0) > finished
        ]
        if late:
            detail = [(k["id"], k["state"], k["scope"], k["attempt"], k["created_at"],
                       k["started_at"], k["completed_at"]) for k in kids]  # fmt: skip
            r.problems.append(
                f"{where}: steps {late} finished after the step itself (attempt "
                f"{step['attempt']}, created {step['created_at']}, started {step['started_at']}, "
                f"completed {finished}); inside: {detail}"
            )
        r.cancelled_inside += sum(k["status"] == "cancelled" for k in kids)
        n_failed = sum(e == "failed" for e in ends.values())
        if failed:
            tolerated = 0 if step["kind"] == "parallel" else spec["map"]["tolerated_failures"]
            own = step["error"] or ""  # out of recovery attempts itself, before its join
            if n_failed <= tolerated and "out of attempts" not in own:
                r.problems.append(f"{where}: failed with {n_failed} failed branches: {ends}")
            return
        if any(e == "cancelled" for e in ends.values()):
            r.problems.append(f"{where}: done with cancelled branches: {ends}")
            return
        result = json.loads(step["result_json"] or "null")
        last = {k: json.loads(steps[-1]["result_json"] or "null") for k, steps in by_branch.items()}
        if step["kind"] == "parallel":
            if n_failed or result != last:
                r.problems.append(f"{where}: result {result!r}, the branches gave {last!r}")
            return
        tolerated = spec["map"]["tolerated_failures"]
        if n_failed > tolerated or not isinstance(result, list) or len(result) != len(last):
            r.problems.append(f"{where}: {n_failed} failed items, result {result!r}")
            return
        for i, slot in enumerate(result):
            if ends[str(i)] == "completed":
                ok = slot == last[str(i)]
            else:
                ok = isinstance(slot, dict) and set(slot) == {"error"}
            if not ok:
                r.problems.append(f"{where}: item {i} gave {slot!r} ({ends[str(i)]})")

    def check_concurrency(self, kids: list[dict[str, Any]], limit: int, where: str) -> None:
        """At no time more map items open than max_concurrency (an item is open from its
        first step's creation to its last step's end)."""
        spans: dict[str, list[int]] = {}
        for kid in kids:
            span = spans.setdefault(str(kid["scope"][1]), [kid["created_at"], 0])
            span[0] = min(span[0], kid["created_at"])
            span[1] = max(span[1], kid["completed_at"] or 1 << 62)
        moments = sorted(
            [(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()],
            key=lambda m: (m[0], m[1]),
        )  # fmt: skip  ends first at a tie
        open_, most = 0, 0
        for _, delta in moments:
            open_ += delta
            most = max(most, open_)
        if most > limit:
            self.report.problems.append(f"{where}: {most} items open at once (max {limit})")

    def check_output(
        self, plan: Plan, wf: dict[str, Any], top: list[dict[str, Any]], where: str
    ) -> None:
        """A completed workflow's output is the result of its last step, and what the plan
        says (parallel, map, wait), unless an allowed failure took it elsewhere."""
        r = self.report
        output = wf.get("output")
        last = json.loads(top[-1]["result_json"] or "null") if top else None
        if output != last:
            r.problems.append(f"{where}: output {output!r}, its last step gave {last!r}")
            return
        if plan.output is None:
            return
        r.outputs_checked += 1
        ended_in = top[-1]["state"]
        if ended_in == "handle":
            message = output.get("message") or ""
            if output.get("handled") is not True or "failed" not in message:
                r.problems.append(f"{where}: handled with {output!r}")
            return
        if plan.fails:
            r.problems.append(f"{where}: a planned failure did not happen: {output!r}")
            return
        if plan.kind == "map":
            if not isinstance(output, list) or len(output) != len(plan.output):
                r.problems.append(f"{where}: output {output!r}, expected {plan.output!r}")
                return
            for i, (got, want) in enumerate(zip(output, plan.output, strict=True)):
                error = got.get("error") if isinstance(got, dict) else None
                message = (error or {}).get("message") or ""
                if want is None:
                    ok = "chaos_item failure" in message
                else:  # an item out of recovery attempts leaves an error in its slot
                    ok = got == want or "out of attempts" in message
                if not ok:
                    r.problems.append(f"{where}: item {i} gave {got!r}, expected {want!r}")
            return
        want = plan.output
        if plan.kind == "redrive":
            want = {"fan": {**want["fan"], "c": {"once": f"wf-{wf['id']}"}}}
        if output != want:
            r.problems.append(f"{where}: output {output!r}, expected {want!r}")
        if plan.kind == "timer":
            hold = next(s for s in top if s["state"] == "hold")
            seconds = plan.flow["hold"]["wait"]["seconds"]
            if top[-1]["created_at"] < hold["created_at"] + seconds * 1000 - 1:
                r.problems.append(f"{where}: a {seconds} s timer ended after "
                                  f"{top[-1]['created_at'] - hold['created_at']} ms")  # fmt: skip

    def allowed_failure(
        self,
        plan: Plan,
        spec: dict[str, Any],
        step: dict[str, Any],
        children: dict[int, list[dict[str, Any]]],
    ) -> str | None:
        error = step["error"] or ""
        tool = spec.get("tool")
        max_attempts = spec.get("retry", {}).get("max_attempts", 1)
        if tool == "chaos_flaky" and spec["args"]["fail_first"] >= max_attempts:
            if "chaos_flaky failure" in error and step["attempt"] == max_attempts:
                self.report.retry_failures += 1
                return "out of retries"
        if tool == "chaos_charge" and step["decided_by"] == PERSON:
            return "a person failed it"
        if tool == "chaos_once" and "chaos_once failure" in error:
            return "planned (the first time)"
        if tool == "chaos_item" and "chaos_item failure" in error:
            fail = spec["args"]["fail"]
            if not isinstance(fail, bool):  # a map item's: from its item
                fail = plan.input["items"][step["scope"][-1]]["fail"]
            if fail:
                return "planned"
        if ("parallel" in spec or "map" in spec) and any(
            k["status"] == "failed" for k in children.get(step["id"], [])
        ):
            return "a branch failed"  # whether it could is checked with the branches
        if "out of attempts" in error and step["attempt"] >= max(max_attempts, RECOVERY_ATTEMPTS):
            self.report.recovery_failures += 1
            return "interrupted too often"
        return None

    def check_executions(
        self, wf: dict[str, Any], per_key: Counter[str], given_back: Counter[int]
    ) -> None:
        r = self.report
        for step in wf["steps"]:
            key = f"{wf['id']}:{step['id']}"
            n = per_key.get(key, 0)
            where = f"workflow {wf['id']} step {step['state']} ({step['tool']}, key {key})"
            # A planned stop that cut a step off gave its attempt back: it runs again as the
            # same attempt.
            runs = step["attempt"] + given_back[step["id"]]
            if step["tool"] in IDEMPOTENT_TOOLS and n > runs:
                r.problems.append(
                    f"{where}: executed {n} times but its final attempt is {step['attempt']} "
                    f"and {given_back[step['id']]} attempts were given back"
                )
            if step["tool"] == "chaos_charge" and n > 1:
                r.problems.append(f"{where}: non-idempotent step executed {n} times")
            if step["tool"] and step["tool"].startswith("chaos_") and step["status"] == "done":
                if n == 0:
                    r.problems.append(f"{where}: done, but its tool never ran")


def _trail(steps: list[dict[str, Any]]) -> list[str]:
    return [f"{s['state']}:{s['status']}@{s['attempt']}" for s in steps]


def attempts_given_back(requeued: list[tuple[Any, ...]]) -> Counter[int]:
    """Per step id: how often a stop put it back in the queue without counting its attempt,
    from the (step_id, data_json) of the `step_requeued` events."""
    return Counter(step for step, data in requeued if json.loads(data).get("attempt_given_back"))


def flaky_retries(plan: Plan, wf: dict[str, Any], per_key: Counter[str]) -> int:
    """Executions of the workflow's flaky step beyond its first that retried one of its
    deliberate failures (attempts 1..fail_first fail on purpose while retries last); the
    rest of its re-runs come from interruptions."""
    if plan.kind != "flaky":
        return 0
    spec = plan.flow["start"]
    planned = min(spec["args"]["fail_first"], spec["retry"]["max_attempts"] - 1)
    runs = sum(
        per_key.get(f"{wf['id']}:{s['id']}", 0) for s in wf["steps"] if s["tool"] == "chaos_flaky"
    )
    return max(0, min(runs - 1, planned))


# -- several daemons on one PostgreSQL database -------------------------------------------


NODES = ("a", "b", "c")


def write_cluster_config(
    path: Path, *, port: int, url: str, node: str, concurrency: int, lease_s: float
) -> Path:
    """The chaos config of one daemon among several on the database at `url`."""
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
node_id = "{node}"

[database]
url = "{url}"

[executor]
poll_interval = 0.05
shutdown_grace = 0.5
concurrency = {concurrency}
recovery_attempts = {RECOVERY_ATTEMPTS}
lease_s = {lease_s}

[tools]
modules = ["daemon.tools.demo", "tests.chaos_tools"]

[[auth.tokens]]
name = "{PERSON}"
sha256 = "{hash_token(TOKEN)}"
permissions = ["workflow"]
"""
    )
    return path


@dataclass
class ClusterReport(Report):
    nodes: tuple[str, ...] = NODES
    lease_s: float = 0.0
    kills_by: Counter[str] = field(default_factory=Counter)
    left_down: int = 0  # kills after which the daemon stayed down while work went on
    most_down: int = 0  # the most daemons down at once
    down_s: dict[str, float] = field(default_factory=dict)  # per daemon: time not serving
    executions_by: Counter[str] = field(default_factory=Counter)
    moved: int = 0  # steps whose executions ran on more than one daemon
    answers_by: Counter[str] = field(default_factory=Counter)  # HTTP answers per daemon

    def _shares(self, counts: Counter[str]) -> str:
        total = sum(counts.values()) or 1
        return ", ".join(f"{n} {counts[n]} ({100 * counts[n] / total:.0f}%)" for n in self.nodes)

    def rows(self) -> list[tuple[str, str]]:
        extra = {
            "kills during a graceful stop (of SIGTERMs)": [
                (
                    "daemons on one PostgreSQL database",
                    f"{len(self.nodes)} (lease {self.lease_s} s)",
                ),
                ("kills per daemon", ", ".join(f"{n} {self.kills_by[n]}" for n in self.nodes)),
                ("kills leaving the daemon down a while", str(self.left_down)),
                ("most daemons down at once", str(self.most_down)),
                (
                    "time down per daemon",
                    ", ".join(f"{n} {self.down_s.get(n, 0.0):.1f} s" for n in self.nodes),
                ),  # fmt: skip
            ],
            "tool executions recorded": [
                ("executions per daemon", self._shares(self.executions_by)),
                ("steps run on more than one daemon", str(self.moved)),
            ],
            "5xx answers": [("HTTP answers per daemon", self._shares(self.answers_by))],
        }
        out: list[tuple[str, str]] = []
        for row in super().rows():
            out.append(row)
            out += extra.get(row[0], [])
        return out


class _Router(httpx.BaseTransport):
    """Sends each request to the next daemon in turn, passing over those that refuse the
    connection (down, or not listening yet): the request was not sent, so another may
    take it. Raises the last ConnectError when none would."""

    def __init__(self, run: ClusterChaosRun) -> None:
        self.run = run
        self.inner = httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        error: httpx.ConnectError | None = None
        for name in self.run.rotation():
            port = self.run.daemons[name].port
            request.url = request.url.copy_with(port=port)
            request.headers["Host"] = f"127.0.0.1:{port}"
            try:
                resp = self.inner.handle_request(request)
            except httpx.ConnectError as exc:
                error = exc
                continue
            with self.run.lock:
                self.run.report.answers_by[name] += 1
            return resp
        assert error is not None
        raise error

    def close(self) -> None:
        self.inner.close()


class ClusterChaosRun(ChaosRun):
    """The chaos run against several daemons (a, b, c) on one PostgreSQL database.

    Each kill picks one of the daemons that are up; it is restarted under the same
    node_id at once (and perhaps killed again while it starts up), or, after about one
    kill in three, left down for up to two leases while the kills go on (unless no
    other daemon is up), so that the others take its steps over when its leases run
    out. The submitter and the person send each request to the next daemon in turn,
    passing over those that are down. All share one state directory: the chaos tools'
    log says which daemon ran each execution.
    """

    report: ClusterReport

    def __init__(
        self,
        workdir: Path,
        *,
        url: str,
        nodes: tuple[str, ...] = NODES,
        lease_s: float = 3.0,
        **kwargs: Any,
    ) -> None:
        self.url = url
        self.nodes = nodes
        self.lease_s = lease_s
        super().__init__(workdir, **kwargs)
        rng = random.Random(f"cluster-{self.seed}")  # leaves the base run's draws as they are
        self.pick = rng
        self.down_for = [
            rng.uniform(1.0, 2 * lease_s) if rng.random() < 0.3 else None for _ in self.delays
        ]
        self.down_until: dict[str, float] = {}
        self.down_since: dict[str, float] = {}  # name -> when it was last killed
        self.turn = 0
        self.report = ClusterReport(seed=self.seed, nodes=nodes, lease_s=lease_s)

    def setup(self, workdir: Path, concurrency: int) -> None:
        self.workdir = workdir
        state = workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.daemons: dict[str, Daemon] = {}
        for name in self.nodes:
            home = workdir / name
            home.mkdir(exist_ok=True)
            port = free_port()
            cfg = write_cluster_config(home / "stepd.toml", port=port, url=self.url, node=name,
                                       concurrency=concurrency, lease_s=self.lease_s)  # fmt: skip
            daemon = Daemon(home, cfg, port, PYTHONPATH=pythonpath, STEPD_TEST_NODE=name)
            daemon.env["STATE_DIRECTORY"] = str(state)  # shared: chaos.db, secrets
            self.daemons[name] = daemon
        self.daemon = self.daemons[self.nodes[0]]

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    def check_integrity(self) -> None:
        self.report.integrity["chaos.db"] = chaos_tools.integrity(
            self.state_dir / chaos_tools.DB_NAME
        )

    def close(self) -> None:
        self.stop.set()
        for daemon in self.daemons.values():
            daemon.kill()

    def logs(self, chars: int = 2000) -> str:
        return "\n".join(
            f"--- {name} (run {d.runs}) stderr ---\n{d.stderr()[-chars:]}"
            for name, d in self.daemons.items()
        )

    # -- HTTP through whichever daemons are up --------------------------------------

    def rotation(self) -> list[str]:
        """The daemons to try for the next request: the next in turn first, those up
        before those down."""
        with self.lock:
            self.turn += 1
            turn = self.turn
        order = [self.nodes[(turn + i) % len(self.nodes)] for i in range(len(self.nodes))]
        return sorted(order, key=lambda n: not self.up(n))

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.daemons[self.nodes[0]].url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5.0,
            transport=_Router(self),
        )

    # -- the kills -------------------------------------------------------------------

    def up(self, name: str) -> bool:
        proc = self.daemons[name].proc
        return proc is not None and proc.poll() is None

    def alive(self) -> bool:
        return any(self.up(n) for n in self.nodes)

    def restart(self, name: str) -> None:
        self.down_until.pop(name, None)
        self.daemons[name].started(timeout=30)
        self.report.restarts += 1
        since = self.down_since.pop(name, None)
        if since is not None:
            down = self.report.down_s
            down[name] = down.get(name, 0.0) + time.monotonic() - since

    def run(self) -> Report:
        t0 = time.monotonic()
        threads = self._threads()
        r = self.report
        try:
            for name in self.nodes:  # one at a time: the first migrates the database
                self.daemons[name].started(timeout=30)
            for t in threads:
                t.start()
            events = zip(self.delays, self.early, self.graceful, self.down_for, strict=True)
            for delay, early, graceful, down in events:
                time.sleep(delay)
                for name, until in sorted(self.down_until.items()):
                    if time.monotonic() >= until:
                        self.restart(name)
                victim = self.pick.choice([n for n in self.nodes if self.up(n)])
                self.kill_node(victim, graceful)
                daemon = self.daemons[victim]
                if early is not None:
                    daemon.start()
                    r.restarts += 1
                    time.sleep(early)
                    if self.up(victim):
                        daemon.kill()
                        r.kills += 1
                        r.startup_kills += 1
                        r.kills_by[victim] += 1
                if down is None or not self.alive():  # one at least stays up
                    self.restart(victim)
                else:
                    self.down_until[victim] = time.monotonic() + down
                    r.left_down += 1
                r.most_down = max(r.most_down, sum(not self.up(n) for n in self.nodes))
                self.phase += 1
            for name, until in sorted(self.down_until.items()):
                time.sleep(max(0.0, until - time.monotonic()))
                self.restart(name)
            self.settle()
        finally:
            self.stop.set()
            for t in threads:
                if t.is_alive():
                    t.join(10)
            self.finish()
        r.seconds = time.monotonic() - t0
        return r

    def kill_node(self, name: str, after_sigterm: float | None) -> None:
        """SIGKILL daemon `name` (reaped); with `after_sigterm`, that long into a graceful
        stop (unless it exited by then)."""
        daemon, r = self.daemons[name], self.report
        self.down_since[name] = time.monotonic()  # from the SIGTERM, if any, on
        if after_sigterm is not None:
            daemon.signal(signal.SIGTERM)
            r.sigterms += 1
            deadline = time.monotonic() + after_sigterm
            while self.up(name) and time.monotonic() < deadline:
                time.sleep(0.005)
            if not self.up(name):
                assert daemon.proc is not None
                if daemon.proc.returncode != 0:
                    r.problems.append(
                        f"stepd {name} exited {daemon.proc.returncode} on SIGTERM: "
                        + daemon.stderr()[-500:]
                    )
                return
            r.stopping_kills += 1
        daemon.kill()
        r.kills += 1
        r.kills_by[name] += 1

    def finish(self) -> None:
        """Read every acknowledged workflow, stop the daemons, check the logs."""
        workflows: dict[int, dict[str, Any]] = {}
        if self.alive():
            workflows = self.read_workflows()
        for name, daemon in self.daemons.items():
            if self.up(name):
                daemon.signal(signal.SIGTERM)
        for name, daemon in self.daemons.items():
            if daemon.proc is not None and daemon.proc.returncode is None:
                code = daemon.wait(15)
                if code != 0:
                    self.report.problems.append(f"stepd {name} exited {code} on SIGTERM")
        self.close()
        self.verify(workflows)
        r = self.report
        by_key: dict[str, set[str]] = {}
        for key, _, node in chaos_tools.nodes(self.state_dir):
            r.executions_by[node or "?"] += 1
            by_key.setdefault(key, set()).add(node or "?")
        r.moved = sum(len(nodes) > 1 for nodes in by_key.values())
        if r.executions_by["?"]:
            r.problems.append(f"{r.executions_by['?']} executions by no known daemon")


def _by_tool(counts: Counter[str]) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{tool} {n}" for tool, n in sorted(counts.items()))
    return f"{total} ({parts})" if parts else "0"


# -- the test --------------------------------------------------------------------------


@pytest.fixture
def chaos(tmp_path: Path) -> Iterator[list[ChaosRun]]:
    runs: list[ChaosRun] = []
    yield runs
    for run in runs:
        run.close()


def test_sigkill_chaos_loses_nothing_and_repeats_no_side_effect(
    chaos: list[ChaosRun], tmp_path: Path
) -> None:
    seed = chaos_seed()
    print(f"\n{SEED_ENV}={seed}")
    run = ChaosRun(tmp_path / "chaos", seed=seed, workflows=200, kills=6, settle_timeout=30)
    chaos.append(run)
    report = run.run()
    print(report.table())
    assert report.kills >= 4
    assert report.workflows == 200
    failures = report.failures()
    assert not failures, f"seed {seed}: " + "\n".join(failures[:30])


@pytest.mark.postgresql_only
@pytest.mark.timeout(240)
def test_sigkill_chaos_on_three_daemons_loses_nothing_and_repeats_no_side_effect(
    chaos: list[ChaosRun], tmp_path: Path
) -> None:
    seed = chaos_seed()
    print(f"\n{SEED_ENV}={seed}")
    url = backend.database_url(tmp_path / "cluster.db")
    run = ClusterChaosRun(
        tmp_path / "chaos", url=url, seed=seed, workflows=100, kills=6, settle_timeout=60
    )
    chaos.append(run)
    report = run.run()
    print(report.table())
    assert report.kills >= 4
    assert report.workflows == 100
    assert len(+report.executions_by) == 3, report.executions_by  # every daemon worked
    failures = report.failures()
    assert not failures, f"seed {seed}: " + "\n".join(failures[:30]) + "\n" + run.logs()
