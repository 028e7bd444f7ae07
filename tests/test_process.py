"""End-to-end tests of the real `stepd serve` process: HTTP, signals, restarts, systemd, CLI.

Each test starts `stepd serve --config <tmp toml>` on a free loopback port and
drives it over HTTP (or through the `stepd` client commands). Processes are
always killed in a finalizer; every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon.config import from_dict
from tests import backend
from tests.process_helpers import (
    TOKEN,
    Daemon,
    clean_env,
    create,
    echo_flow,
    free_port,
    gate_flow,
    gate_waiting,
    sleep_flow,
    step_running,
    stepd_command,
    wait_for,
    write_config,
)

Spawn = Callable[..., Daemon]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Make (not start) a daemon in its own directory; all are killed at the end."""
    made: list[Daemon] = []

    def make(
        name: str = "d",
        *,
        db: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        **config: Any,
    ) -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        port = port or free_port()
        cfg = write_config(
            workdir / "stepd.toml", port=port, db=db or tmp_path / "stepd.db", **config
        )
        daemon = Daemon(workdir, cfg, port, **(env or {}))
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests that do not stop or restart it."""
    workdir = tmp_path_factory.mktemp("shared")
    port = free_port()
    cfg = write_config(
        workdir / "stepd.toml", port=port, db=workdir / "stepd.db", shutdown_grace=1.0
    )
    daemon = Daemon(workdir, cfg, port)
    try:
        yield daemon.started()
    finally:
        daemon.kill()


# -- 1. the reference flow over real HTTP ----------------------------------------------


def test_reference_approval_flow_over_http(shared: Daemon) -> None:
    word = "zq" + uuid.uuid4().hex[:12]
    title = f"Policy {word}"
    with shared.client() as c:
        wf_id = create(
            c,
            {
                "name": "write-with-approval",
                "flow": {
                    "start": {
                        "name": "await_approval",
                        "tool": None,
                        "args": {},
                        "next": "do_write",
                    },
                    "do_write": {
                        "name": "do_write",
                        "tool": "knowledge_add",
                        "args": {
                            "title": "{{input.title}}",
                            "content": "{{input.content}}",
                            "scope": "general",
                        },
                        "done": True,
                    },
                },
                "input": {"title": title, "content": "All agents must request approval."},
            },
        )
        # The spec: the executor picks up the first step within one poll (0.2 s here).
        wf = wait_for(c, wf_id, gate_waiting, timeout=3)
        assert wf["status"] == "running"
        gate = wf["steps"][0]
        assert gate["status"] == "running"
        assert gate["awaiting"] == "ready"
        assert len(wf["steps"]) == 1

        resp = c.post(f"/api/workflow/{gate['id']}/ready")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"queued": True}

        wf = wait_for(c, wf_id, timeout=5)
        assert wf["status"] == "completed", wf
        assert wf["steps"][0]["status"] == "done"
        assert wf["steps"][1]["status"] == "done"
        assert wf["steps"][1]["name"] == "do_write"
        added = json.loads(wf["steps"][1]["result_json"])
        assert added["title"] == title

        search_id = create(
            c,
            {
                "name": "knowledge-search",
                "flow": {
                    "start": {
                        "name": "search",
                        "tool": "knowledge_search",
                        "args": {"query": "{{input.topic}}"},
                        "done": True,
                    }
                },
                "input": {"topic": word},
            },
        )
        found = wait_for(c, search_id, timeout=5)
        assert found["status"] == "completed", found
        hits = json.loads(found["steps"][0]["result_json"])
        assert [h["title"] for h in hits] == [title]


# -- 2. SIGTERM: finish within the grace period, or requeue ------------------------------


def test_sigterm_finishes_short_step_and_requeues_long_one(spawn: Spawn) -> None:
    a = spawn("a", shutdown_grace=5.0).started()
    with a.client() as c:
        short = create(c, sleep_flow(0.5))
        wait_for(c, short, step_running, timeout=3)
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.wait(timeout=6) == 0, a.stderr()
    assert time.monotonic() - t0 < 4

    # Same database, a short grace period this time.
    b = spawn("b", shutdown_grace=0.3).started()
    with b.client() as c:
        wf = c.get(f"/api/workflow/{short}").json()
        assert wf["status"] == "completed", wf  # it finished before the process exited
        assert wf["steps"][0]["status"] == "done"
        assert wf["steps"][0]["attempt"] == 1
        assert json.loads(wf["steps"][0]["result_json"]) == {"slept": 0.5}

        long = create(c, sleep_flow(2.0))
        wait_for(c, long, step_running, timeout=3)
    t0 = time.monotonic()
    b.signal(signal.SIGTERM)
    assert b.wait(timeout=5) == 0, b.stderr()
    assert time.monotonic() - t0 < 1.8  # did not wait for the 2 s sleep

    b.started()
    with b.client() as c:
        wf = wait_for(c, long, timeout=6)
    assert wf["status"] == "completed", wf
    assert wf["steps"][0]["status"] == "done"
    assert wf["steps"][0]["attempt"] == 1  # a planned stop costs no attempt
    b.stop()


# -- 3. SIGKILL: recovery at restart, nothing acknowledged is lost -----------------------


def test_sigkill_recovers_running_step_and_keeps_acknowledged_work(spawn: Spawn) -> None:
    d = spawn("k").started()
    with d.client() as c:
        sleeper = create(c, sleep_flow(1.0))
        wait_for(c, sleeper, step_running, timeout=3)
        echoes = [create(c, echo_flow(n=i)) for i in range(5)]
        gated = create(c, gate_flow())
    d.signal(signal.SIGKILL)
    assert d.wait(timeout=5) == -signal.SIGKILL

    d.started()
    with d.client() as c:
        wf = wait_for(c, sleeper, timeout=6)
        assert wf["status"] == "completed", wf
        assert wf["steps"][0]["attempt"] == 2
        assert json.loads(wf["steps"][0]["result_json"]) == {"slept": 1.0}
        for i, wf_id in enumerate(echoes):
            wf = wait_for(c, wf_id, timeout=5)
            assert wf["status"] == "completed", wf
            assert json.loads(wf["steps"][0]["result_json"]) == {"n": i}
        wf = wait_for(c, gated, gate_waiting, timeout=5)
        assert wf["status"] == "running"
        listed = {w["id"] for w in c.get("/api/workflow", params={"limit": 100}).json()}
    assert {sleeper, gated, *echoes} <= listed
    assert d.stop() == 0


def test_every_acknowledged_create_survives_kill_9(spawn: Spawn, tmp_path: Path) -> None:
    # Creates are group-committed: each 201 is sent only after its batch's COMMIT.
    d = spawn("gc").started()
    acknowledged: list[int] = []

    def submit(i: int) -> int | None:
        with d.client() as c:
            try:
                resp = c.post("/api/workflow", json=echo_flow(n=i))
            except httpx.HTTPError:
                return None  # the daemon died mid-request: not acknowledged
            return resp.json()["id"] if resp.status_code == 201 else None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(submit, i) for i in range(400)]
        for n, fut in enumerate(concurrent.futures.as_completed(futures)):
            if n == 150:
                d.signal(signal.SIGKILL)  # while the other requests are in flight
            wf_id = fut.result()
            if wf_id is not None:
                acknowledged.append(wf_id)
    assert d.wait(timeout=5) == -signal.SIGKILL
    assert len(acknowledged) >= 150
    stored = {r[0] for r in backend.query(tmp_path / "stepd.db", "SELECT id FROM workflows")}
    assert set(acknowledged) <= stored


# -- 4. systemd notify -----------------------------------------------------------------


def _recv_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Datagrams received until one carries the line `wanted`; fails after `timeout`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted} within {timeout}s; got {got}")
        sock.settimeout(left)
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got.append(msg)
        if wanted in msg.splitlines():
            return got


def _drain(sock: socket.socket) -> list[str]:
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return got


def test_systemd_notify_ready_and_stopping(spawn: Spawn) -> None:
    # A short directory: AF_UNIX paths are limited to ~108 bytes.
    with tempfile.TemporaryDirectory(prefix="stepd-") as short:
        path = str(Path(short) / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            d = spawn("n", env={"NOTIFY_SOCKET": path}).start()
            _recv_until(sock, "READY=1", timeout=10)
            # READY=1 means serving: /healthz answers at once, no retry needed.
            assert httpx.get(f"{d.url}/healthz", timeout=2).status_code == 200
            time.sleep(0.2)
            assert not any("STOPPING=1" in m.splitlines() for m in _drain(sock))

            d.signal(signal.SIGTERM)
            _recv_until(sock, "STOPPING=1", timeout=5)
            assert d.wait(timeout=5) == 0, d.stderr()


# -- 5. first-start token ----------------------------------------------------------------


@pytest.mark.sqlite_only  # files kept beside the SQLite database file
def test_first_start_prints_token_once_and_keeps_it(spawn: Spawn) -> None:
    d = spawn("t", tokens=None).started()
    out = d.stdout()
    assert out.count("export TOKEN=") == 1, out
    match = re.search(r"export TOKEN=(\S+)", out)
    assert match is not None
    token = match.group(1)
    # Only the hash is kept on disk, beside the database (not in the working directory).
    stored = (d.workdir.parent / "stepd-token.sha256").read_text()
    assert not (d.workdir / "stepd-token.sha256").exists()
    assert stored.strip() == hashlib.sha256(token.encode()).hexdigest()
    assert token not in stored
    with d.client(token) as c:
        resp = c.get("/api/workflow")
        assert resp.status_code == 200, resp.text
        assert resp.json() == []
        wf_id = create(c, echo_flow())
    with d.client("not-the-token") as c:
        assert c.get("/api/workflow").status_code == 401
    assert d.stop() == 0

    d.started()
    assert "export TOKEN=" not in d.stdout()
    assert token not in d.stdout() + d.stderr()
    with d.client(token) as c:
        resp = c.get(f"/api/workflow/{wf_id}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["created_by"] == "admin"
    assert d.stop() == 0


# -- 6. a second daemon on the same port ---------------------------------------------------


def test_second_serve_on_same_port_fails_cleanly(shared: Daemon, spawn: Spawn) -> None:
    other = spawn("second", port=shared.port).start()
    rc = other.wait(timeout=10)
    err = other.stderr()
    assert rc != 0, err
    assert "address already in use" in err.lower(), err
    assert str(shared.port) in err, err
    # A clear message, not an unhandled-exception dump.
    assert "Traceback" not in err, err
    assert "exception was never retrieved" not in err, err
    # The first daemon is unharmed.
    with shared.client() as c:
        assert c.get("/api/workflow").status_code == 200


def test_serve_exits_when_start_up_fails_after_the_store_opened(spawn: Spawn) -> None:
    # Start-up fails in the lifespan, after the database was opened: here recovering a
    # step whose workflow row another program wrote with a flow that does not parse.
    daemon = spawn("broken")
    db = daemon.workdir.parent / "stepd.db"
    daemon.started().stop()  # makes the schema
    backend.write(
        db,
        ("INSERT INTO workflows (id, name, flow_json, input_json, status, created_at,"
         " updated_at) VALUES (1, 'bad', '{\"start\": 1}', '{}', 'running', 0, 0)", {}),
        ("INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at,"
         " created_at, started_at, lease_until, attempt)"
         " VALUES (2, 1, 'start', 'start', 'echo', 'running', 1, 0, 0, 0, 0, 1)", {}),
    )  # fmt: skip
    rc = daemon.start().wait(timeout=15)  # it used to hang here: reader threads left open
    assert rc != 0, daemon.stderr()
    assert "startup failed" in daemon.stderr().lower(), daemon.stderr()


def test_failed_second_serve_leaves_running_steps_alone(shared: Daemon) -> None:
    """A second `stepd serve` with the same config (same database) that cannot bind
    must not requeue, claim or run the steps the live daemon is running."""
    with shared.client() as c:
        wf_id = create(c, sleep_flow(1.0, name="not-twice"))
        wait_for(c, wf_id, step_running, timeout=3)
        other = Daemon(shared.workdir / "second-run", shared.config, shared.port)
        other.workdir.mkdir(exist_ok=True)
        try:
            other.start()
            assert other.wait(timeout=10) != 0
        finally:
            other.kill()
        wf = wait_for(c, wf_id, timeout=6)
    assert wf["status"] == "completed", wf
    assert wf["steps"][0]["attempt"] == 1, (
        f"the step was requeued and run again because of the failed second daemon: {wf['steps'][0]}"
    )


# -- 7. the CLI against the running process -----------------------------------------------


def stepd(*args: str, url: str, token: str | None = TOKEN, cwd: Path | None = None) -> Any:
    env = clean_env(STEPD_URL=url)
    if token is not None:
        env["STEPD_TOKEN"] = token
    return subprocess.run(
        [*stepd_command(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )


def test_cli_against_running_daemon(shared: Daemon, tmp_path: Path) -> None:
    url = shared.url
    flow = tmp_path / "flow.json"
    flow.write_text(
        json.dumps(echo_flow(name="cli-flow", msg="{{input.msg}}") | {"input": {"msg": "hi"}})
    )

    # submit --wait --json: exit 0 once completed, the workflow printed as JSON.
    r = stepd("submit", str(flow), "--wait", "--json", url=url)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["status"] == "completed"
    assert shown["name"] == "cli-flow"
    assert json.loads(shown["steps"][0]["result_json"]) == {"msg": "hi"}
    wf_id = shown["id"]

    r = stepd("list", url=url)
    assert r.returncode == 0, r.stderr
    assert str(wf_id) in r.stdout
    assert "cli-flow" in r.stdout

    r = stepd("show", str(wf_id), "--json", url=url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id"] == wf_id

    # validate: exit 1 and every error printed.
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "name": "bad",
                "flow": {
                    "start": {"tool": "echo", "args": {}, "next": "nowhere"},
                    "other": {"tool": "no_such_tool", "args": {}, "done": True},
                },
            }
        )
    )
    r = stepd("validate", str(bad), url=url)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) >= 2, r.stdout
    assert "nowhere" in r.stdout
    assert "no_such_tool" in r.stdout
    assert r.stdout.strip().endswith("invalid")

    r = stepd("validate", str(flow), url=url)
    assert r.returncode == 0, r.stdout + r.stderr

    # ready --data: the gate's result is the approver's JSON, and the flow branches on it.
    branching = {
        "name": "cli-gate",
        "flow": {
            "start": {
                "name": "approve",
                "tool": None,
                "args": {},
                "branch": [{"if": "result.ok == true", "then": "yes"}, {"else": "no"}],
            },
            "yes": {"tool": "echo", "args": {"path": "yes"}, "done": True},
            "no": {"tool": "echo", "args": {"path": "no"}, "done": True},
        },
    }
    with shared.client() as c:
        gated = create(c, branching)
        gate = wait_for(c, gated, gate_waiting, timeout=3)["steps"][0]
        r = stepd("ready", str(gate["id"]), "--data", '{"ok": true}', url=url)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"queued": True}
        wf = wait_for(c, gated, timeout=5)
        assert wf["status"] == "completed", wf
        assert json.loads(wf["steps"][0]["result_json"]) == {"ok": True}
        assert wf["steps"][0]["decided_by"] == "james"
        assert [s["state"] for s in wf["steps"]] == ["start", "yes"]

        # cancel, then cancel again: 409 as one line on stderr.
        waiting = create(c, gate_flow(name="cli-cancel"))
        wait_for(c, waiting, gate_waiting, timeout=3)
        r = stepd("cancel", str(waiting), url=url)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"cancelled": True}
        wf = c.get(f"/api/workflow/{waiting}").json()
        assert wf["status"] == "cancelled"
        assert wf["steps"][0]["status"] == "cancelled"

    r = stepd("cancel", str(waiting), url=url)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("stepd: 409: "), r.stderr

    # Wrong token: 401.
    r = stepd("list", url=url, token="wrong-token")
    assert r.returncode == 1
    assert r.stderr.startswith("stepd: 401: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # Nothing listening.
    r = stepd("list", url=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "cannot reach" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_token_prints_a_matching_config_block(tmp_path: Path) -> None:
    r = stepd("token", "robot", url="http://127.0.0.1:9", token=None)
    assert r.returncode == 0, r.stderr
    match = re.search(r"^token: (\S+)$", r.stdout, re.M)
    assert match is not None, r.stdout
    token = match.group(1)
    block = r.stdout[r.stdout.index("[[auth.tokens]]") :]
    parsed = tomllib.loads(block)
    (entry,) = parsed["auth"]["tokens"]
    assert entry["name"] == "robot"
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert entry["permissions"] == ["workflow"]
    # The block is a valid config as printed.
    cfg = from_dict(parsed, env={"STATE_DIRECTORY": str(tmp_path)})
    assert [(t.name, t.permissions) for t in cfg.tokens] == [("robot", ("workflow",))]
    # A new token each time.
    again = stepd("token", "robot", url="http://127.0.0.1:9", token=None)
    assert token not in again.stdout


def test_cli_submit_wait_exits_nonzero_for_failed_flow(shared: Daemon, tmp_path: Path) -> None:
    flow = tmp_path / "fails.json"
    flow.write_text(
        orjson.dumps(
            {
                "name": "cli-fails",
                "flow": {"start": {"tool": "sleep", "args": {"seconds": -1}, "done": True}},
            }
        ).decode()
    )
    r = stepd("submit", str(flow), "--wait", "--json", url=shared.url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["status"] == "failed"


def test_sigterm_does_not_wait_for_a_blocked_sync_tool(spawn: Spawn) -> None:
    # A sync tool cannot be interrupted: past the grace period its step is requeued and
    # the process exits without joining the tool's thread.
    repo = str(Path(__file__).resolve().parents[1])
    d = spawn(
        "sync",
        shutdown_grace=0.3,
        modules=("daemon.tools.demo", "tests.sample_tools"),
        env={"PYTHONPATH": repo},
    ).started()
    body = {
        "name": "blocked",
        "flow": {"start": {"tool": "blocking_sleep", "args": {"seconds": 20}, "done": True}},
    }
    with d.client() as c:
        wf_id = create(c, body)
        wait_for(c, wf_id, step_running, timeout=3)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=8) == 0, d.stderr()
    assert time.monotonic() - t0 < 5  # not the 20 s the thread still sleeps
    [(status, attempt)] = backend.query(
        d.workdir.parent / "stepd.db",
        "SELECT status, attempt FROM steps WHERE workflow_id = :wf",
        {"wf": wf_id},
    )
    assert (status, attempt) == ("pending", 0)  # requeued, its attempt given back


def test_cli_watch_follows_a_workflow_to_its_end(shared: Daemon) -> None:
    with shared.client() as c:
        wf_id = create(c, gate_flow(name="watched"))
        gate = wait_for(c, wf_id, lambda wf: bool(wf["steps"]))["steps"][0]
    env = clean_env(STEPD_URL=shared.url, STEPD_TOKEN=TOKEN)
    watcher = subprocess.Popen(
        [*stepd_command(), "watch", str(wf_id)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        assert watcher.poll() is None  # still following: the gate waits
        with shared.client() as c:
            assert c.post(f"/api/workflow/{gate['id']}/ready").status_code == 200
        out, err = watcher.communicate(timeout=10)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"watching workflow {wf_id} (watched)")
    assert any(f"gate_waiting approve (stepd ready {gate['id']})" in line for line in lines)
    assert any("gate_decided approve: approve by james" in line for line in lines)
    assert lines[-1].endswith("completed")
    # A finished workflow: the replay ends at once with its outcome.
    again = stepd("watch", str(wf_id), url=shared.url)
    assert again.returncode == 0 and again.stdout.splitlines()[-1].endswith("completed")
    cancelled = stepd("watch", "42", url=shared.url)
    assert cancelled.returncode == 1 and "404" in cancelled.stderr
