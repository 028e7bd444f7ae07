"""PostgreSQL for the benchmarks: a server to use, and a fresh database per run on it.

STEPD_BENCH_PG_URL (any database on a server whose user may CREATE DATABASE) names a
server to use; without it `server()` starts a throwaway one (initdb into a temporary
directory on disk, pg_ctl on a free loopback port) and stops it and removes the directory
when the process exits. That server is durable like SQLite's synchronous=FULL (fsync and
synchronous_commit on), so the two backends pay for the same guarantee.

    python bench/pg_server.py     # start one and print its URL (stopped again on exit)
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

URL_ENV = "STEPD_BENCH_PG_URL"
_names = itertools.count(1)


def server() -> str:
    """The URL of a database on the benchmarks' server (started on first use)."""
    url = os.environ.get(URL_ENV, "")
    if not url:
        url = start()
        os.environ[URL_ENV] = url  # children use this server too
    return url


def url_for(url: str, database: str) -> str:
    return urlsplit(url)._replace(path=f"/{database}").geturl()


def create_database(admin_url: str) -> str:
    """A new empty database on the server; its URL."""
    import psycopg

    name = f"stepd_bench_{os.getpid()}_{next(_names)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url_for(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _bin_dir() -> Path:
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        raise SystemExit(
            f"PostgreSQL is not installed (apt-get install -y postgresql), and {URL_ENV} is unset"
        )

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.parent.name))

    return Path(max(found, key=version)).parent


def _run(as_user: str | None, argv: list[object], check: bool = True) -> str:
    command = [str(a) for a in argv]
    if as_user:
        command = ["runuser", "-u", as_user, "--", *command]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd="/", check=False)  # fmt: skip
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}")
    return done.stdout


def start() -> str:
    """initdb and start a durable server on a free port; stopped and removed at exit."""
    bins = _bin_dir()
    as_user = "postgres" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="stepd-bench-pg-"))
    if as_user:
        shutil.chown(directory, as_user, as_user)
    data = directory / "data"

    def stop() -> None:
        _run(as_user, [bins / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], check=False)
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    began = time.perf_counter()
    _run(as_user, [bins / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-instructions"])  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = (f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 "
               "-c max_connections=300 -c shared_buffers=128MB")  # fmt: skip
    _run(as_user, [bins / "pg_ctl", "-D", data, "-l", directory / "server.log", "-w", "-t", "30",
                   "-o", options, "start"])  # fmt: skip
    print(f"PostgreSQL started on port {port} in {time.perf_counter() - began:.1f} s "
          "(fsync on)", flush=True)  # fmt: skip
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


if __name__ == "__main__":
    print(server())
