"""Helpers for tests that run the real `stepd serve` process over loopback HTTP.

Every wait here is bounded; a started process is always killed by its owner's finalizer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from daemon.auth import hash_token
from tests import backend

TERMINAL = {"completed", "failed", "cancelled"}
TOKEN = "tok-process-james"
# Inherited variables that would change how the daemon or the CLI behaves.
SCRUBBED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
    "STEPD_URL",
    "STEPD_TOKEN",
    "TOKEN",
)


def stepd_command() -> list[str]:
    """The `stepd` console script of this venv (falls back to `python -m daemon`)."""
    script = Path(sys.executable).parent / "stepd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def write_config(
    path: Path,
    *,
    port: int,
    db: Path,
    tokens: Iterable[tuple[str, str, str]] | None = (("james", TOKEN, "workflow"),),
    poll_interval: float = 0.2,
    shutdown_grace: float = 2.0,
    modules: tuple[str, ...] = ("daemon.tools.demo",),
    server: dict[str, int | float] | None = None,
) -> Path:
    """A TOML config; `tokens` is (name, token, permission) triples, None for none at all;
    `server` adds numeric [server] settings."""
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        *(f"{key} = {value}" for key, value in (server or {}).items()),
        "",
        "[database]",
        # On PostgreSQL, the test's database that stands for this path.
        f'url = "{backend.database_url(db)}"' if backend.POSTGRES else f'path = "{db}"',
        "",
        "[executor]",
        f"poll_interval = {poll_interval}",
        f"shutdown_grace = {shutdown_grace}",
        "",
        "[tools]",
        "modules = [" + ", ".join(f'"{m}"' for m in modules) + "]",
        "",
    ]
    for name, token, perm in tokens or ():
        lines += [
            "[[auth.tokens]]",
            f'name = "{name}"',
            f'sha256 = "{hash_token(token)}"',
            f'permissions = ["{perm}"]',
            "",
        ]
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """One `stepd serve --config FILE` process (restartable; each run logs to its own files)."""

    def __init__(
        self,
        workdir: Path,
        config: Path,
        port: int,
        *,
        preexec_fn: Callable[[], None] | None = None,
        **env: str,
    ) -> None:
        self.workdir = workdir
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. to set rlimits)
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = clean_env(STATE_DIRECTORY=str(workdir), **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.umask = -1  # the process's umask; -1: inherit this one
        self.runs = 0
        self.out_path = workdir / "run0.out"
        self.err_path = workdir / "run0.err"

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        self.out_path = self.workdir / f"run{self.runs}.out"
        self.err_path = self.workdir / f"run{self.runs}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*stepd_command(), "serve", "--config", str(self.config)],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                umask=self.umask,
                preexec_fn=self.preexec_fn,
            )
        return self

    def wait_healthy(self, timeout: float = 10.0) -> Daemon:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"stepd exited with {self.proc.returncode} before answering /healthz:\n"
                    + self.stderr()
                )
            try:
                resp = httpx.get(f"{self.url}/healthz", timeout=1.0)
                if resp.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"stepd not healthy after {timeout}s:\n{self.stderr()}")
            time.sleep(0.05)

    def started(self, timeout: float = 10.0) -> Daemon:
        return self.start().wait_healthy(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test (and kills the process) if it does not exit in time."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"stepd did not exit within {timeout}s; stderr:\n{self.stderr()}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL if still running, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - the kernel failed us
                pass

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    # -- HTTP ----------------------------------------------------------------------

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=5.0)


def create(client: httpx.Client, body: dict[str, Any]) -> int:
    resp = client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    data = resp.json()
    assert data["status"] == "started", data
    return int(data["id"])


def wait_for(
    client: httpx.Client,
    wf_id: int,
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll a workflow until `until(wf)` (default: a terminal status) or fail the test."""
    until = until or (lambda wf: wf["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/api/workflow/{wf_id}")
        assert resp.status_code == 200, resp.text
        wf = resp.json()
        if until(wf):
            return wf
        if time.monotonic() > deadline:
            raise AssertionError(f"workflow {wf_id} did not get there in {timeout}s: {wf}")
        time.sleep(0.05)


def step_running(wf: dict[str, Any]) -> bool:
    return bool(wf["steps"]) and wf["steps"][-1]["status"] == "running"


def gate_waiting(wf: dict[str, Any]) -> bool:
    return any(s.get("awaiting") == "ready" for s in wf["steps"])


def sleep_flow(seconds: float, name: str = "sleeper") -> dict[str, Any]:
    return {
        "name": name,
        "flow": {
            "start": {"name": "nap", "tool": "sleep", "args": {"seconds": seconds}, "done": True}
        },
        "input": {},
    }


def echo_flow(name: str = "echoer", **args: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow": {"start": {"name": "say", "tool": "echo", "args": args, "done": True}},
        "input": {},
    }


def gate_flow(name: str = "gated") -> dict[str, Any]:
    return {
        "name": name,
        "flow": {
            "start": {"name": "approve", "tool": None, "args": {}, "next": "after"},
            "after": {"name": "after", "tool": "echo", "args": {"x": 1}, "done": True},
        },
        "input": {},
    }


@contextlib.contextmanager
def cli_daemon(workdir: Path, reader: tuple[str, str]) -> Iterator[Daemon]:
    """A `stepd serve` for CLI tests: `james` with TOKEN (workflow) and `reader` (name,
    token) with the approve permission."""
    port = free_port()
    cfg = write_config(
        workdir / "stepd.toml",
        port=port,
        db=workdir / "stepd.db",
        shutdown_grace=1.0,
        tokens=(("james", TOKEN, "workflow"), (reader[0], reader[1], "approve")),
    )
    d = Daemon(workdir, cfg, port)
    try:
        yield d.started()
    finally:
        d.kill()


def run_cli(
    daemon: Daemon, *args: str, token: str = TOKEN, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """The real `stepd` CLI against `daemon`, its output captured."""
    return subprocess.run(
        [*stepd_command(), *args],
        env=clean_env(STEPD_URL=daemon.url, STEPD_TOKEN=token, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
