"""The expression sandbox with the real `stepd serve`: attacks, restarts, no orphans."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.process_helpers import Daemon, create, free_port, wait_for, write_config
from tests.test_template_limits import SPLITS


def _sandboxes(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (the daemon's sandbox processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _attack_flow() -> dict[str, object]:
    # Three args of 462 MB each: the daemon used to crash on this, and again on every
    # restart while recovery re-ran the step.
    args = {name: "{{" + SPLITS + "}}" for name in ("a", "b", "c")}
    return {"name": "bomb", "input": {},
            "flow": {"start": {"tool": "echo", "args": args, "done": True}}}  # fmt: skip


def _ordinary() -> dict[str, object]:
    return {"name": "after", "input": {"n": 1}, "flow": {"start": {
        "tool": "echo", "args": {"v": "{{ input.n * 2 }}"}, "done": True}}}  # fmt: skip


def test_memory_bombs_fail_and_the_daemon_survives_and_restarts(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "stepd.toml", port=port, db=tmp_path / "stepd.db")
    daemon = Daemon(tmp_path, config, port).started()
    try:
        with daemon.client() as client:
            ids = [create(client, _attack_flow()) for _ in range(3)]
            slowest = 0.0
            for wf_id in ids:
                deadline = time.monotonic() + 30
                while client.get(f"/api/workflow/{wf_id}").json()["status"] == "running":
                    began = time.monotonic()
                    assert client.get("/healthz").status_code == 200
                    slowest = max(slowest, time.monotonic() - began)
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            for wf_id in ids:
                wf = wait_for(client, wf_id)
                assert wf["status"] == "failed"
                assert "template_m" in wf["error"] and "state 'start'" in wf["error"]
            assert slowest < 1.0
            # The bombs' sandbox processes were stopped; an ordinary expression starts one.
            assert wait_for(client, create(client, _ordinary()))["status"] == "completed"
            sandboxes = _sandboxes(daemon.pid)
            assert 1 <= len(sandboxes) <= 2
        # SIGKILL: the sandbox processes see their pipe close and exit on their own.
        daemon.signal(signal.SIGKILL)
        daemon.wait(5)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in sandboxes):
            assert time.monotonic() < deadline, "a sandbox process outlived its daemon"
            time.sleep(0.05)
        daemon.started()
        with daemon.client() as client:
            assert [wait_for(client, i)["status"] for i in ids] == ["failed"] * 3
            ok = create(client, _ordinary())
            assert wait_for(client, ok)["steps"][0]["result_json"] == '{"v":2}'
        sandboxes = _sandboxes(daemon.pid)
        assert daemon.stop() == 0
        assert not any(_alive(p) for p in sandboxes)
    finally:
        daemon.kill()
    assert "Traceback" not in daemon.stderr()
