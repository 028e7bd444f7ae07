"""Parallel, map and wait states survive kill -9 of the real `stepd serve` process: what
finished is not run again, what was running or waiting carries on after the restart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.process_helpers import Daemon, create, free_port, wait_for, write_config


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    cfg = write_config(tmp_path / "stepd.toml", port=port, db=tmp_path / "stepd.db",
                       poll_interval=0.2)  # fmt: skip
    d = Daemon(tmp_path, cfg, port)
    try:
        yield d.started()
    finally:
        d.kill()


def nap(seconds: float) -> dict[str, Any]:
    return {"tool": "sleep", "args": {"seconds": seconds}, "done": True}


FLOW = {
    "start": {"parallel": {"a": {"start": nap(0.05)}, "b": {"start": nap(2.5)}}, "next": "m"},
    "m": {"map": {"items": [0, 1, 2, 3, 4, 5], "max_concurrency": 2,
                  "flow": {"start": nap(0.6)}}, "next": "w"},
    "w": {"wait": {"seconds": 1.5}, "next": "s"},
    "s": {"wait": {"signal": "go"}, "done": True},
}  # fmt: skip


def done_rows(wf: dict[str, Any]) -> dict[int, tuple[Any, ...]]:
    return {s["id"]: (tuple(s["scope"] or ()), s["state"]) for s in wf["steps"]
            if s["status"] == "done"}  # fmt: skip


def restart(daemon: Daemon) -> None:
    daemon.kill()
    daemon.start().wait_healthy()


def test_kill_9_in_parallel_map_and_waits_loses_and_repeats_nothing(daemon: Daemon) -> None:
    with daemon.client() as client:
        run(daemon, client)


def run(daemon: Daemon, client: Any) -> None:
    wf_id = create(client, {"name": "states", "flow": FLOW})
    finished: dict[int, tuple[Any, ...]] = {}

    def checkpoint(until: Any, timeout: float = 20.0) -> None:
        wf = wait_for(client, wf_id, until, timeout=timeout)
        done = done_rows(wf)
        assert finished.items() <= done.items(), "a finished step changed or vanished"
        finished.update(done)
        restart(daemon)

    def branch_a_done(wf: dict[str, Any]) -> bool:
        return any(s["scope"] == ["start", "a"] and s["status"] == "done" for s in wf["steps"])

    checkpoint(branch_a_done)  # in the parallel: a done, b running
    checkpoint(lambda wf: sum(1 for s in wf["steps"] if s["scope"] and s["scope"][0] == "m"
                              and s["status"] == "done") >= 2)  # fmt: skip
    checkpoint(lambda wf: any(s["awaiting"] == "timer" for s in wf["steps"]))
    checkpoint(lambda wf: any(s["awaiting"] == "signal" for s in wf["steps"]))
    resp = client.post(f"/api/workflow/{wf_id}/signal", json={"name": "go", "data": {"ok": 1}})
    assert resp.status_code == 202, resp.text
    wf = wait_for(client, wf_id, timeout=20)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"ok": 1}
    done = done_rows(wf)
    assert finished.items() <= done.items()
    # Every state visit finished exactly once: nothing ran twice to completion.
    counts = Counter(done.values())
    assert all(n == 1 for n in counts.values()), counts
    items = sorted(key[0][1] for key in done.values() if key[0] and key[0][0] == "m")
    assert items == [0, 1, 2, 3, 4, 5]
    assert {key for key in done.values() if not key[0]} == {((), "start"), ((), "m"), ((), "w"),
                                                             ((), "s")}  # fmt: skip
