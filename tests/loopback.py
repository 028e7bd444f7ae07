"""Loopback HTTP servers for egress tests: they count connections and can misbehave."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

CHUNK = b"x" * 65536
ENDLESS_MAX_BYTES = 400 * 1024 * 1024  # an "endless" body still ends somewhere
ENDLESS_MAX_S = 60.0


def gzip_bomb(decoded_mb: int) -> bytes:
    """A gzip body of `decoded_mb` MiB of zeros, built without holding them in memory."""
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1024 * 1024)
    return b"".join([*(z.compress(zeros) for _ in range(decoded_mb)), z.flush()])


class Server(ThreadingHTTPServer):
    """An HTTP server on one loopback address, in a thread."""

    daemon_threads = True
    bomb = b""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.sent = 0  # body bytes of endless answers written
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1  # every accepted connection, before anything is read
        return True

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        self.server.requests.append({"path": url.path, "headers": dict(self.headers)})
        if url.path == "/json":
            self._answer(200, orjson.dumps({"ok": True, "host": self.server.server_address[0]}))
        elif url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(url.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/endless":
            self._endless()
        elif url.path == "/large":  # says how large it is up front
            self.send_response(200)
            self.send_header("Content-Length", str(ENDLESS_MAX_BYTES))
            self.end_headers()
            self._endless()
        elif url.path == "/bomb":
            self._answer(200, self.server.bomb, gzip=True)
        elif url.path == "/headers":  # many short headers, cookies among them
            self.send_response(200)
            count = int(parse_qs(url.query)["n"][0])
            for i in range(count):  # ~9 bytes each: within httpcore's 100 kB of headers
                if i % 3:
                    self.send_header(f"x{i:x}", "1")
                else:
                    self.send_header("Set-Cookie", f"c{i:x}=1")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        elif url.path == "/gzip":
            self._answer(200, gzip.compress(orjson.dumps({"zipped": True})), gzip=True)
        else:
            self._answer(404, b"not found")

    def _answer(self, status: int, body: bytes, *, gzip: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self) -> None:
        """A body that goes on until the client hangs up (or the bounds)."""
        if self.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
        started = time.monotonic()
        try:
            while (
                self.server.sent < ENDLESS_MAX_BYTES and time.monotonic() - started < ENDLESS_MAX_S
            ):
                self.wfile.write(CHUNK)
                self.server.sent += len(CHUNK)
        except OSError:
            pass  # the client stopped reading and closed the connection

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serving(host: str = "127.0.0.1") -> Iterator[Server]:
    server = Server(host)
    server.thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.thread.join(5)
