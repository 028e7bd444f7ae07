"""Chaos: the real daemon, SIGKILLed at random moments while it works, loses nothing.

~200 workflows (chains of work, sleeps, gates, retried flaky steps, non-idempotent
charges, branches) are submitted over HTTP, each with an Idempotency-Key so that a
POST cut off by a kill is sent again, while the daemon is killed with SIGKILL at
random moments (some while it starts up, some during a graceful stop after SIGTERM)
and restarted on the same database. Throughout, and until every workflow has ended,
a "person" approves every waiting gate and declines (POST /fail) every interrupted
non-idempotent step. Then:

- every acknowledged workflow exists and is terminal (nothing lost, nothing stuck);
- every workflow's steps are a walk of its flow: each failure is one the scenario
  allows (a flaky step out of retries, a step out of recovery attempts, a step a
  person failed), so a completed workflow did exactly the expected states, in order;
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
IDEMPOTENT_TOOLS = {"chaos_work", "chaos_work_sync", "chaos_flaky"}
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

    def body(self, seed: int) -> dict[str, Any]:
        return {
            "name": f"chaos-{self.kind}",
            "flow": self.flow,
            "input": {"plan": self.index, "seed": seed},
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


def make_plan(rng: random.Random, index: int, seed: int) -> Plan:
    b = _Builder(rng)
    kind = rng.choices(
        ["chain", "sleep", "gate", "flaky", "charge", "branch", "gate_branch"],
        weights=[25, 10, 15, 15, 20, 10, 5],
    )[0]
    if kind == "chain":
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
    return Plan(index, kind, b.flow, b.success, b.answers, key=f"chaos-{seed}-{index}")


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

    def running_workflows(self, c: httpx.Client) -> list[int]:
        ids: list[int] = []
        before: int | None = None
        while True:
            params: dict[str, Any] = {"status": "running", "limit": 1000}
            if before is not None:
                params["before"] = before
            resp = self._note(c.get("/api/workflow", params=params), "GET /api/workflow")
            resp.raise_for_status()
            page = [int(w["id"]) for w in resp.json()]
            ids += page
            if len(page) < 1000:
                return ids
            before = page[-1]

    def person_pass(self, c: httpx.Client) -> None:
        """Approve every waiting gate (with the plan's answer); fail every step that waits
        for a retry-or-fail decision."""
        for wf_id in self.running_workflows(c):
            resp = self._note(c.get(f"/api/workflow/{wf_id}"), f"GET /api/workflow/{wf_id}")
            if resp.status_code != 200:
                continue
            wf = resp.json()
            plan = self.plans[wf["input"]["plan"]]
            for step in wf["steps"]:
                if step["awaiting"] == "ready":
                    answer = plan.answers[step["state"]]
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
        self.check_integrity()
        [(count,)] = self.query("SELECT count(*) FROM workflows")
        if count != len(self.plans):
            r.problems.append(f"{count} workflows in the database for {len(self.plans)} plans")

    def check_walk(self, plan: Plan, wf: dict[str, Any]) -> None:
        """The steps must be a walk of the flow where every failure is an allowed one."""
        r = self.report
        where = f"workflow {wf['id']} (plan {plan.index}, {plan.kind}, {wf['status']})"
        trail = [f"{s['state']}:{s['status']}@{s['attempt']}" for s in wf["steps"]]
        state: str | None = "start"
        failed_steps = 0
        ended: str | None = None
        for i, step in enumerate(wf["steps"]):
            if state is None or step["state"] != state:
                r.problems.append(
                    f"{where}: step {i} is {step['state']}, expected {state}: {trail}"
                )
                return
            spec = plan.flow[state]
            if step["status"] == "done":
                if spec["tool"] is None:
                    answer = json.loads(step["result_json"] or "null")
                    if answer != plan.answers[state] or step["decided_by"] != PERSON:
                        r.problems.append(
                            f"{where}: gate {state} done with {answer!r} by "
                            f"{step['decided_by']!r}, approved with {plan.answers[state]!r}"
                        )
                elif step["result_json"] is not None:
                    result = json.loads(step["result_json"])
                    if isinstance(result, dict) and "attempt" in result:
                        if result["attempt"] != step["attempt"]:
                            r.problems.append(
                                f"{where}: {state} result is from attempt {result['attempt']}, "
                                f"the step says {step['attempt']}"
                            )
                state = plan.success[state]
                ended = "completed" if state is None else None
            elif step["status"] == "failed":
                failed_steps += 1
                why = self.allowed_failure(plan, spec, step)
                if why is None:
                    r.problems.append(
                        f"{where}: {state} failed unexpectedly "
                        f"({step['error']!r}, attempt {step['attempt']}): {trail}"
                    )
                    return
                state = spec.get("on_error")
                ended = "failed" if state is None else None
            else:
                r.problems.append(f"{where}: {state} is still {step['status']}: {trail}")
                return
            if ended is not None and i != len(wf["steps"]) - 1:
                r.problems.append(f"{where}: steps after the end: {trail}")
                return
        if ended != wf["status"]:
            r.problems.append(f"{where}: the steps end as {ended}: {trail}")
            return
        done = [s["state"] for s in wf["steps"] if s["status"] == "done"]
        if wf["status"] == "completed" and failed_steps == 0:
            if done != plan.expected():
                r.problems.append(f"{where}: did {done}, expected {plan.expected()}")
            else:
                r.as_planned += 1

    def allowed_failure(self, plan: Plan, spec: dict[str, Any], step: dict[str, Any]) -> str | None:
        error = step["error"] or ""
        tool = spec.get("tool")
        max_attempts = spec.get("retry", {}).get("max_attempts", 1)
        if tool == "chaos_flaky" and spec["args"]["fail_first"] >= max_attempts:
            if "chaos_flaky failure" in error and step["attempt"] == max_attempts:
                self.report.retry_failures += 1
                return "out of retries"
        if tool == "chaos_charge" and step["decided_by"] == PERSON:
            return "a person failed it"
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
