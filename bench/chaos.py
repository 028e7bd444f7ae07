"""Chaos at scale: SIGKILL the real `stepd serve` at random moments while it works.

    python bench/chaos.py [--workflows 1000] [--kills 10] [--seed N] [--concurrency 8]
    python bench/chaos.py --database postgresql [--daemons 3] [--lease 3] ...

The scenario of tests/test_chaos.py (its workload and checks), bigger: workflows
(chains of work, sleeps, gates, retried flaky steps, non-idempotent charges, branches,
parallels, maps, timers and signal waits) are submitted over HTTP while the daemon is
killed with SIGKILL and restarted on the same database; a "person" approves every
gate, fails every interrupted non-idempotent step, sends the signals and pauses and
resumes some workflows. Then every acknowledged workflow must exist and be terminal,
every workflow's steps (and each branch's and map item's) must be a walk of its flow
with only allowed failures, a completed workflow's output must be the planned one, no
idempotent step may have run more often than its final attempt, no non-idempotent step
twice, and both SQLite files must pass `PRAGMA integrity_check`.

With `--database postgresql`, `--daemons` daemons (a, b, c, ...) share one PostgreSQL
database (a fresh one on the server of STEPD_BENCH_PG_URL, else on a throwaway durable
server, bench/pg_server.py; dropped afterwards). Each kill picks one that is up; it is
restarted under the same node_id, at once or after staying down for up to two leases
(the others then take its steps over); the clients send each request to the next daemon
in turn, passing over those that are down. The table adds kills, executions and HTTP
answers per daemon. Only the chaos tools' file is a SQLite file then.

Run it from the repository root. Exits 1 (and lists the problems) if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_chaos import ChaosRun, ClusterChaosRun, chaos_seed  # noqa: E402

NODES = "abcdefgh"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the benchmarks' PostgreSQL server, dropped afterwards."""
    import pg_server

    admin = pg_server.server()
    url = pg_server.create_database(admin)
    try:
        yield url
    finally:
        pg_server.drop_database(admin, url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs while work runs")
    parser.add_argument(
        "--seed", type=int, default=chaos_seed(), help="default $STEPD_CHAOS_SEED or 1"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="[executor] concurrency")
    parser.add_argument(
        "--min-delay", type=float, default=0.1, help="seconds before a kill, at least"
    )
    parser.add_argument(
        "--max-delay", type=float, default=1.0, help="seconds before a kill, at most"
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=180.0,
        help="seconds to wait, after the last restart, for every workflow to end",
    )
    parser.add_argument(
        "--keep", type=Path, help="work in this directory and keep it (logs, databases)"
    )
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--daemons",
        type=int,
        default=3,
        choices=range(2, len(NODES) + 1),
        help="daemons on the PostgreSQL database (default 3)",
    )
    parser.add_argument(
        "--lease", type=float, default=3.0, help="[executor] lease_s on PostgreSQL (default 3)"
    )
    args = parser.parse_args()

    common = {
        "seed": args.seed,
        "workflows": args.workflows,
        "kills": args.kills,
        "kill_delay": (args.min_delay, args.max_delay),
        "concurrency": args.concurrency,
        "settle_timeout": args.settle_timeout,
    }
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="stepd-chaos-"))
        workdir = args.keep or Path(tmp) / "chaos"
        run: ChaosRun
        if args.database == "postgresql":
            url = stack.enter_context(postgres_database())
            nodes = tuple(NODES[: args.daemons])
            run = ClusterChaosRun(workdir, url=url, nodes=nodes, lease_s=args.lease, **common)
        else:
            run = ChaosRun(workdir, **common)
        try:
            report = run.run()
        finally:
            run.close()
    print(report.table())
    failures = report.failures()
    if failures:
        print(f"\n{len(failures)} problems (seed {args.seed}):", file=sys.stderr)
        for line in failures[:100]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
