"""Helpers shared by the benchmarks: a real `stepd serve` in a temp dir, child-process hygiene,
completion watching over the SQLite file, and summary statistics.

Every benchmark starts its own daemon on a free loopback port with a config written here, so
that all of them measure the same thing (same token, tools module, executor settings).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"
# The stepd settings of the throughput runs: [executor] concurrency and claim_batch, and the
# HTTP client's keep-alive connections (as many as steps may run at once).
CONCURRENCY = 64
CLAIM_BATCH = 128
CONNECTIONS = 64

# The two-step workload of the throughput runs: step 2 consumes step 1's result.
TWO_STEP_FLOW: dict[str, Any] = {
    "start": {"tool": "echo", "args": {"n": "<<input.n>>"}, "next": "second"},
    "second": {"tool": "echo", "args": {"prev": "<<result.n>>"}, "done": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    tmp: Path,
    port: int,
    *,
    poll_interval: float = 1.0,
    synchronous: str = "FULL",
    concurrency: int = CONCURRENCY,
    claim_batch: int = CLAIM_BATCH,
    db: Path | None = None,
    database_url: str = "",
    node_id: str = "",
) -> Path:
    """The daemon config of every benchmark: loopback, one `workflow` token, `bench_tools`.
    Written to `tmp/stepd-<port>.toml`; the database is the PostgreSQL `database_url` (this
    daemon then named `node_id`), else the SQLite file `db` or `tmp/stepd.db`. The one
    token may use every run slot (max_running_per_token = concurrency), as before there
    were shares: the workloads measure throughput, not fairness between tokens."""
    config = tmp / f"stepd-{port}.toml"
    if database_url:
        database = f'url = "{database_url}"'
    else:
        database = f'path = "{db or tmp / "stepd.db"}"\nsynchronous = "{synchronous}"'
    node = f'node_id = "{node_id}"' if node_id else ""
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
{node}
[database]
{database}
[executor]
poll_interval = {poll_interval}
concurrency = {concurrency}
max_running_per_token = {concurrency}
claim_batch = {claim_batch}
[[auth.tokens]]
name = "bench"
sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
permissions = ["workflow"]
[tools]
modules = ["bench_tools"]
"""
    )
    return config


def bench_env() -> dict[str, str]:
    """The environment for a daemon or tool process: `bench_tools` importable."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{path}" if path else str(HERE)}


def start_daemon(
    tmp: Path,
    port: int,
    poll_interval: float = 1.0,
    *,
    synchronous: str = "FULL",
    concurrency: int = CONCURRENCY,
    claim_batch: int = CLAIM_BATCH,
    log: IO[bytes] | None = None,
    timeout: float = 30.0,
    database_url: str = "",
    node_id: str = "",
) -> subprocess.Popen[bytes]:
    """Start `python -m daemon serve` in `tmp` and wait until /healthz answers.

    `log` receives the daemon's stdout and stderr (default: inherited). Raises SystemExit
    with the daemon's exit status if it dies or does not answer within `timeout`.
    """
    config = write_config(
        tmp, port, poll_interval=poll_interval, synchronous=synchronous,
        concurrency=concurrency, claim_batch=claim_batch, database_url=database_url,
        node_id=node_id,
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
        env=bench_env(), cwd=tmp, stdout=log, stderr=log,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"stepd serve exited with status {proc.returncode} at start-up{_tail(log)}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_process(proc)
    raise SystemExit(f"stepd did not answer /healthz within {timeout:.0f} s{_tail(log)}")


def _tail(log: IO[bytes] | None, chars: int = 3000) -> str:
    """The end of a daemon's log file, to say why it did not start."""
    name = getattr(log, "name", None)
    if not isinstance(name, str):
        return ""
    log.flush()  # type: ignore[union-attr]
    text = Path(name).read_text(errors="replace")[-chars:].strip()
    return f"; its log ends:\n{text}" if text else ""


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: a child never outlives its benchmark."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


@contextlib.contextmanager
def running(proc: subprocess.Popen[Any], timeout: float = 30.0) -> Iterator[subprocess.Popen[Any]]:
    """Stop `proc` however the block ends."""
    try:
        yield proc
    finally:
        stop_process(proc, timeout)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `finally` blocks stop this process's children."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def read_only(db_path: Path) -> sqlite3.Connection:
    """A read-only connection to a live WAL database (readers never block its writer)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    conn.execute("PRAGMA query_only = 1")
    return conn


def count_status(conn: sqlite3.Connection) -> dict[str, int]:
    """Workflows by status (the `workflows_status` index makes this cheap)."""
    rows = conn.execute("SELECT status, count(*) FROM workflows GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def stats(values_ms: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, max and mean of a sample (nearest-rank p95)."""
    if not values_ms:
        return {"n": 0}
    values = sorted(values_ms)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": p95,
        "max": values[-1],
        "mean": statistics.fmean(values),
    }


def summary(name: str, values_ms: list[float]) -> str:
    s = stats(values_ms)
    return (
        f"{name:<44} n={s['n']:<5} median={s['p50']:8.2f} ms  "
        f"p95={s['p95']:8.2f} ms  max={s['max']:8.2f} ms"
    )
