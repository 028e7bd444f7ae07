"""What hostile expressions cost a running daemon.

    python bench/templates.py [--repeat 3]

Starts a real `stepd serve` and submits each expression of an adversarial corpus
(tests/test_template_limits.py, and the attacks that froze or crashed the daemon
before expressions ran in a sandbox process) as the args of a one-step workflow, one
at a time. For each it prints the median, over `--repeat` runs, of: the time until
the workflow failed, the slowest /healthz answer while it ran (polled every 10 ms),
the daemon's resident size growth (sampled every 5 ms) and the sandbox processes'
largest resident size; then the same for an ordinary expression, for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import TOKEN, free_port, running, start_daemon  # bench/common.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_template_limits import CORPUS  # noqa: E402

ORDINARY = [("input.n + 1", "ordinary"), ("input.s|upper ~ '!'", "ordinary")]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except OSError:
        return 0


def children(pid: int) -> list[int]:
    """The sandbox processes: children of the daemon."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def attack(client: httpx.Client, pid: int, expr: str) -> dict[str, float]:
    body = {"name": "attack", "input": {"s": "text", "n": 1},
            "flow": {"start": {"tool": "echo", "args": {"v": "{{" + expr + "}}"},
                               "done": True}}}  # fmt: skip
    base = rss(pid)
    peak = {"daemon": base, "sandbox": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["daemon"] = max(peak["daemon"], rss(pid))
            for child in children(pid):
                peak["sandbox"] = max(peak["sandbox"], rss(child))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.perf_counter()
    wf_id = client.post("/api/workflow", json=body).json()["id"]
    slowest = 0.0
    while True:
        t = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        slowest = max(slowest, time.perf_counter() - t)
        wf = client.get(f"/api/workflow/{wf_id}").json()
        if wf["status"] in ("completed", "failed"):
            break
        time.sleep(0.01)
    took = time.perf_counter() - began
    stop.set()
    sampler.join()
    return {
        "ms": took * 1000,
        "healthz_ms": slowest * 1000,
        "grew_mb": (peak["daemon"] - base) / 2**20,
        "sandbox_mb": peak["sandbox"] / 2**20,
        "failed": wf["status"] == "failed",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        port = free_port()
        log = open(Path(d) / "daemon.log", "wb")  # noqa: SIM115 - closed with the directory
        with running(start_daemon(Path(d), port, log=log)) as proc:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers,
                              timeout=30) as client:  # fmt: skip
                attack(client, proc.pid, "input.n + 1")  # start the sandbox
                print(f"{'expression':52} {'fails after':>11} {'healthz max':>11} "
                      f"{'daemon +MB':>10} {'sandbox MB':>10}")  # fmt: skip
                for expr, _ in [*CORPUS, *ORDINARY]:
                    runs = [attack(client, proc.pid, expr) for _ in range(args.repeat)]
                    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    label = expr if len(expr) <= 50 else expr[:47] + "..."
                    outcome = "" if all(r["failed"] for r in runs) else "  (completed)"
                    print(f"{label:52} {med['ms']:9.0f}ms {med['healthz_ms']:9.1f}ms "
                          f"{med['grew_mb']:10.1f} {med['sandbox_mb']:10.1f}{outcome}")  # fmt: skip
                print(f"daemon resident size now: {rss(proc.pid) / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
