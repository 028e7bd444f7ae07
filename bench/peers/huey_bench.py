"""Huey (3.x, SqliteHuey) on stepd's benchmark workload: a producer and a consumer process.

    python bench/peers/huey_bench.py throughput --workflows 2000 [--polling default|tuned]
    python bench/peers/huey_bench.py latency --samples 100 [--polling default|tuned]
    python bench/peers/huey_bench.py kill [--tasks 200]      # not part of the suite

This process is the producer; it starts the consumer in a subprocess (Huey's own
`huey_consumer`, 2 thread workers, log level WARNING via -q like stepd's daemon) on a
SqliteHuey file in a fresh temp dir, and stops it at the end. The workload is stepd's: task
1 computes a result and enqueues task 2 with it; both results are stored (Huey's default).

Polling: Huey workers poll the queue; `default` is the consumer's defaults (-d 0.1 -b 1.15
-m 10: 100 ms after work, backing off to 10 s when idle), `tuned` is -d 0.01 -m 0.01.

throughput: enqueue W task-1s back to back, wait until all 2W results are stored.
latency: one at a time; enqueue -> task 1 body runs, task 1 done -> task 2 body runs.
kill: SIGKILL the consumer while it runs 50 ms tasks, restart it, count tasks that never
  finished (Huey deletes a task from the queue when a worker takes it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POLLING = {"default": [], "tuned": ["-d", "0.01", "-m", "0.01"]}

try:
    import huey as _huey_pkg  # noqa: F401  (checked here so the message is clear)
except ImportError as exc:
    sys.exit(f"huey is not installed ({exc}); install the bench extra: pip install -e '.[bench]'")


def start_consumer(tmp: Path, polling: str) -> subprocess.Popen[bytes]:
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HUEY_BENCH_DB": str(tmp / "huey.db"), "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "huey.bin.huey_consumer", "huey_app.huey",
           "-w", "2", "-k", "thread", "-q", *POLLING[polling]]  # fmt: skip
    log = (tmp / "consumer.log").open("ab")
    return subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=log)


def stop_consumer(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    """SIGINT is Huey's graceful stop (running tasks finish); SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_results(app: Any, target: int, timeout: float, poll: float = 0.01) -> float:
    """perf_counter() when the result store holds `target` results."""
    deadline = time.perf_counter() + timeout
    while app.huey.result_count() < target:
        if time.perf_counter() > deadline:
            n = app.huey.result_count()
            raise TimeoutError(f"{n} of {target} results after {timeout:.0f} s")
        time.sleep(poll)
    return time.perf_counter()


def throughput(app: Any, n: int, timeout: float) -> dict[str, Any]:
    warm = 20
    for i in range(warm):
        app.first(-1 - i)
    wait_results(app, 2 * warm, 60)
    t0 = time.perf_counter()
    for i in range(n):
        app.first(i)
    enqueued = time.perf_counter() - t0
    elapsed = wait_results(app, 2 * (warm + n), timeout) - t0
    return {"workflows": n, "elapsed_s": elapsed, "submit_s": enqueued,
            "wf_per_s": n / elapsed, "steps_per_s": 2 * n / elapsed}  # fmt: skip


def latency(app: Any, samples: int) -> dict[str, Any]:
    first_ms, next_ms = [], []
    fast = {"blocking": True, "timeout": 60, "backoff": 1.0, "max_delay": 0.001}
    for i in range(10 + samples):
        time.sleep(0.01)  # idle between samples, as for stepd
        t0 = time.time_ns()
        second_id = app.first_timed(i).get(**fast)
        result = app.huey.result(second_id, **fast)
        if i >= 10:  # warm-up
            first_ms.append((result["first"]["start"] - t0) / 1e6)
            next_ms.append((result["second_start"] - result["first"]["end"]) / 1e6)
    return {"samples_ms": {"create_to_start": first_ms, "step_to_next": next_ms}}


def kill_test(app: Any, tmp: Path, polling: str, n: int) -> dict[str, Any]:
    """Enqueue n slow tasks, SIGKILL the consumer mid-run, restart it, count the lost ones."""
    consumer = start_consumer(tmp, polling)
    for i in range(n):
        app.slow(i)
    try:
        wait_results(app, n // 4, 60, poll=0.005)
    finally:
        stop_consumer(consumer, signal.SIGKILL)
    done_at_kill = app.huey.result_count()
    consumer = start_consumer(tmp, polling)
    try:
        deadline = time.monotonic() + 60
        while app.huey.pending_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # tasks taken last finish
    finally:
        stop_consumer(consumer)
    done = app.huey.result_count()
    return {"tasks": n, "done_at_kill": done_at_kill, "done": done, "lost": n - done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["throughput", "latency", "kill"])
    ap.add_argument("--polling", choices=list(POLLING), default="default")
    ap.add_argument("--workflows", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="huey-bench-") as d:
        tmp = Path(d)
        os.environ["HUEY_BENCH_DB"] = str(tmp / "huey.db")
        sys.path.insert(0, str(HERE))
        import huey_app as app  # the same module the consumer imports

        if args.scenario == "kill":
            result = kill_test(app, tmp, args.polling, args.tasks)
        else:
            consumer = start_consumer(tmp, args.polling)
            try:
                if args.scenario == "throughput":
                    result = throughput(app, args.workflows, args.timeout)
                else:
                    result = latency(app, args.samples)
            except BaseException:
                sys.stderr.write((tmp / "consumer.log").read_text(errors="replace")[-4000:])
                raise
            finally:
                stop_consumer(consumer)
        app.huey.storage.close()
    from importlib.metadata import version

    result = {"system": "huey", "version": version("huey"), "polling": args.polling,
              "consumer_args": ["-w", "2", "-k", "thread", "-q", *POLLING[args.polling]],
              **result}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if "wf_per_s" in result:
        print(f"huey ({args.polling}): {result['workflows']} workflows in "
              f"{result['elapsed_s']:.2f} s = {result['wf_per_s']:.0f} wf/s")  # fmt: skip
    elif "samples_ms" in result:
        for name, values in result["samples_ms"].items():
            print(f"huey ({args.polling}) {name:<16} p50={statistics.median(values):8.2f} ms  "
                  f"max={max(values):8.2f} ms  n={len(values)}")  # fmt: skip
    else:
        print(f"huey kill test: {result}")


if __name__ == "__main__":
    main()
