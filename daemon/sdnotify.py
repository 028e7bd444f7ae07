"""Dependency-free systemd notify protocol: sd_notify(3) and sd_watchdog_enabled(3)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("stepd")

_SEND_TIMEOUT = 1.0  # bounded, so a stuck receiver cannot wedge the event loop for long


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send a state string ("READY=1", "STOPPING=1", "STATUS=...", "WATCHDOG=1",
    newline-separated for several) to $NOTIFY_SOCKET.

    Returns False when not supervised (NOTIFY_SOCKET unset) or on failure (logged, never raised).
    """
    env = os.environ if env is None else env
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path[0] == "@":  # Linux abstract namespace: the leading '@' stands for a NUL byte.
        addr = "\0" + path[1:]
    elif path[0] == "/":
        addr = path
    else:
        log.warning("sd_notify: unsupported NOTIFY_SOCKET %r", path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(message.encode(), addr)
    except (OSError, ValueError) as exc:
        log.warning("sd_notify: sending %r to %s failed: %s", message, path, exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when the
    watchdog is off or meant for another process ($WATCHDOG_PID != our pid)."""
    env = os.environ if env is None else env
    raw_usec, raw_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
        if raw_pid is not None and int(raw_pid) != os.getpid():
            return None
    except ValueError:
        log.warning("sd_notify: ignoring bad WATCHDOG_USEC=%r WATCHDOG_PID=%r", raw_usec, raw_pid)
        return None
    return usec / 2_000_000 if usec > 0 else None


async def watchdog_loop(
    interval: float,
    healthy: Callable[[], bool] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> None:
    """Send WATCHDOG=1 every `interval` seconds until cancelled, skipping pings while
    `healthy()` is false (or raises) so systemd restarts a wedged daemon."""
    was_ok = True
    while True:
        try:
            ok = healthy is None or bool(healthy())
        except Exception:
            log.exception("watchdog: health check raised")
            ok = False
        if ok:
            notify("WATCHDOG=1", env)
        elif was_ok:
            log.warning("watchdog: unhealthy, withholding WATCHDOG=1 pings")
        was_ok = ok
        await asyncio.sleep(interval)
