"""The `stepd` client commands, run as the real console script against a real `stepd serve`
over loopback HTTP: what a person reads, what a script parses, and the exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon import cli
from tests.process_helpers import (
    TOKEN,
    Daemon,
    clean_env,
    cli_daemon,
    create,
    free_port,
    gate_flow,
    gate_waiting,
    run_cli,
    step_running,
    stepd_command,
    wait_for,
    write_config,
)

APPROVER = "tok-cli-approver"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with cli_daemon(tmp_path_factory.mktemp("cli"), ("ann", APPROVER)) as d:
        yield d


def stepd(daemon: Daemon, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(daemon, *args, **{"timeout": 20, **kwargs})


def flow_file(tmp_path: Path, body: dict[str, Any], name: str = "flow.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return str(path)


def two_steps(name: str = "two-steps") -> dict[str, Any]:
    return {
        "name": name,
        "flow": {
            "start": {"name": "say", "tool": "echo", "args": {"msg": "{{input.msg}}"},
                      "next": "nap"},
            "nap": {"tool": "sleep", "args": {"seconds": 0.2}, "done": True},
        },
        "input": {"msg": "hello there"},
    }  # fmt: skip


def failing(name: str = "cli-fails") -> dict[str, Any]:
    return {
        "name": name,
        "flow": {"start": {"tool": "sleep", "args": {"seconds": -1}, "done": True}},
    }


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=5)


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- submit --wait: one line and an exit code ------------------------------------------------


def test_submit_wait_completed_prints_one_line_with_the_output(
    daemon: Daemon, tmp_path: Path
) -> None:
    r = stepd(daemon, "submit", flow_file(tmp_path, two_steps()), "--wait")
    assert r.returncode == 0, r.stderr
    line = only_line(r.stdout)
    m = re.fullmatch(r"workflow (\d+) completed in ([\d.]+)(ms|s): output (.*)", line)
    assert m is not None, line
    assert json.loads(m[4]) == {"slept": 0.2}  # the state that ended it
    duration = float(m[2]) / (1000 if m[3] == "ms" else 1)
    assert 0.2 <= duration < 10
    assert f"workflow {m[1]} started; waiting..." in r.stderr
    with daemon.client() as c:
        assert c.get(f"/api/workflow/{m[1]}").json()["status"] == "completed"


def test_submit_wait_failed_exits_1_with_the_error(daemon: Daemon, tmp_path: Path) -> None:
    r = stepd(daemon, "submit", flow_file(tmp_path, failing()), "--wait")
    assert r.returncode == 1, r.stdout + r.stderr
    line = only_line(r.stdout)
    assert re.fullmatch(r"workflow \d+ failed after \S+: .*non-negative.*", line), line


def test_submit_wait_json_keeps_the_whole_workflow(daemon: Daemon, tmp_path: Path) -> None:
    r = stepd(daemon, "submit", flow_file(tmp_path, two_steps()), "--wait", "--json")
    assert r.returncode == 0, r.stderr
    wf = json.loads(r.stdout)
    assert wf["status"] == "completed"
    assert [s["state"] for s in wf["steps"]] == ["start", "nap"]
    r = stepd(daemon, "submit", flow_file(tmp_path, failing()), "--wait", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["status"] == "failed"


def test_submit_stop_at_gate_exits_2_with_the_command(daemon: Daemon, tmp_path: Path) -> None:
    r = stepd(daemon, "submit", flow_file(tmp_path, gate_flow("cli-gate")), "--wait",
              "--stop-at-gate")  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    line = only_line(r.stdout)
    m = re.fullmatch(r"workflow (\d+) waiting at gate 'approve' \(step (\d+)\): stepd ready (\d+)",
                     line)  # fmt: skip
    assert m is not None and m[2] == m[3], line
    # The command it names works, and --wait then finishes with 0.
    r = stepd(daemon, "ready", m[3])
    assert r.returncode == 0, r.stderr
    with daemon.client() as c:
        assert wait_for(c, int(m[1]), timeout=5)["status"] == "completed"


def test_submit_wait_waits_through_a_gate_and_names_it(daemon: Daemon, tmp_path: Path) -> None:
    env = clean_env(STEPD_URL=daemon.url, STEPD_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [*stepd_command(), "submit", flow_file(tmp_path, gate_flow("cli-through")), "--wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        wf_id = int(re.fullmatch(r"workflow (\d+) started; waiting...\n", first)[1])  # type: ignore[index]
        announced = proc.stderr.readline()
        step_id = int(re.search(r"stepd ready (\d+)", announced)[1])  # type: ignore[index]
        assert "awaits approval" in announced and "(approve)" in announced
        assert proc.poll() is None  # still waiting: no --stop-at-gate
        with daemon.client() as c:
            assert c.post(f"/api/workflow/{step_id}/ready").status_code == 200
        out, _ = proc.communicate(timeout=10)
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert only_line(out).startswith(f"workflow {wf_id} completed in ")


def test_submit_timeout_exits_3_while_running(daemon: Daemon, tmp_path: Path) -> None:
    body = {
        "name": "slow",
        "flow": {"start": {"tool": "sleep", "args": {"seconds": 10}, "done": True}},
    }
    t0 = time.monotonic()
    r = stepd(daemon, "submit", flow_file(tmp_path, body), "--timeout", "0.5")
    assert r.returncode == 3, r.stdout + r.stderr
    assert time.monotonic() - t0 < 6  # not the 10 s the workflow runs
    assert re.fullmatch(r"workflow (\d+) still running: stepd show \1", only_line(r.stdout))


def test_submit_without_wait_prints_the_answer(daemon: Daemon, tmp_path: Path) -> None:
    r = stepd(daemon, "submit", flow_file(tmp_path, two_steps()))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "started"


# -- show ------------------------------------------------------------------------------------


def test_show_is_readable_and_json_is_raw(daemon: Daemon, tmp_path: Path) -> None:
    r = stepd(daemon, "submit", flow_file(tmp_path, two_steps("shown")), "--wait", "--json")
    wf = json.loads(r.stdout)
    r = stepd(daemon, "show", str(wf["id"]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"workflow {wf['id']}  shown"
    header = "\n".join(lines[: lines.index("")])
    assert re.search(r"^  status +completed$", header, re.M), header
    assert re.search(r"^  created by +james$", header, re.M), header
    assert re.search(r"^  created +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", header, re.M), header
    assert re.search(r"^  completed +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(took \S+\)$", header, re.M)
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["STEP", "STATE", "TOOL", "STATUS", "ATTEMPT", "DURATION", "RESULT"]
    first, second = wf["steps"]
    assert table[1].split()[:5] == [str(first["id"]), "start", "(say)", "echo", "done"]
    assert table[1].endswith('{"msg":"hello there"}')  # decoded from result_json, one line
    assert table[2].split()[:4] == [str(second["id"]), "nap", "sleep", "done"]
    assert table[2].endswith('{"slept":0.2}')
    assert "result_json" not in r.stdout

    r = stepd(daemon, "show", str(wf["id"]), "--json")
    assert json.loads(r.stdout) == wf | {"updated_at": json.loads(r.stdout)["updated_at"]}


def test_show_a_waiting_gate_and_a_failure(daemon: Daemon, tmp_path: Path) -> None:
    with daemon.client() as c:
        gated = create(c, gate_flow("show-gate"))
        gate = wait_for(c, gated, gate_waiting, timeout=5)["steps"][0]
    r = stepd(daemon, "show", str(gated))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^  status +running$", r.stdout, re.M)
    assert re.search(r"^  running for +\S+$", r.stdout, re.M)
    row = next(line for line in r.stdout.splitlines() if line.startswith(str(gate["id"])))
    assert f"awaiting ready: stepd ready {gate['id']}" in row
    assert row.split()[1:4] == ["start", "(approve)", "-"]  # a gate has no tool

    r = stepd(daemon, "submit", flow_file(tmp_path, failing("show-fail")), "--wait", "--json")
    wf = json.loads(r.stdout)
    r = stepd(daemon, "show", str(wf["id"]))
    assert re.search(r"^  error +state 'start': .*non-negative", r.stdout, re.M), r.stdout
    row = r.stdout.splitlines()[-1]
    assert row.startswith(str(wf["steps"][0]["id"])) and "error: " in row

    r = stepd(daemon, "show", "42")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 404: "), r.stderr


def test_show_nests_parallel_and_map_steps_and_survives_missing_fields() -> None:
    """The layout of nested steps (parent_id, scope), and a workflow from an older daemon
    with none of the newer fields: the formatting alone, on the API's JSON shape."""
    t0 = 1_800_000_000_000
    step = {"tool": "echo", "status": "done", "attempt": 1, "awaiting": None, "error": None,
            "started_at": t0, "completed_at": t0 + 1500, "result_json": '"ok"'}  # fmt: skip
    wf = {
        "id": 7, "name": "fan", "status": "running", "created_by": None, "created_at": t0,
        "updated_at": t0, "completed_at": None, "cancelled_at": None, "error": None,
        "output": None,
        "steps": [
            {**step, "id": 1, "name": "start", "state": "start", "parent_id": None, "scope": None},
            {**step, "id": 2, "name": "enrich", "state": "enrich", "tool": None,
             "status": "running", "awaiting": "branches", "completed_at": None,
             "result_json": None, "parent_id": None, "scope": None},
            {**step, "id": 3, "name": "lookup", "state": "lookup", "parent_id": 2,
             "scope": ["enrich", "geo"]},
            {**step, "id": 5, "name": "each", "state": "each", "tool": None, "status": "running",
             "awaiting": "branches", "result_json": None, "parent_id": 2,
             "scope": ["enrich", "ip"]},
            {**step, "id": 4, "name": "store", "state": "store", "parent_id": 2,
             "scope": ["enrich", "geo"]},
            {**step, "id": 7, "name": "send", "state": "send", "parent_id": 5,
             "scope": ["enrich", "ip", "each", 1], "status": "failed", "error": "boom\nline 2",
             "result_json": None},
            {**step, "id": 6, "name": "send", "state": "send", "parent_id": 5,
             "scope": ["enrich", "ip", "each", 0]},
        ],
    }  # fmt: skip
    table = cli._render_workflow(wf)
    rows = {line.split()[0]: line for line in table if line[:1].isdigit()}
    order = [line.split()[0] for line in table if line[:1].isdigit()]
    assert order == ["1", "2", "3", "4", "5", "6", "7"]
    assert re.match(r"1 +start ", rows["1"])
    assert re.match(r"2 +enrich +- +running .*awaiting branches", rows["2"])
    assert re.match(r"3 +  \[geo\] lookup +echo +done +1 +1\.5s +\"ok\"$", rows["3"]), rows["3"]
    assert re.match(r"4 +  \[geo\] store ", rows["4"])
    assert re.match(r"5 +  \[ip\] each ", rows["5"])
    assert re.match(r"6 +    \[0\] send ", rows["6"])
    assert re.match(r"7 +    \[1\] send .*error: boom line 2$", rows["7"]), rows["7"]
    assert "  created by   -" in table

    # An older daemon: no parent_id, scope, output, updated_at or times on the steps.
    old = {"id": 8, "name": "old", "status": "completed", "created_at": t0,
           "completed_at": t0 + 2300,
           "steps": [{"id": 9, "name": "s", "state": "s", "tool": "echo", "status": "done",
                      "attempt": 1, "result_json": "[1, 2]"}]}  # fmt: skip
    text = "\n".join(cli._render_workflow(old))
    assert "(took 2.3s)" in text
    assert re.search(r"^9 +s +echo +done +1 +- +\[1,2\]$", text, re.M), text
    # Without `output`, the outcome is the result of the last step.
    assert cli._outcome_line(old) == "workflow 8 completed in 2.3s: output [1,2]"


