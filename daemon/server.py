"""HTTP connections: deadlines for a request's headers and body, and a cap on open ones.

uvicorn's only idle timer (keep-alive) is cancelled by any byte received, so a client that
sends half a request, or trickles one a byte at a time, holds its connection and a file
descriptor forever; enough of them and the daemon can accept nothing, not even /healthz.
Here every connection waiting for a request's headers has a total deadline, a body must
arrive within its own deadline once its headers have, and at the cap a newcomer takes the
place of the connection that has been idle longest (busy and streaming ones are kept).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("stepd.server")

# asyncio accepts up to `backlog` connections in one pass of the loop before any of them
# reaches connection_made (and the cap): a small batch bounds the descriptors one pass
# takes beyond the cap. The kernel's queue of connections waiting for accept() is set
# apart, to LISTEN_BACKLOG, so that a burst still queues rather than being dropped.
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 2048
# Descriptors kept for all but client connections: the database (a writer and readers,
# each with its WAL and shared-memory files), the lock file, the listener, logs; plus one
# per step that may run at once (outbound HTTP, tool subprocesses), and three accept
# batches (accepted, admitted, and the idle ones they displaced, closed a pass later).
BASE_FDS = 64

REFUSAL_LOG_S = 10.0  # a flood of refused connections logs one line this often

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nrequest too slow"
)
_TOO_LARGE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
    b"charset=utf-8\r\ncontent-length: 25\r\nconnection: close\r\n\r\nrequest head is too large"
)
MAX_HEAD = 65_536  # bytes of a request line and headers
_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 27\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    b"too many connections, retry"
)


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            # A syscall filter (the shipped unit's ~@resources) refuses it: LimitNOFILE=
            # has set the limit already, and what we have is what we get.
            pass
    return soft


def reserved_fds(concurrency: int) -> int:
    """Descriptors the daemon keeps for everything but client connections."""
    return BASE_FDS + concurrency + 3 * ACCEPT_BATCH


def connection_cap(max_connections: int, soft_limit: int, reserved: int) -> int:
    """max_connections, lowered (with one log line) to what the open-file limit leaves."""
    room = max(1, soft_limit - reserved)
    if max_connections <= room:
        return max_connections
    log.warning(
        "the open-file limit (%d) leaves room for %d connections, not [server] "
        "max_connections = %d; serving at most %d (raise LimitNOFILE= or ulimit -n)",
        soft_limit, room, max_connections, room,
    )  # fmt: skip
    return room


class _Table:
    """The connections of one server: how many are open, and which wait for a request."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: set[LimitedProtocol] = set()
        # Insertion order is the order they became idle: the first is idle the longest.
        self.idle: dict[LimitedProtocol, None] = {}
        self.refusals = 0  # since the last log line about them
        self.refusal_logged = float("-inf")

    def admit(self, conn: LimitedProtocol) -> bool:
        """Make room for `conn` (closing the longest-idle connection at the cap) or refuse."""
        if len(self.open) >= self.limits.max_connections:
            if not self.idle:
                return False
            oldest = next(iter(self.idle))
            oldest.drop(reason="to make room for a new connection")
        self.open.add(conn)
        return True

    def refused(self) -> None:
        """Count a refused connection; say so at most every REFUSAL_LOG_S seconds."""
        self.refusals += 1
        now = time.monotonic()
        if now - self.refusal_logged >= REFUSAL_LOG_S:
            log.warning(
                "refused %d connection(s) with 503: %d open, all busy ([server] max_connections)",
                self.refusals, len(self.open),
            )  # fmt: skip
            self.refusals, self.refusal_logged = 0, now


def protocol_class(limits: Limits) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol for uvicorn.Config(http=...) enforcing `limits` on one server."""
    table = _Table(limits)
    return type("StepdHttpProtocol", (LimitedProtocol,), {"table": table})


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines and a connection cap."""

    table: _Table  # set per server by protocol_class()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._partial = False  # part of a request's head has arrived
        self._head: int | None = None  # bytes of the head received, while one is awaited

    # -- life cycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.table.admit(self):
            self.table.refused()
            transport.write(_BUSY_503)
            transport.close()
            return
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def drop(self, *, reason: str) -> None:
        """Close now (the app, if any, sees a client disconnect)."""
        log.debug("closing connection from %s: %s", self.client, reason)
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def _forget(self) -> None:
        self._cancel_deadline()
        self.table.open.discard(self)
        self.table.idle.pop(self, None)

    # -- deadlines -----------------------------------------------------------------

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _wait_for_head(self) -> None:
        """Now idle: the next request's head is due within header_timeout_s."""
        self._cancel_deadline()
        self._partial = False
        self._head = 0
        self.table.idle[self] = None
        self._deadline = self.loop.call_later(
            self.table.limits.header_timeout_s, self._head_too_slow
        )

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self._partial and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_408)
        self.drop(reason="request headers did not arrive in time")

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_408)
        self.drop(reason="request body did not arrive in time")

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._partial = True

    def data_received(self, data: bytes) -> None:
        # httptools keeps a header until it is complete: without a bound, one unfinished
        # 200 MB header is 200 MB of memory before anyone is authenticated. A read that
        # takes the count past MAX_HEAD may hold the head's end and then a body (a client
        # sends both at once): it goes to the parser, and only a head still unfinished after
        # it is too large. One read is at most what the transport reads at a time.
        if self._head is not None:
            self._head += len(data)
        super().data_received(data)
        if self._head is not None and self._head > MAX_HEAD:
            self._head = None
            if not self.transport.is_closing():
                self.transport.write(_TOO_LARGE_431)
            self.drop(reason="request head too large")

    def on_headers_complete(self) -> None:
        self._head = None
        self._cancel_deadline()
        self._partial = False
        self.table.idle.pop(self, None)
        # Until on_message_complete, which for a request without a body comes at once.
        self._deadline = self.loop.call_later(self.table.limits.body_timeout_s, self._body_too_slow)
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = OneSend(self.transport, self.loop)

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        super().on_message_complete()
        # The answer went out before the body was all in (a 401, a 413). uvicorn's
        # keep-alive timer, armed then, was cancelled by the body's bytes: now idle.
        cycle = self.cycle
        if (cycle is not None and cycle.response_complete and not self.pipeline
                and not self.transport.is_closing()):  # fmt: skip
            self._wait_for_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn arms its keep-alive timer exactly when it waits for another request.
        if self.timeout_keep_alive_task is not None and self._deadline is None:
            self._wait_for_head()


class OneSend:
    """A response's transport that sends its head together with the first part of its
    body: uvicorn writes the head at `http.response.start` and the body at the next
    message, two send() calls (and two wake-ups of the client) for one small answer.
    The head is held until the body's first write, or the loop's next pass if that
    does not come at once (a stream whose first event is still to come)."""

    __slots__ = ("transport", "loop", "head", "passing")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.head: bytes | None = None
        self.passing = False  # the head went out: writes go straight through

    def write(self, data: bytes) -> None:
        if self.passing:
            self.transport.write(data)
        elif self.head is None:
            self.head = bytes(data)
            self.loop.call_soon(self.flush)
        else:
            head, self.head, self.passing = self.head, None, True
            self.transport.write(head + data)

    def flush(self) -> None:
        if self.head is not None:
            head, self.head, self.passing = self.head, None, True
            if not self.transport.is_closing():
                self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
