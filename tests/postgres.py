"""A throwaway PostgreSQL server for one test session.

`server()` starts one the first time it is called (initdb into a temporary directory,
in /dev/shm when there is one, then pg_ctl on a free loopback port) and stops it and
removes the directory when the process exits. With STEPD_TEST_PG_URL set, the tests
use that server instead and start nothing (its user must be allowed CREATE DATABASE).

Run as a script to check that a server starts here: `python -m tests.postgres`.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

URL_ENV = "STEPD_TEST_PG_URL"
DB_NAME = "stepd_test"
# Enough for a few xdist workers' stores (a pool each) and the tests that run several
# daemons on one database.
MAX_CONNECTIONS = 300


@dataclass
class Server:
    url: str  # a database on it the tests may use for administration (CREATE DATABASE)
    started_s: float  # how long starting it took (0 for STEPD_TEST_PG_URL)
    directory: Path | None = None  # data, socket and log, when this process started it
    bin_dir: Path | None = None
    as_user: str | None = None  # the user the server runs as, when not this one

    def url_for(self, database: str) -> str:
        """This server's URL with another database name."""
        return urlsplit(self.url)._replace(path=f"/{database}").geturl()

    def stop(self) -> None:
        if self.directory is None:
            return
        directory, self.directory = self.directory, None
        assert self.bin_dir is not None
        _run(
            self.as_user,
            [self.bin_dir / "pg_ctl", "-D", directory / "data", "-m", "immediate", "-w", "stop"],
            check=False,
        )
        shutil.rmtree(directory, ignore_errors=True)


_server: Server | None = None


def server() -> Server:
    """The session's server, started on first use."""
    global _server
    if _server is None:
        url = os.environ.get(URL_ENV, "")
        _server = Server(url, 0.0) if url else start()
    return _server


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "apt-get install -y postgresql, or set STEPD_TEST_PG_URL"
        )

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.parent.name))

    return Path(max(found, key=version)).parent


def start() -> Server:
    """initdb, start and createdb; registered to stop at exit."""
    began = time.perf_counter()
    bins = bin_dir()
    as_user = "postgres" if os.geteuid() == 0 else None
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    directory = Path(tempfile.mkdtemp(prefix="stepd-test-pg-", dir=base))
    if as_user:
        shutil.chown(directory, as_user, as_user)
    srv = Server("", 0.0, directory, bins, as_user)
    atexit.register(srv.stop)
    data, log = directory / "data", directory / "server.log"
    try:
        _run(
            as_user,
            [bins / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
             "--locale=C", "--no-sync", "--no-instructions"],
        )  # fmt: skip
        for attempt in range(5):
            port = _free_port()
            options = (
                f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off "
                f"-c max_connections={MAX_CONNECTIONS} -c shared_buffers=64MB"
            )
            done = _run(
                as_user,
                [bins / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "30", "-o", options, "start"],
                check=False,
            )
            if done.returncode == 0:
                break
            if attempt == 4 or "could not bind" not in _tail(log):
                raise RuntimeError(f"PostgreSQL did not start:\n{done.stdout}\n{_tail(log)}")
        _run(as_user, [bins / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                       DB_NAME])  # fmt: skip
    except BaseException:
        srv.stop()
        raise
    srv.url = f"postgresql://postgres@127.0.0.1:{port}/{DB_NAME}"
    srv.started_s = time.perf_counter() - began
    return srv


def _run(as_user: str | None, argv: list, *, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(a) for a in argv]
    if as_user:
        command = ["runuser", "-u", as_user, "--", *command]
    done = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/", check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}")
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


if __name__ == "__main__":
    srv = server()
    print(f"{srv.url} started in {srv.started_s:.2f}s")