def test_show_and_submit_a_fan_out_flow_end_to_end(daemon: Daemon, tmp_path: Path) -> None:
    """parallel, map and a signal wait on the real daemon: show nests the branch and item
    steps under their parallel and map steps; submit --wait --stop-at-gate does not stop at
    a signal wait, and the outcome line carries the output."""
    body = {
        "name": "fan-out",
        "flow": {
            "start": {"tool": "echo", "args": {}, "next": "enrich"},
            "enrich": {"parallel": {
                "geo": {"start": {"tool": "echo", "args": {"q": "<<input.addr>>"}, "done": True}},
                "crm": {"start": {"tool": "echo", "args": {"id": 7}, "done": True}}},
                "next": "notify"},
            "notify": {"map": {"items": "<<input.users>>", "as": "user",
                               "flow": {"start": {"tool": "echo",
                                                  "args": {"to": "<<user>>", "n": "<<index>>"},
                                                  "done": True}}},
                       "next": "settle"},
            "settle": {"wait": {"signal": "paid", "timeout": 60}, "next": "report"},
            "report": {"tool": "echo", "args": {"sent": "<<steps.notify.result | length>>",
                                                "paid": "<<steps.settle.result>>"},
                       "done": True},
        },
        "input": {"addr": "1 Main St", "users": ["a", "b", "c"]},
    }  # fmt: skip
    env = clean_env(STEPD_URL=daemon.url, STEPD_TOKEN=TOKEN, COLUMNS="200")
    proc = subprocess.Popen(
        [*stepd_command(), "submit", flow_file(tmp_path, body), "--stop-at-gate"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        wf_id = int(re.findall(r"\d+", proc.stderr.readline())[0])
        with daemon.client() as c:
            wait_for(c, wf_id, lambda wf: any(s["awaiting"] == "signal" for s in wf["steps"]))
            time.sleep(0.3)
            assert proc.poll() is None  # a signal wait is not a person's gate
            r = stepd(daemon, "show", str(wf_id))
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            head = next(line for line in lines if line.startswith("STEP "))
            at, to = head.index("STATE"), head.index("TOOL")
            rows = [line for line in lines if line[:1].isdigit()]
            states = [row[at:to].rstrip() for row in rows]
            assert states == [
                "start", "enrich", "  [geo] start", "  [crm] start",
                "notify", "  [0] start", "  [1] start", "  [2] start", "settle",
            ] or states == [
                "start", "enrich", "  [crm] start", "  [geo] start",
                "notify", "  [0] start", "  [1] start", "  [2] start", "settle",
            ], r.stdout  # fmt: skip
            assert "(parallel)" in rows[1] and "(map)" in rows[4] and "(wait)" in rows[8]
            assert rows[8].endswith("awaiting signal: waits for a signal") or re.search(
                r"awaiting signal: waits for a signal \(times out \d{4}-", rows[8]
            ), rows[8]
            assert rows[5].endswith('{"to":"a","n":0}'), rows[5]
            r = stepd(daemon, "signal", str(wf_id), "paid", "--data", '{"amount": 42}')
            assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=10)
    finally:
        stop(proc)
    assert proc.returncode == 0, out + err
    line = only_line(out)
    assert re.fullmatch(rf"workflow {wf_id} completed in \S+: output (.*)", line), line
    assert json.loads(line.split(": output ", 1)[1]) == {"sent": 3, "paid": {"amount": 42}}

    # watch replays it with the new kinds of events.
    r = stepd(daemon, "watch", str(wf_id))
    assert r.returncode == 0, r.stderr
    assert re.search(r"⑂ branches_started enrich: 2$", r.stdout, re.M), r.stdout
    assert re.search(r"✓ branch_done start \[geo\]$", r.stdout, re.M), r.stdout
    assert re.search(r"✓ branch_done start \[2\]$", r.stdout, re.M), r.stdout
    assert re.search(rf"⏲ wait_started settle: signal paid \(stepd signal {wf_id} paid\), "
                     r"times out \d{4}-", r.stdout, re.M), r.stdout  # fmt: skip
    assert re.search(r"⚑ signal_received: paid$", r.stdout, re.M), r.stdout
    assert r.stdout.splitlines()[-1].endswith("● completed")


# -- approvals, reject, tools -----------------------------------------------------------------


def test_approvals_inbox_and_reject(daemon: Daemon, tmp_path: Path) -> None:
    body = gate_flow("inbox") | {
        "flow": {
            "start": {
                "name": "approve",
                "tool": None,
                "approvers": ["ann", "bob"],
                "next": "after",
            },
            "after": {"tool": "echo", "args": {}, "done": True},
        }
    }
    with daemon.client() as c:
        wf_id = create(c, body)
        gate = wait_for(c, wf_id, gate_waiting, timeout=5)["steps"][0]
    r = stepd(daemon, "approvals")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["STEP", "WORKFLOW", "STATE"]
    row = next(line for line in lines if line.startswith(str(gate["id"])))
    assert f"{wf_id} (inbox)" in row
    assert re.search(r" start +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\S+ ago\) +ann, bob ", row), row
    assert f"stepd ready {gate['id']}" in row

    r = stepd(daemon, "approvals", "--json")
    items = json.loads(r.stdout)
    (mine,) = [i for i in items if i["step_id"] == gate["id"]]
    assert mine["workflow_id"] == wf_id and mine["approvers"] == ["ann", "bob"]

    # reject needs a reason, and the approver's token.
    r = stepd(daemon, "reject", str(gate["id"]))
    assert r.returncode == 2 and "--reason" in r.stderr
    r = stepd(daemon, "reject", str(gate["id"]), "--reason", "not today", token=APPROVER)
    assert r.returncode == 0, r.stderr
    with daemon.client() as c:
        wf = wait_for(c, wf_id, timeout=5)
    assert wf["status"] == "failed"
    assert wf["steps"][0]["decided_by"] == "ann"
    assert "not today" in wf["steps"][0]["error"]
    r = stepd(daemon, "approvals", "--json")
    assert gate["id"] not in [i["step_id"] for i in json.loads(r.stdout)]
    r = stepd(daemon, "reject", str(gate["id"]), "--reason", "again", token=APPROVER)
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr


def test_approvals_when_nothing_waits(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "stepd.toml", port=port, db=tmp_path / "empty.db")
    d = Daemon(tmp_path, cfg, port)
    try:
        d.started()
        r = stepd(d, "approvals")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "nothing waits for a person\n"
        assert json.loads(stepd(d, "approvals", "--json").stdout) == []
    finally:
        d.kill()


def test_tools_lists_names_and_parameters(daemon: Daemon) -> None:
    r = stepd(daemon, "tools")
    assert r.returncode == 0, r.stderr
    lines = {line.split("(")[0]: line for line in r.stdout.splitlines()}
    assert lines["sleep"].startswith("sleep(seconds: float)")
    assert lines["get_greeting"].startswith('get_greeting(name: str = "World")')
    assert lines["echo"].startswith("echo(**args)")
    assert "[not idempotent]" not in lines["sleep"]
    r = stepd(daemon, "tools", "--json")
    tools = {t["name"]: t for t in json.loads(r.stdout)}
    assert set(tools) == set(lines)
    assert tools["sleep"]["parameters"][0]["name"] == "seconds"


# -- run control: pause, resume, redrive, intervene, signal ---------------------------------


def test_pause_and_resume(daemon: Daemon, tmp_path: Path) -> None:
    body = {
        "name": "pausable",
        "flow": {
            "start": {"tool": "sleep", "args": {"seconds": 2}, "next": "two"},
            "two": {"tool": "echo", "args": {"n": 2}, "done": True},
        },
    }
    with daemon.client() as c:
        wf_id = create(c, body)
        wait_for(c, wf_id, step_running, timeout=5)
        r = stepd(daemon, "pause", str(wf_id), "--reason", "look first")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"id": wf_id, "status": "paused"}
        # The running sleep finishes; nothing new starts.
        wait_for(c, wf_id, lambda wf: wf["steps"][0]["status"] == "done", timeout=5)
        time.sleep(0.5)
        wf = c.get(f"/api/workflow/{wf_id}").json()
        assert wf["status"] == "paused"
        assert wf["steps"][0]["status"] == "done"  # the running tool finished
        held = wf["steps"][1:]  # the next one may be queued, but it is held
        assert all(s["status"] == "pending" and s["started_at"] is None for s in held), held
        assert re.search(r"^  status +paused$", stepd(daemon, "show", str(wf_id)).stdout, re.M)

        r = stepd(daemon, "pause", str(wf_id))
        assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr

        r = stepd(daemon, "resume", str(wf_id), "--reason", "fine")
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["id"] == wf_id and answer["status"] == "running"
        assert answer["redriven"] is False
        wf = wait_for(c, wf_id, timeout=5)
    assert wf["status"] == "completed"
    events = _events(daemon, wf_id)
    paused = next(e for e in events if e["type"] == "paused")
    assert paused["data"].get("reason") == "look first"
    assert any(e["type"] == "resumed" for e in events)

    r = stepd(daemon, "resume", str(wf_id))
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr
    r = stepd(daemon, "pause", "42")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 404: "), r.stderr


