"""Memory of a real `stepd serve` while the http tool meets a huge response.

A loopback server answers 300 MB (with a Content-Length), 1 GiB of zeros as a gzip
bomb, and an endless body; for each, one workflow calls the built-in http tool on it.
The daemon's resident memory is sampled from /proc while the step runs; the figure is
the peak (VmHWM) minus the resident size before the step, after one small warm-up
request. The step must fail with the result limit's error, not retry.

    .venv/bin/python bench/egress.py            # the three cases, [executor] defaults
    .venv/bin/python bench/egress.py --mb 100 --cases large
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from common import TOKEN, free_port, running, start_daemon

CHUNK = b"x" * 65536


def gzip_bomb(decoded_mib: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1024 * 1024)
    return b"".join([*(z.compress(zeros) for _ in range(decoded_mib)), z.flush()])


class Handler(BaseHTTPRequestHandler):
    large_bytes = 300 * 1024 * 1024
    bomb = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/small":
            self._head(200, 13)
            self.wfile.write(b'{"ok": true} ')
        elif self.path == "/large":
            self._head(200, self.large_bytes)
            self._write(self.large_bytes)
        elif self.path == "/bomb":
            self._head(200, len(self.bomb), gzip=True)
            self.wfile.write(self.bomb)
        elif self.path == "/endless":
            self._head(200, None)
            self._write(4 * self.large_bytes)  # "endless": longer than anyone should read
        else:
            self._head(404, 0)

    def _head(self, status: int, length: int | None, *, gzip: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _write(self, total: int) -> None:
        try:
            for _ in range(total // len(CHUNK)):
                self.wfile.write(CHUNK)
        except OSError:
            pass  # the daemon stopped reading and hung up

    def log_message(self, *args: Any) -> None:
        pass


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def run_step(client: httpx.Client, url: str) -> tuple[dict[str, Any], float]:
    flow = {"start": {"tool": "http", "args": {"url": url, "timeout": 120},
                      "retry": {"max_attempts": 3, "backoff_s": 0.1}, "done": True}}  # fmt: skip
    started = time.monotonic()
    resp = client.post("/api/workflow", json={"name": "egress-bench", "flow": flow})
    resp.raise_for_status()
    wf_id = resp.json()["id"]
    while time.monotonic() - started < 600:
        try:
            wf = client.get(f"/api/workflow/{wf_id}").json()
        except httpx.TimeoutException:
            continue  # a daemon busy with a huge body may not answer for a while
        if wf["status"] in ("completed", "failed", "cancelled"):
            return wf, time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"workflow {wf_id} did not finish in 600 s")


def measure(client: httpx.Client, pid: int, url: str) -> dict[str, Any]:
    before = memory_kib(pid)["VmRSS"]
    wf, seconds = run_step(client, url)
    after = memory_kib(pid)
    step = wf["steps"][-1]
    return {
        "status": wf["status"], "attempts": step["attempt"], "seconds": round(seconds, 2),
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(after["VmHWM"] / 1024, 1),
        "growth_mib": round((after["VmHWM"] - before) / 1024, 1),
        "error": (step["error"] or "")[:200],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the large response, MiB")
    parser.add_argument("--bomb-mib", type=int, default=1024, help="the bomb's decoded size")
    parser.add_argument("--cases", default="large,bomb,endless", help="comma-separated")
    args = parser.parse_args()
    Handler.large_bytes = args.mb * 1024 * 1024
    Handler.bomb = gzip_bomb(args.bomb_mib)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    port = free_port()
    out: dict[str, Any] = {"large_mib": args.mb, "bomb_wire_kib": len(Handler.bomb) // 1024,
                           "bomb_decoded_mib": args.bomb_mib}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, running(start_daemon(Path(tmp), port)) as proc:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:  # fmt: skip
            warm, _ = run_step(client, f"{base}/small")  # imports and first-use caches
            assert warm["status"] == "completed", warm
            for case in args.cases.split(","):
                out[case] = measure(client, proc.pid, f"{base}/{case}")
    server.shutdown()
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
