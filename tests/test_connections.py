"""Connections to the real `stepd serve`: header and body deadlines, the connection cap,
and the open-file limit (tests/process_helpers.py; loopback only, bounded in time)."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.config import Config
from daemon.server import reserved_fds
from tests.process_helpers import TOKEN, Daemon, create, echo_flow, free_port, write_config

FD_LIMIT = 512  # the daemon's soft and hard RLIMIT_NOFILE in the flood test
FLOOD = 1100
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: half"


def start(tmp: Path, name: str, server: dict[str, int | float], **kw: object) -> Daemon:
    workdir = tmp / name
    workdir.mkdir()
    port = free_port()
    config = write_config(workdir / "stepd.toml", port=port, db=workdir / "stepd.db",
                          server=server)  # fmt: skip
    return Daemon(workdir, config, port, **kw).started()  # type: ignore[arg-type]


def low_fd_limit() -> None:
    """In the daemon's child process: soft and hard limit lowered, so it cannot raise them."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # Header deadline far away: only the cap's eviction can make room in this test.
    daemon = start(tmp_path_factory.mktemp("flood"), "d", {"header_timeout_s": 120},
                   preexec_fn=low_fd_limit)  # fmt: skip
    yield daemon
    daemon.kill()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    limits = {"header_timeout_s": 1, "body_timeout_s": 1, "max_connections": 3}
    daemon = start(tmp_path_factory.mktemp("strict"), "d", limits)
    yield daemon
    daemon.kill()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the daemon has closed this connection (EOF or reset), without blocking."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the daemon sends until it closes, and how long that took (or fail)."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit}s; got {data[:200]!r}") from None
    return data, time.monotonic() - started


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_half_sent_requests_cannot_lock_out_healthz(flooded: Daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:  # this test process holds the flood's sockets itself
        if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD + 200, hard))
    cap = FD_LIMIT - reserved_fds(Config().concurrency)
    assert f"leaves room for {cap} connections" in flooded.stderr()
    sockets: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = connect(flooded.port)
            sock.sendall(HALF_REQUEST)
            sockets.append(sock)
        with httpx.Client(base_url=flooded.url, timeout=10) as plain:
            assert plain.get("/healthz").status_code == 200
        with flooded.client() as client:
            create(client, echo_flow())
            assert client.get("/api/workflow").status_code == 200
        assert open_fds(flooded.pid) <= FD_LIMIT
        still_open = sum(not closed_by_server(s) for s in sockets)
        assert still_open <= cap, f"{still_open} of the flood still open, cap {cap}"
        assert still_open >= cap // 2  # the cap is a cap, not a reason to close everything
    finally:
        for sock in sockets:
            sock.close()
    assert flooded.proc is not None and flooded.proc.poll() is None
    assert "Too many open files" not in flooded.stderr()


def test_the_daemon_raises_its_soft_open_file_limit_to_the_hard_one(tmp_path: Path):
    def soft_below_hard() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, 4096))

    daemon = start(tmp_path, "d", {}, preexec_fn=soft_below_hard)
    try:
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    finally:
        daemon.kill()
    (line,) = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
    assert line.split()[3:5] == ["4096", "4096"], line
    assert "leaves room for" not in daemon.stderr()  # 1000 connections fit under 4096


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_header_timeout_s(strict: Daemon):
    with contextlib.closing(connect(strict.port)) as sock:
        started = time.monotonic()
        closed = False
        for byte in HALF_REQUEST:  # ~11 s at this pace, were it not cut off
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
            if closed_by_server(sock):
                closed = True
                break
            sock.setblocking(True)
        assert closed, "the trickler was never cut off"
        assert time.monotonic() - started < 5  # header_timeout_s = 1, generous margin