def test_redrive_a_failed_workflow_from_a_step(daemon: Daemon, tmp_path: Path) -> None:
    body = {
        "name": "redrivable",
        "flow": {
            "start": {"tool": "echo", "args": {"n": 1}, "next": "boom"},
            "boom": {"tool": "sleep", "args": {"seconds": "{{input.seconds}}"}, "done": True},
        },
        "input": {"seconds": -1},
    }
    r = stepd(daemon, "submit", flow_file(tmp_path, body), "--wait", "--json")
    assert r.returncode == 1
    wf_id = json.loads(r.stdout)["id"]

    r = stepd(daemon, "redrive", str(wf_id), "--from-step", "nowhere")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 422: "), r.stderr

    # intervene is refused while it is failed (neither paused nor at a gate).
    r = stepd(daemon, "intervene", str(wf_id), "--input", '{"seconds": 0}')
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr

    r = stepd(daemon, "redrive", str(wf_id))
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["id"] == wf_id and answer["redriven"] is True
    with daemon.client() as c:
        wf = wait_for(c, wf_id, timeout=5)
    assert wf["status"] == "failed"  # the same input fails the same way
    starts = [s for s in wf["steps"] if s["state"] == "start"]
    assert len(starts) == 1  # the state that succeeded did not run again

    r = stepd(daemon, "resume", str(wf_id), "--from-step", "start")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["redriven"] is True
    with daemon.client() as c:
        wf = wait_for(c, wf_id, timeout=5)
    assert len([s for s in wf["steps"] if s["state"] == "start"]) == 2

    # watch reads on past a failure that was redriven, to the end of the last run.
    r = stepd(daemon, "watch", str(wf_id))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len([line for line in lines if " failed" in line and "●" in line]) == 3, r.stdout
    assert len([line for line in lines if "redriven" in line]) == 2, r.stdout
    assert "● failed" in lines[-1], r.stdout


