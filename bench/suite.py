"""The benchmark suite: stepd against DBOS and Huey, same run, same machine, same workload.

    python bench/suite.py [--quick] [--runs N] [--out bench/results] [--skip dbos,huey,scale]

Runs, each in a subprocess of its own with a fresh temp dir, on loopback, under a timeout:

  throughput  W two-step workflows (step 2 consumes step 1's result), `--runs` times each,
              interleaved so that machine noise hits every system alike: stepd over HTTP
              (synchronous FULL and NORMAL), stepd in-process (FULL), stepd from a plain
              client (16 http.client threads, FULL), DBOS, Huey at its default polling and
              tuned (bench/stepd_bench.py, bench/plain_client.py, bench/peers/*.py)
  latency     idle, one workflow at a time: stepd's create / step-done / ready / poll
              paths, and the peers' submit -> first step and step 1 -> step 2
  postgresql  stepd on PostgreSQL (bench/multi_daemon.py): the same throughput workload with
              1, 2 and 3 daemons on one database, and create -> first step, step -> next
              and a step written by one daemon -> started on another; on the server of
              STEPD_BENCH_PG_URL, else a durable throwaway one (bench/pg_server.py)
  huey kill   Huey's consumer SIGKILLed mid-run: how many tasks it loses (not a timing)
  scale       bench/scale.py (claim cost, API latency and RSS as the database grows)

then prints one table (medians over runs, p50/p95/max of latency samples, stepd/peer
ratios) and writes `results.json` (every run's raw numbers and every latency sample,
machine and package versions) and `peers.png` / `latency.png` to `--out`.

`--quick` (W=200, 1 run, 20 latency samples, 5 poll samples, scale --quick) is a smoke
test of the whole pipeline in about a minute plus scale.py's quick run; its figures are
not the ones to quote. A peer that is not installed or fails is reported as n/a and the
rest carries on. Every child process is stopped when the suite ends, however it ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson
import pg_server
import report
from common import CLAIM_BATCH, CONCURRENCY, CONNECTIONS, stats

HERE = Path(__file__).resolve().parent
PY = sys.executable
PACKAGES = ("stepd", "dbos", "huey", "sqlalchemy", "starlette", "uvicorn", "aiosqlite",
            "orjson", "httpx", "matplotlib")  # fmt: skip
GROUPS = ("stepd", "postgresql", "dbos", "huey", "latency", "scale")

_children: set[subprocess.Popen[str]] = set()


# -- child processes ------------------------------------------------------------------------


def _signal_group(proc: subprocess.Popen[str], sig: int) -> bool:
    """Signal the child's process group (the child and what it started); False if gone."""
    try:
        os.killpg(proc.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the group (children stop their daemons in `finally`), SIGKILL what is left."""
    if _signal_group(proc, signal.SIGTERM):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _signal_group(proc, 0):
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        _signal_group(proc, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def run_child(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, str, str | None]:
    """Run a benchmark script with `--json`; (its result or None, its output, error or None)."""
    with tempfile.TemporaryDirectory(prefix="stepd-suite-") as d:
        path = Path(d) / "result.json"
        proc = subprocess.Popen(
            [*cmd, "--json", str(path)], cwd=HERE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        _children.add(proc)
        error = None
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            output, _ = proc.communicate()
            error = f"timed out after {timeout:.0f} s"
        finally:
            if _signal_group(proc, 0):  # a grandchild left behind
                _stop_group(proc)
            _children.discard(proc)
        if error is None and proc.returncode != 0:
            last = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            error = f"exit status {proc.returncode}: {last[0][:300]}"
        if error is not None:
            return None, output, error
        return orjson.loads(path.read_bytes()), output, None


def _stop_all_children(signum: int | None = None, frame: object = None) -> None:
    for proc in list(_children):
        _stop_group(proc)
    if signum is not None:
        raise SystemExit(128 + signum)


# -- what ran where -------------------------------------------------------------------------


def _first_line(path: str, prefix: str) -> str | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    spec = importlib.util.find_spec("daemon")
    source = Path(spec.origin).parent if spec and spec.origin else None
    git: dict[str, Any] = {}
    if source is not None:
        try:
            head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, timeout=10)  # fmt: skip
            dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "."],
                                   capture_output=True, text=True, timeout=10)  # fmt: skip
            git = {"commit": head.stdout.strip() or None, "daemon_dirty": bool(dirty.stdout)}
        except (OSError, subprocess.SubprocessError):
            pass
    mem = _first_line("/proc/meminfo", "MemTotal")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _first_line("/proc/cpuinfo", "model name"),
        "mem_total": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "packages": packages,
        "stepd_source": str(source) if source else None,
        "stepd_git": git,
        "loadavg_start": os.getloadavg(),
    }


# -- the scenarios --------------------------------------------------------------------------


def throughput_scenarios(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(key, group, command) of every throughput scenario, in the order of one round."""
    w, timeout = str(args.workflows), str(int(args.child_timeout))
    stepd = [PY, "stepd_bench.py"]
    common = ["--workflows", w, "--timeout", timeout]
    return [
        ("stepd_http_full", "stepd", [*stepd, "http", "--synchronous", "FULL", *common]),
        ("stepd_inproc_full", "stepd", [*stepd, "inproc", "--synchronous", "FULL", *common]),
        ("stepd_http_normal", "stepd", [*stepd, "http", "--synchronous", "NORMAL", *common]),
        *((f"stepd_pg_{n}", "postgresql",
           [PY, "multi_daemon.py", "throughput", "--daemons", str(n), *common])
          for n in (1, 2, 3)),
        ("stepd_plain_full", "stepd", [PY, "plain_client.py", "--synchronous", "FULL", *common]),
        ("dbos", "dbos", [PY, "peers/dbos_bench.py", "throughput", *common]),
        ("huey_default", "huey",
         [PY, "peers/huey_bench.py", "throughput", "--polling", "default", *common]),
        ("huey_tuned", "huey",
         [PY, "peers/huey_bench.py", "throughput", "--polling", "tuned", *common]),
    ]  # fmt: skip


def latency_scenarios(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    n = ["--samples", str(args.samples)]
    return [
        ("stepd", "stepd",
         [PY, "stepd_bench.py", "latency", *n, "--poll-samples", str(args.poll_samples)]),
        ("stepd_pg", "postgresql", [PY, "multi_daemon.py", "latency", *n]),
        ("dbos", "dbos", [PY, "peers/dbos_bench.py", "latency", *n]),
        ("huey_default", "huey",
         [PY, "peers/huey_bench.py", "latency", "--polling", "default", *n]),
        ("huey_tuned", "huey", [PY, "peers/huey_bench.py", "latency", "--polling", "tuned", *n]),
    ]  # fmt: skip


def progress(step: list[int], total: int, text: str) -> None:
    step[0] += 1
    print(f"[{step[0]:>2}/{total}] {text}", flush=True)


def postgres_server(results: dict[str, Any]) -> str | None:
    """Why the PostgreSQL rows cannot run, or None once a server is up for them (its URL
    in STEPD_BENCH_PG_URL, which the children inherit)."""
    try:
        url = pg_server.server()
    except (SystemExit, RuntimeError, OSError) as exc:
        return f"no PostgreSQL server: {exc}"
    results["machine"]["postgresql"] = _server_version(url)
    return None


def _server_version(url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            fsync = conn.execute("SHOW fsync").fetchone()
            sync = conn.execute("SHOW synchronous_commit").fetchone()
        return f"{row[0]} (fsync {fsync[0]}, synchronous_commit {sync[0]})"
    except Exception as exc:  # noqa: BLE001 - a note in the results, not a failure
        return f"? ({exc})"


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    skip = set(args.skip)
    results: dict[str, Any] = {
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine_info(),
        "params": {"workflows": args.workflows, "runs": args.runs, "samples": args.samples,
                   "poll_samples": args.poll_samples, "quick": args.quick,
                   "stepd_config": {"concurrency": CONCURRENCY, "claim_batch": CLAIM_BATCH,
                                    "poll_interval": 1.0, "http_client_connections": CONNECTIONS}},
        "throughput": {},
        "latency": {},
    }  # fmt: skip
    if "postgresql" not in skip and (why := postgres_server(results)):
        print(f"PostgreSQL rows skipped: {why}", flush=True)
        skip.add("postgresql")
        results["postgresql_error"] = why
    tput = [s for s in throughput_scenarios(args) if s[1] not in skip]
    lat = [] if "latency" in skip else [s for s in latency_scenarios(args) if s[1] not in skip]
    scale = "scale" not in skip
    total = len(tput) * args.runs + len(lat) + int("huey" not in skip) + int(scale)
    step = [0]
    raw: dict[str, dict[str, list[Any]]] = {k: {"runs": [], "errors": []} for k, _, _ in tput}
    for run in range(1, args.runs + 1):
        for key, _, cmd in tput:
            t0 = time.monotonic()
            data, output, error = run_child(cmd, args.child_timeout + 60)
            took = time.monotonic() - t0
            if data is None:
                raw[key]["errors"].append(error)
                progress(step, total, f"{key} run {run}/{args.runs}: FAILED ({error})")
                if args.verbose:
                    print(output[-3000:])
                continue
            raw[key]["runs"].append(data)
            progress(step, total, f"{key} run {run}/{args.runs}: {data['wf_per_s']:.1f} wf/s "
                     f"({data['elapsed_s']:.2f} s; {took:.0f} s with start/stop)")  # fmt: skip
    for key, entry in raw.items():
        per_run = [r["wf_per_s"] for r in entry["runs"]]
        if per_run:
            entry["median_wf_per_s"] = statistics.median(per_run)
            entry["median_steps_per_s"] = statistics.median(r["steps_per_s"] for r in entry["runs"])
            entry["median_elapsed_s"] = statistics.median(r["elapsed_s"] for r in entry["runs"])
        else:
            entry["median_wf_per_s"] = None
            entry["error"] = entry["errors"][0] if entry["errors"] else "not run"
        results["throughput"][key] = entry

    for key, _, cmd in lat:
        timeout = 180 + 3 * args.samples + 4 * args.poll_samples
        data, output, error = run_child(cmd, timeout)
        if data is None:
            results["latency"][key] = {"error": error}
            progress(step, total, f"{key} latency: FAILED ({error})")
            if args.verbose:
                print(output[-3000:])
            continue
        if "stats" not in data:
            data["stats"] = {m: stats(v) for m, v in data["samples_ms"].items()}
        results["latency"][key] = data
        first = data["stats"]["create_to_start"]
        progress(step, total, f"{key} latency: first step p50 {first['p50']:.2f} ms, "
                 f"p95 {first['p95']:.2f} ms")  # fmt: skip

    if "huey" not in skip:
        data, output, error = run_child([PY, "peers/huey_bench.py", "kill", "--tasks", "200"], 180)
        results["huey_kill"] = data if data is not None else {"error": error}
        progress(step, total, "huey kill test: " + (
            f"{data['lost']} of {data['tasks']} tasks lost" if data else f"FAILED ({error})"
        ))  # fmt: skip
    if scale:
        results["scale"], results["scale_table"] = run_scale(args)
        status = results["scale"].get("error", "done")
        progress(step, total, f"scale (bench/scale.py{' --quick' if args.quick else ''}): {status}")
    results["ratios"] = report.ratios(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    return results


def run_scale(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """bench/scale.py (another module's figures) as a subprocess; its JSON and its table."""
    script = HERE / "scale.py"
    if not script.exists():
        return {"error": "bench/scale.py not found"}, ""
    cmd = [PY, str(script), *(["--quick"] if args.quick else [])]
    data, output, error = run_child(cmd, 900 if args.quick else 3600)
    if data is None:
        return {"error": error}, output[-3000:]
    return data, output


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Default output: bench/results/ (results.json, peers.png, latency.png).",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: W=200, 1 run, 20 latency samples, scale --quick",
    )
    ap.add_argument("--runs", type=int, help="throughput runs per scenario (default 3; quick 1)")
    ap.add_argument("--workflows", type=int, help="W (default 2000; quick 200)")
    ap.add_argument("--samples", type=int, help="latency samples (default 100; quick 20)")
    ap.add_argument("--poll-samples", type=int, help="poll-path samples (default 20; quick 5)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    ap.add_argument("--skip", default="", help=f"comma-separated, of: {', '.join(GROUPS)}")
    ap.add_argument("--verbose", action="store_true", help="print a failed child's output")
    args = ap.parse_args()
    args.skip = [s for s in args.skip.split(",") if s]
    if unknown := set(args.skip) - set(GROUPS):
        ap.error(f"--skip: unknown {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.workflows = args.workflows or (200 if quick else 2000)
    args.samples = args.samples or (20 if quick else 100)
    args.poll_samples = args.poll_samples or (5 if quick else 20)
    # One throughput run may take this long (DBOS runs ~70 wf/s here; a loaded box, less).
    args.child_timeout = 120 + 0.5 * args.workflows
    args.out.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, _stop_all_children)
    try:
        results = run_suite(args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping child processes", file=sys.stderr)
        return 130
    finally:
        _stop_all_children()
    path = args.out / "results.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print()
    print(report.table(results))
    print()
    for written in [path, *report.charts(results, args.out)]:
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
