"""A planned stop (SIGTERM, Ctrl-C) costs no attempt; a second signal stops at once.

Against the real `stepd serve`: the step of a long `sleep` is cut off by the stop and
requeued with its attempt given back, however often that happens; a crash (kill -9)
still counts an attempt, as tests/test_process.py checks.
"""

from __future__ import annotations

import signal
import socket
import time

import orjson
import pytest

from tests import backend
from tests.process_helpers import (
    TOKEN,
    Daemon,
    create,
    sleep_flow,
    step_running,
    wait_for,
)
from tests.test_process import Spawn, spawn

__all__ = ["spawn"]  # the fixture, shared with test_process


def step_row(daemon: Daemon, wf_id: int) -> tuple[str, int, str | None]:
    """(status, attempt, awaiting) of the workflow's first step, read from the database."""
    rows = backend.query(
        daemon.workdir.parent / "stepd.db",
        "SELECT status, attempt, awaiting FROM steps WHERE workflow_id = :wf ORDER BY id",
        {"wf": wf_id},
    )
    return rows[0][0], rows[0][1], rows[0][2]


def requeue_reasons(daemon: Daemon, wf_id: int) -> list[str]:
    rows = backend.query(
        daemon.workdir.parent / "stepd.db",
        "SELECT data_json FROM events WHERE workflow_id = :wf AND type = 'step_requeued'"
        " ORDER BY id",
        {"wf": wf_id},
    )
    return [orjson.loads(r[0])["reason"] for r in rows]


def wait_for_log(daemon: Daemon, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.stderr():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged in {timeout}s:\n{daemon.stderr()}")
        time.sleep(0.02)


def test_stops_during_a_long_step_cost_no_attempt(spawn: Spawn) -> None:
    d = spawn("stops", shutdown_grace=0.2)
    wf_id = None
    for _ in range(3):
        d.started()
        with d.client() as c:
            if wf_id is None:
                wf_id = create(c, sleep_flow(2.0))
            wait_for(c, wf_id, step_running, timeout=5)
        assert d.stop() == 0, d.stderr()
        assert step_row(d, wf_id) == ("pending", 0, None), d.stderr()  # its attempt given back
    assert wf_id is not None
    reasons = requeue_reasons(d, wf_id)
    assert len(reasons) == 3 and all("stopping" in r for r in reasons), reasons
    d.started()
    with d.client() as c:
        wf = wait_for(c, wf_id, timeout=10)
    assert wf["status"] == "completed", wf
    assert wf["steps"][0]["attempt"] == 1, wf
    assert d.stop() == 0


def open_event_stream(port: int) -> socket.socket:
    """A raw SSE request that stays open (a browser's live page, `stepd watch`)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        .encode()
    )  # fmt: skip
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


@pytest.mark.parametrize(
    ("sig", "stream"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm-in-the-grace", "ctrl-c-while-a-stream-is-open"],
)
def test_a_second_signal_stops_at_once_without_costing_an_attempt(
    spawn: Spawn, sig: signal.Signals, stream: bool
) -> None:
    d = spawn(sig.name, shutdown_grace=30.0).started()
    with d.client() as c:
        wf_id = create(c, sleep_flow(30.0))
        wait_for(c, wf_id, step_running, timeout=5)
    sock = open_event_stream(d.port) if stream else None
    try:
        d.signal(sig)
        # The first signal ends open event streams at once and waits for the running step.
        wait_for_log(d, "waiting up to 30.0s")
        time.sleep(0.2)
        assert d.proc is not None and d.proc.poll() is None
        t0 = time.monotonic()
        d.signal(sig)
        assert d.wait(timeout=20) == 0, d.stderr()
        assert time.monotonic() - t0 < 10, d.stderr()  # not the 30 s grace
        if sock is not None:  # the stream was ended, not left to the second signal
            sock.settimeout(5)
            while sock.recv(65536):
                pass
    finally:
        if sock is not None:
            sock.close()
    assert "at once" in d.stderr() and "Traceback" not in d.stderr(), d.stderr()
    assert step_row(d, wf_id) == ("pending", 0, None), d.stderr()
    d.started()
    with d.client() as c:
        wf = wait_for(c, wf_id, step_running, timeout=5)
    assert wf["steps"][0]["attempt"] == 1, wf
    d.kill()