def test_intervene_patches_the_input_at_a_gate(daemon: Daemon, tmp_path: Path) -> None:
    body = {
        "name": "intervened",
        "flow": {
            "start": {"name": "approve", "tool": None, "next": "say"},
            "say": {"tool": "echo", "args": {"to": "{{input.to}}", "cc": "{{input.cc}}"},
                    "done": True},
        },
        "input": {"to": "alice", "cc": "bob", "keep": 1},
    }  # fmt: skip
    with daemon.client() as c:
        wf_id = create(c, body)
        gate = wait_for(c, wf_id, gate_waiting, timeout=5)["steps"][0]
        r = stepd(daemon, "intervene", str(wf_id), "--input", '{"to": "carol"}',
                  "--reason", "wrong person")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["input"] == {"to": "carol", "cc": "bob", "keep": 1}
        patch = tmp_path / "patch.json"
        patch.write_text('{"cc": "dave", "keep": null}')
        r = stepd(daemon, "intervene", str(wf_id), "--input", f"@{patch}")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["input"] == {"to": "carol", "cc": "dave"}
        r = stepd(daemon, "intervene", str(wf_id), "--input", "@-", stdin='{"cc": "erin"}')
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["input"] == {"to": "carol", "cc": "erin"}
        assert c.post(f"/api/workflow/{gate['id']}/ready").status_code == 200
        wf = wait_for(c, wf_id, timeout=5)
    assert wf["status"] == "completed"
    assert json.loads(wf["steps"][-1]["result_json"]) == {"to": "carol", "cc": "erin"}
    intervened = [e for e in _events(daemon, wf_id) if e["type"] == "intervened"]
    assert len(intervened) == 3
    assert intervened[0]["data"]["before"] == {"to": "alice", "cc": "bob", "keep": 1}
    assert intervened[0]["data"]["after"] == {"to": "carol", "cc": "bob", "keep": 1}
    assert intervened[0]["data"]["reason"] == "wrong person"


