"""A client that goes away mid-body, against the real `stepd serve` over a raw socket."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.process_helpers import TOKEN
from tests.test_process import Spawn, spawn

__all__ = ["spawn"]  # the fixture, shared with test_process


def half_a_body(port: int, path: str, content_type: str, headers: str = "") -> None:
    """Send a request's headers and half of its announced body, then hang up."""
    body = b"x" * 200
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {2 * len(body)}\r\n{headers}\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.2)  # the app is reading the body by now


def wait_for_lines(err: Path, text: str, count: int, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = err.read_text(errors="replace")
        if log.count(text) >= count or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def test_a_client_that_hangs_up_mid_body_is_one_info_line(spawn: Spawn) -> None:
    d = spawn("gone").started()
    requests = [
        ("/api/workflow", "application/json", f"Authorization: Bearer {TOKEN}\r\n"),
        ("/ui/login", "application/x-www-form-urlencoded", ""),
        ("/link/some-token", "application/x-www-form-urlencoded", ""),
    ]
    for path, ctype, headers in requests:
        half_a_body(d.port, path, ctype, headers)
    log = wait_for_lines(d.err_path, "client disconnected", len(requests))
    lines = [line for line in log.splitlines() if "client disconnected" in line]
    assert len(lines) == len(requests), log
    for (path, _, _), line in zip(requests, lines, strict=True):
        assert line.startswith("INFO stepd.api: client disconnected"), line
        assert line.endswith(path.replace("some-token", "...")), line
    assert "Traceback" not in log and "ERROR" not in log, log
    assert httpx.get(f"{d.url}/healthz", timeout=2).status_code == 200
    assert d.stop() == 0
