"""`stepd serve`: wiring, signals, systemd notify, first-start token."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette

from daemon import sdnotify
from daemon import server as connections
from daemon.api import create_app
from daemon.auth import active_tokens, generated_token_path, tighten_generated
from daemon.config import Config
from daemon.errors import ConfigError
from daemon.storage import DatabaseLocked

log = logging.getLogger("stepd")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop_now(self) -> None:
        """Stop waiting for open connections, and hang up on them: a live event stream then
        ends as if its client had left, rather than being cancelled with a traceback."""
        self.force_exit = True
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # On a forced exit uvicorn skips the app's shutdown; ours puts running steps back in
        # the queue and closes the database, so it runs anyway (at once: the executor hurries).
        if self.force_exit and not self.lifespan.shutdown_event.is_set():
            await self.lifespan.shutdown()


def with_tokens(config: Config, out: object = sys.stdout) -> Config:
    """The config with the active tokens: the configured ones and the generated admin token
    (made, and printed once, on a first start with none configured). Logs which are active."""
    active = active_tokens(config.tokens, config.state_dir)
    if active.new_token is not None:
        print(
            "stepd: no [[auth.tokens]] configured; generated a token for 'admin' "
            f"(shown once, its hash is in {generated_token_path(config.state_dir)}):\n\n"
            f"    export TOKEN={active.new_token}\n",
            file=out,  # type: ignore[arg-type]
            flush=True,
        )
    log.info("active tokens: %s", active.describe())
    return replace(config, tokens=active.tokens)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before start-up so a clash fails fast and cleanly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose protocol
    # says TCP; without it every answer on a kept-alive connection waits ~40 ms for the
    # client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


# Allocations (less deallocations) between two young-generation collections; Python's
# default, 700, runs several per request, each walking every young object.
GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once start-up is done: move what it allocated (modules, the app, parsed config,
    cached statements) out of the collector's sight, for good, since it lives as long as
    the process; and collect the young generation less often. Requests allocate objects
    that die young, mostly freed by reference counting."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(config: Config) -> int:
    """Run API and executor until SIGTERM/SIGINT; then drain and exit 0."""
    tighten_generated(config.state_dir)
    try:
        config = with_tokens(config)
        app = create_app(config)
    except ConfigError as exc:  # a broken token file, a tool module that does not load
        print(f"stepd: {exc}", file=sys.stderr)
        return 1
    # Before the database and the listener take theirs: file descriptors bound connections.
    cap = connections.connection_cap(
        config.max_connections,
        connections.raise_fd_limit(),
        connections.reserved_fds(config.concurrency),
    )
    # Own the database before anything else: a second daemon must not touch its steps.
    try:
        await app.state.store.open()
    except DatabaseLocked as exc:
        print(f"stepd: {exc}", file=sys.stderr)
        return 1
    try:
        return await _serve_open(app, config, cap)
    finally:
        # Whatever happened (a failed start-up included): the store's reader threads must
        # not keep the process from exiting.
        await app.state.store.close()


async def _serve_open(app: Starlette, config: Config, max_connections: int) -> int:
    try:
        sock = bind(config.host, config.port)
    except OSError as exc:
        print(
            f"stepd: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr
        )
        return 1
    limits = connections.Limits(max_connections, config.header_timeout_s, config.body_timeout_s)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, lifespan="on", access_log=False,
        log_level=config.log_level.lower(), log_config=None, server_header=False,
        timeout_graceful_shutdown=5, http=connections.protocol_class(limits),
        backlog=connections.ACCEPT_BATCH,
    ))  # fmt: skip
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if server.should_exit:  # the second one: no more grace
            log.warning("received %s again: stopping at once; running steps go back to the "
                        "queue without using an attempt", sig.name)  # fmt: skip
            app.state.executor.hurry()
            server.stop_now()
            return
        log.info("received %s: stopping (grace %gs; send it again to stop at once)", sig.name,
                 config.shutdown_grace)  # fmt: skip
        sdnotify.notify("STOPPING=1")
        app.state.events.close()  # open event streams end now instead of holding up the stop
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    serving = asyncio.create_task(server.serve(sockets=[sock]))
    watchdog: asyncio.Task[None] | None = None
    # uvicorn exposes start-up only as a flag.
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        # asyncio listen()ed with the accept batch; the kernel's queue may be longer.
        sock.listen(connections.LISTEN_BACKLOG)
        settle_gc()
        log.info(
            "stepd listening on http://%s:%d (database %s)",
            config.host,
            config.port,
            database_name(config),
        )
        sdnotify.notify(f"READY=1\nSTATUS=listening on {config.host}:{config.port}")
        interval = sdnotify.watchdog_interval()
        if interval:
            executor = app.state.executor
            pings = sdnotify.watchdog_loop(interval, lambda: executor.healthy)
            watchdog = asyncio.create_task(pings)
    try:
        await serving
    finally:
        if watchdog is not None:
            watchdog.cancel()
    # uvicorn reports start-up failures (port in use, lifespan error) by not starting.
    return 0 if server.started else 1


def database_name(config: Config) -> str:
    """The database as the start-up line names it: the SQLite file, or the PostgreSQL URL
    without its password and this daemon's node id."""
    if not config.database_url:
        return str(config.db_path)
    url = urlsplit(config.database_url)
    if url.password is not None:
        host = url.netloc.rpartition("@")[2]
        url = url._replace(netloc=f"{url.username}:***@{host}")
    return f"{url.geturl()}, node {config.node}"