def test_intervene_rejects_bad_input_locally(daemon: Daemon, tmp_path: Path) -> None:
    r = stepd(daemon, "intervene", "1", "--input", "{nope")
    assert r.returncode == 1 and "--input is not valid JSON" in r.stderr, r.stderr
    r = stepd(daemon, "intervene", "1", "--input", f"@{tmp_path / 'missing.json'}")
    assert r.returncode == 1 and "cannot read" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_signal_releases_a_waiting_workflow(daemon: Daemon) -> None:
    body = {
        "name": "signalled",
        "flow": {
            "start": {"wait": {"signal": "go", "timeout": 30}, "next": "after"},
            "after": {"tool": "echo", "args": {"got": "{{result}}"}, "done": True},
        },
    }
    with daemon.client() as c:
        wf_id = create(c, body)
        wait_for(c, wf_id, lambda wf: any(s.get("awaiting") == "signal" for s in wf["steps"]),
                 timeout=5)  # fmt: skip
        r = stepd(daemon, "show", str(wf_id))
        assert "awaiting signal" in r.stdout, r.stdout
        r = stepd(daemon, "signal", str(wf_id), "go", "--data", '{"n": 5}')
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"accepted": True}
        wf = wait_for(c, wf_id, timeout=5)
    assert wf["status"] == "completed", wf
    assert any(e["type"] == "signal_received" for e in _events(daemon, wf_id))

    r = stepd(daemon, "signal", str(wf_id), "go")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr
    r = stepd(daemon, "signal", str(wf_id), "go", "--data", "{bad")
    assert r.returncode == 1 and "--data is not valid JSON" in r.stderr
    # An approve token may decide gates, not signal workflows.
    r = stepd(daemon, "signal", str(wf_id), "go", token=APPROVER)
    assert r.returncode == 1 and r.stderr.startswith("stepd: 403: "), r.stderr


def test_help_documents_the_commands_and_exit_codes() -> None:
    r = subprocess.run([*stepd_command(), "--help"], capture_output=True, text=True, timeout=20,
                       env=clean_env())  # fmt: skip
    assert r.returncode == 0
    for command in ("pause", "resume", "redrive", "intervene", "signal", "reject", "approvals",
                    "tools", "show", "submit"):  # fmt: skip
        assert re.search(rf"^    {command} ", r.stdout, re.M), command
    assert "exit status:" in r.stdout
    assert re.search(r"^  2  submit --stop-at-gate", r.stdout, re.M), r.stdout


def _events(daemon: Daemon, wf_id: int) -> list[dict[str, Any]]:
    """The workflow's events so far, read from its event stream (ended or not)."""
    events: list[dict[str, Any]] = []
    with daemon.client() as c:
        try:
            with c.stream("GET", f"/api/workflow/{wf_id}/events",
                          timeout=httpx.Timeout(5, read=1.0)) as resp:  # fmt: skip
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
        except httpx.ReadTimeout:
            pass  # a workflow that has not ended: its stream stays open
    return events
