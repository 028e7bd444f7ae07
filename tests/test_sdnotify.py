"""The systemd notify protocol, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys

import pytest

from daemon import sdnotify

TIMEOUT = 1.0


@pytest.fixture
def receiver(tmp_path):
    """A bound datagram socket standing in for systemd's notify socket: (sock, NOTIFY_SOCKET)."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 108:  # sizeof(sun_path)
        pytest.skip("tmp_path too long for an AF_UNIX socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(TIMEOUT)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Everything already queued on `sock`, without waiting."""
    out, timeout = [], sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


def test_ready_arrives_over_path_socket(receiver):
    sock, path = receiver
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_multiline_state_is_sent_verbatim(receiver):
    sock, path = receiver
    assert sdnotify.notify("READY=1\nSTATUS=serving on 127.0.0.1:8080", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:8080"


def test_defaults_to_os_environ(receiver, monkeypatch):
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_ready_arrives_over_abstract_socket():
    name = f"stepd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_unset_notify_socket_returns_false(monkeypatch, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False
    assert caplog.records == []


@pytest.mark.parametrize("value", ["relative/notify.sock", "/nonexistent/stepd/notify.sock"])
def test_send_failure_is_logged_not_raised(value, caplog):
    with caplog.at_level(logging.WARNING, logger="stepd"):
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": value}) is False
    assert any("sd_notify" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_interval_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.0


async def recv(sock: socket.socket) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), TIMEOUT)


async def test_watchdog_loop_pings_until_cancelled(receiver):
    sock, path = receiver
    sock.setblocking(False)
    task = asyncio.create_task(sdnotify.watchdog_loop(0.02, env={"NOTIFY_SOCKET": path}))
    try:
        assert [await recv(sock) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_withholds_pings_while_unhealthy(receiver, caplog):
    sock, path = receiver
    sock.setblocking(False)
    state = {"ok": True}
    task = asyncio.create_task(
        sdnotify.watchdog_loop(0.02, lambda: state["ok"], env={"NOTIFY_SOCKET": path})
    )
    try:
        assert await recv(sock) == b"WATCHDOG=1"
        state["ok"] = False  # no ping can be sent after this point, only before it
        drain(sock)
        await asyncio.sleep(0.1)  # five intervals
        assert drain(sock) == []
        assert any("unhealthy" in r.getMessage() for r in caplog.records)

        state["ok"] = True  # a transient stall recovers
        assert await recv(sock) == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_treats_a_raising_check_as_unhealthy(receiver):
    sock, path = receiver
    sock.setblocking(False)

    def broken() -> bool:
        raise RuntimeError("executor wedged")

    task = asyncio.create_task(sdnotify.watchdog_loop(0.02, broken, env={"NOTIFY_SOCKET": path}))
    try:
        await asyncio.sleep(0.06)
        assert drain(sock) == []
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