def test_a_partial_request_gets_408_when_its_headers_time_out(strict: Daemon):
    with contextlib.closing(connect(strict.port)) as sock:
        sock.sendall(HALF_REQUEST)
        answer, took = read_until_closed(sock, limit=10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert took < 5


def test_a_connection_that_never_sends_is_closed_without_an_answer(strict: Daemon):
    with contextlib.closing(connect(strict.port)) as sock:
        answer, took = read_until_closed(sock, limit=10)
    assert answer == b""  # nothing of a request came: no answer to confuse a client pool
    assert took < 5


def test_a_slow_body_is_cut_off_at_body_timeout_s(strict: Daemon):
    body = b'{"name": "slow", "flow": {}}'
    head = (
        f"POST /api/workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with contextlib.closing(connect(strict.port)) as sock:
        sock.sendall(head + body[:5])  # then nothing more
        answer, took = read_until_closed(sock, limit=10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert took < 5
    with strict.client() as client:  # and the daemon is fine
        assert client.get("/api/workflow").status_code == 200


def test_a_connection_answered_before_its_body_came_must_still_send_the_next_head(
    strict: Daemon,
):
    body = b'{"name": "x", "flow": {}}'
    head = (
        "POST /api/workflow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with contextlib.closing(connect(strict.port)) as sock:
        sock.sendall(head)  # no token: answered 401 before the body is read
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 ")
        sock.sendall(body)  # the rest of that request, then nothing
        _, took = read_until_closed(sock, limit=10)
    assert took < 5  # header_timeout_s = 1


def test_keep_alive_connections_serve_several_requests(strict: Daemon):
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with contextlib.closing(connect(strict.port)) as sock:
        for _ in range(3):
            sock.sendall(request)
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, f"closed after {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)  # idle between requests, within header_timeout_s
    with strict.client() as client:  # httpx reuses its pooled connection
        first = client.get("/healthz")
        second = client.get("/healthz")
        assert first.status_code == second.status_code == 200
        assert first.extensions["network_stream"] is second.extensions["network_stream"]


def stream(port: int) -> socket.socket:
    """An open GET /api/events: a busy connection, never idle."""
    sock = connect(port)
    sock.sendall(
        f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


def test_at_the_cap_with_every_connection_busy_a_newcomer_gets_503(strict: Daemon):
    streams = [stream(strict.port) for _ in range(3)]  # max_connections = 3
    try:
        with contextlib.closing(connect(strict.port)) as newcomer:
            answer, _ = read_until_closed(newcomer, limit=10)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
    finally:
        streams.pop().close()
    try:
        deadline = time.monotonic() + 10
        while True:  # room again once the daemon has seen the stream go
            try:
                if httpx.get(f"{strict.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no room after a stream closed"
            time.sleep(0.1)
    finally:
        for sock in streams:
            sock.close()
    assert "refused 1 connection(s) with 503" in strict.stderr()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_request_head_over_64_kb_gets_431_before_it_grows_the_daemon(strict: Daemon):
    # httptools keeps an unfinished header whole: one 200 MB header took 200 MB, unauthenticated.
    before = rss(strict.pid)
    with contextlib.closing(connect(strict.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
        sent = 0
        try:
            while sent < 32 * 2**20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # the daemon hung up, as it should
            pass
        answer, _ = read_until_closed(sock, limit=10)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert sent < 32 * 2**20
    assert rss(strict.pid) - before < 16 * 2**20
    assert httpx.get(f"{strict.url}/healthz", timeout=5).status_code == 200
    long_but_fine = {"X-B": "b" * 30_000}
    assert httpx.get(f"{strict.url}/healthz", headers=long_but_fine, timeout=5).status_code == 200


def test_a_body_sent_with_its_head_in_one_write_is_not_counted_as_head(strict: Daemon):
    body = b'{"name": "x", "flow": {"start": {"tool": "echo", "args": {"pad": "' + b"p" * 200_000
    body += b'"}, "done": true}}}'
    head = (f"POST /api/workflow/validate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    with contextlib.closing(connect(strict.port)) as sock:
        sock.sendall(head + body)  # one write: the daemon reads head and body together
        answer, _ = read_until_closed(sock, limit=10)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b'"valid":true' in answer
