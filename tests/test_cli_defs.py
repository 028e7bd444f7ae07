"""`stepd def ...` and `stepd runs`: saved definitions from the command line. The formatting
alone on the API's JSON shapes, then the real console script against a real `stepd serve`
over loopback HTTP: what a person reads, what a script parses, and the exit codes."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon import cli
from tests.process_helpers import (
    TOKEN,
    Daemon,
    clean_env,
    cli_daemon,
    run_cli,
    stepd_command,
    wait_for,
)

READER = "tok-cli-defs-reader"
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


# -- formatting, on the API's shapes -------------------------------------------------------


def iso(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_iso_times_are_shown_in_local_time() -> None:
    assert cli._iso_when(None) == "-"
    assert cli._iso_when("") == "-"
    assert cli._iso_when("not a time") == "not a time"
    at = datetime(2026, 12, 3, 15, 0, 1, 123000, tzinfo=UTC)
    local = at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert cli._iso_when("2026-12-03T15:00:01.123Z") == local
    assert cli._iso_when("2026-12-03T15:00:01.123+00:00") == local
    assert cli._iso_when("2026-12-03T15:00:01") == local  # no zone: UTC, as the API means it
    assert cli._iso_when(int(at.timestamp() * 1000)) == local  # epoch ms


def test_durations_in_seconds() -> None:
    assert cli._seconds(None) == ""
    assert cli._seconds("x") == ""
    assert cli._seconds(0) == "0ms"
    assert cli._seconds(0.25) == "250ms"
    assert cli._seconds(83) == "1m23s"
    assert cli._seconds(2.34) == "2.3s"


def test_def_list_table() -> None:
    answer = {
        "workflows": [
            {"id": 1733239000000, "name": "kyc", "version": 3, "status": "active",
             "tags": ["x", "y"], "deployed": True, "updated_at": "2026-12-03T15:00:00Z"},
            {"id": 1733239000001, "name": "a much longer name", "version": 1, "status": "draft",
             "tags": [], "deployed": False, "updated_at": None},
        ],
        "total": 5,
    }  # fmt: skip
    lines = cli._render_def_list(answer)
    assert lines[0].split() == ["ID", "NAME", "VERSION", "STATUS", "TAGS", "UPDATED"]
    first = lines[1].split("  ")
    assert [c.strip() for c in first if c.strip()][:5] == [
        "1733239000000", "kyc", "v3", "active (deployed)", "x,y"
    ]  # fmt: skip
    assert TIME.search(lines[1])
    assert lines[2].split()[:5] == ["1733239000001", "a", "much", "longer", "name"]
    assert lines[2].rstrip().endswith("-")  # no tags, no time
    # Columns line up: each row's version starts where the header's VERSION does.
    col = lines[0].index("VERSION")
    assert lines[1][col:].startswith("v3") and lines[2][col:].startswith("v1")
    assert lines[-1] == "(1-2 of 5; --offset 2 for more)"
    assert cli._render_def_list({"workflows": [], "total": 0}) == ["no definitions"]
    assert cli._render_def_list({"workflows": [], "total": 3}, offset=10) == [
        "no definitions here (3 in all)"
    ]


def definition(**over: Any) -> dict[str, Any]:
    wf = {
        "id": 1733239000000, "name": "kyc", "version": 2, "status": "active",
        "trigger_type": "manual", "tags": ["x"], "description": "Know your customer",
        "concurrency": 10, "created_at": "2026-12-03T15:00:00Z",
        "updated_at": "2026-12-03T15:05:00Z", "created_by": "admin",
        "definition": {"name": "kyc", "flow": {"start": {"tool": "echo", "done": True}}},
        "flow": {}, "deployed": False, "webhook": None,
    }  # fmt: skip
    return wf | over


VERSIONS = [
    {"version": 2, "change_summary": "Longer timeout", "created_at": "2026-12-03T15:05:00Z",
     "created_by": "james"},
    {"version": 1, "change_summary": "Initial version", "created_at": "2026-12-03T15:00:00Z",
     "created_by": "admin"},
]  # fmt: skip


def test_def_show_header_webhook_and_versions() -> None:
    lines = cli._render_definition(definition(), VERSIONS, "http://127.0.0.1:8000")
    assert lines[0] == "definition 1733239000000  kyc"
    header = "\n".join(lines[: lines.index("")])
    for pattern in (r"^  version +v2$", r"^  status +active$", r"^  trigger +manual$",
                    r"^  tags +x$", r"^  description +Know your customer$",
                    r"^  concurrency +10 runs at once$", r"^  states +start$",
                    rf"^  created +{TIME.pattern} by admin$", rf"^  updated +{TIME.pattern}$",
                    r"^  webhook +not deployed \(stepd def deploy kyc\)$"):  # fmt: skip
        assert re.search(pattern, header, re.M), (pattern, header)
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["VERSION", "CREATED", "BY", "SUMMARY"]
    assert table[1].startswith("v2 ") and table[1].endswith("james  Longer timeout")
    assert table[2].startswith("v1 ") and table[2].endswith("admin  Initial version")


def test_def_show_webhook_states() -> None:
    hook = {"mode": "single", "url": "/hooks/abc", "armed_until": None, "webhook_id": "abc",
            "webhook_secret": "s3cret"}  # fmt: skip
    lines = cli._render_definition(definition(deployed=True, webhook=hook), [], "http://h:1")
    text = "\n".join(lines)
    assert re.search(r"^  webhook +single-use, not armed \(stepd def arm kyc\)$", text, re.M)
    assert re.search(r"^  url +http://h:1/hooks/abc$", text, re.M)
    assert "s3cret" not in text  # only --json shows the secret
    assert re.search(r"^  secret +set \(stepd def show kyc --json shows it\)$", text, re.M)
    assert lines[-1] == "no versions"

    armed = hook | {"armed_until": iso(timedelta(minutes=9))}
    text = "\n".join(cli._render_definition(definition(deployed=True, webhook=armed), []))
    assert re.search(rf"^  webhook +single-use, armed until {TIME.pattern}$", text, re.M)
    expired = hook | {"armed_until": iso(-timedelta(minutes=1))}
    text = "\n".join(cli._render_definition(definition(deployed=True, webhook=expired), []))
    assert "not armed" in text

    persistent = hook | {"mode": "persistent"}
    text = "\n".join(cli._render_definition(definition(deployed=True, webhook=persistent), []))
    assert re.search(r"^  webhook +persistent: takes calls while deployed$", text, re.M)


def test_def_show_keeps_the_newest_versions_and_survives_missing_fields() -> None:
    many = [{"version": n, "change_summary": f"change {n}"} for n in range(30, 0, -1)]
    lines = cli._render_definition({"id": 5, "name": "bare"}, many)
    assert lines[-1] == "(and 10 older: stepd def show bare --json)"
    assert lines[-2].startswith("v11 ")
    steps = definition(definition={"name": "d", "steps": [{"id": "fetch"}, {"id": "notify"}]})
    assert re.search(r"^  steps +fetch, notify$", "\n".join(cli._render_definition(steps, [])),
                     re.M)  # fmt: skip


def test_diff_lines() -> None:
    answer = {
        "diff": [
            {"op": "add", "path": "/flow/nap", "value": {"tool": "sleep", "done": True}},
            {"op": "replace", "path": "/flow/start/args/msg", "value": "hi"},
            {"op": "remove", "path": "/tags/0"},
            {"op": "move", "from": "/a", "path": "/b"},
            {"op": "replace", "path": "", "value": None},
        ],
        "summary": "Added 1 step, modified 1 step",
        "v1": 1,
        "v2": 3,
    }
    assert cli._render_diff(answer) == [
        "Added 1 step, modified 1 step",
        'add     /flow/nap {"tool":"sleep","done":true}',
        'replace /flow/start/args/msg "hi"',
        "remove  /tags/0",
        "move    /a -> /b",
        'replace "" null',
    ]
    assert cli._render_diff({"diff": [], "summary": ""}) == ["no changes"]


def test_import_lines() -> None:
    answer = {"created": ["a", "b"], "updated": ["c"],
              "skipped": [{"name": "d", "reason": "exists"}, {"name": "e"}]}  # fmt: skip
    assert cli._render_import(answer) == [
        "created a", "created b", "updated c", "skipped d: exists", "skipped e"
    ]  # fmt: skip
    assert cli._render_import({"created": [], "updated": [], "skipped": []}) == [
        "nothing to import"
    ]


def test_runs_table() -> None:
    answer = {
        "runs": [
            {"id": 11, "version": 2, "status": "completed", "trigger": "manual",
             "started_at": "2026-12-03T15:00:00Z", "duration_seconds": 1.5, "error": None},
            {"id": 10, "definition_version": 1, "status": "failed", "trigger": "webhook",
             "started_at": None, "duration_seconds": None, "error": "boom\nat line 2"},
        ],
        "total": 3,
    }  # fmt: skip
    lines = cli._render_runs(answer)
    assert lines[0].split() == ["RUN", "VERSION", "STATUS", "TRIGGER", "STARTED", "DURATION",
                                "ERROR"]  # fmt: skip
    assert lines[1].split()[:4] == ["11", "v2", "completed", "manual"]
    assert "1.5s" in lines[1]
    assert lines[2].split()[:5] == ["10", "v1", "failed", "webhook", "-"]
    assert lines[2].endswith("boom at line 2")
    assert lines[-1] == "(2 of 3; --limit and --offset for more)"
    ok = [{"id": 1, "version": 1, "status": "running", "trigger": "manual"}]
    assert cli._render_runs({"runs": ok})[0].split() == ["RUN", "VERSION", "STATUS", "TRIGGER",
                                                          "STARTED", "DURATION"]  # fmt: skip
    assert cli._render_runs({"runs": []}) == ["no runs"]
    assert cli._render_runs([]) == ["no runs"]


def test_run_outcome_lines() -> None:
    line = cli._run_outcome_line
    done = {"status": "completed", "output": {"ok": True}, "duration_seconds": 1.2}
    assert line(7, 0, done) == 'run 7 completed in 1.2s: output {"ok":true}'
    assert line(7, 0, {}) == "run 7 completed"
    failed = {"status": "failed", "error": "state 'x': boom", "duration_seconds": 0.05}
    assert line(7, 1, failed) == "run 7 failed after 50ms: state 'x': boom"
    assert line(7, 1, {"status": "cancelled"}) == "run 7 cancelled"
    assert line(7, 1, {}, "execution failed") == "run 7 failed: execution failed"
    assert line(7, 3, {"status": "queued"}) == "run 7 still queued: stepd show 7"
    assert line(7, 3, {}) == "run 7 still running: stepd show 7"
    gate = [{"step_id": 8, "state": "approve", "awaiting": "ready"}]
    assert (
        line(7, 2, {}, awaiting=gate) == "run 7 waiting at gate 'approve' (step 8): stepd ready 8"
    )
    two = [{"step_id": 9, "state": "other", "awaiting": "signal"}, *gate]  # the gate first
    assert line(7, 2, {}, awaiting=two).endswith("stepd ready 8 (and 1 more: stepd show 7)")
    decision = [{"step_id": 8, "state": "pay", "awaiting": "decision"}]
    assert line(7, 2, {}, awaiting=decision) == (
        "run 7 waiting: step 'pay' (8) was interrupted: stepd retry 8 or stepd fail 8"
    )
    signal = [{"step_id": 8, "state": "hold", "awaiting": "signal"}]
    assert line(7, 2, {}, awaiting=signal) == (
        "run 7 waiting: step 'hold' (8) waits for a signal: stepd signal 7 NAME"
    )
    timer = [{"step_id": 8, "state": "later", "awaiting": "timer"}]
    assert line(7, 2, {}, awaiting=timer) == "run 7 waiting: step 'later' (8) waits for its timer"
    assert line(7, 2, {}, awaiting=[{"paused": True}]) == "run 7 is paused: stepd resume 7"
    # A step of a call state's child workflow: the child's id where it matters.
    inner = [{"workflow_id": 5, "step_id": 8, "state": "approve", "awaiting": "ready"}]
    assert line(7, 2, {}, awaiting=inner) == (
        "run 7 waiting at gate 'approve' (step 8 in child workflow 5): stepd ready 8"
    )
    inner = [{"workflow_id": 5, "step_id": 8, "state": "hold", "awaiting": "signal"}]
    assert line(7, 2, {}, awaiting=inner) == (
        "run 7 waiting: step 'hold' (8 in child workflow 5) waits for a signal: stepd signal 5 NAME"
    )
    own = [{"workflow_id": 7, "step_id": 8, "state": "hold", "awaiting": "timer"}]
    assert line(7, 2, {}, awaiting=own) == "run 7 waiting: step 'hold' (8) waits for its timer"


def test_what_counts_as_stopped_waiting() -> None:
    def wf(*steps: tuple[str, str | None]) -> dict[str, Any]:
        rows = [{"id": n, "state": f"s{n}", "status": status, "awaiting": awaiting}
                for n, (status, awaiting) in enumerate(steps)]  # fmt: skip
        return {"id": 1, "steps": rows}

    assert cli._stopped_waiting(wf()) == []
    assert cli._stopped_waiting(wf(("done", None))) == []
    assert cli._stopped_waiting(wf(("done", None), ("running", None))) == []  # a tool runs
    assert cli._stopped_waiting(wf(("running", "ready"), ("pending", None))) == []
    assert cli._stopped_waiting(wf(("done", None), ("running", "ready"))) == [
        {"workflow_id": 1, "step_id": 1, "state": "s1", "awaiting": "ready"}
    ]
    # A parallel step waiting for its branches, whose branches all wait: stopped.
    stopped = wf(("running", "branches"), ("running", "signal"), ("running", "timer"))
    assert [w["awaiting"] for w in cli._stopped_waiting(stopped)] == ["signal", "timer"]
    # A call step: what its child waits at, or nothing while the child runs.
    parent = {"id": 1, "steps": [{"id": 10, "state": "call", "status": "running",
                                  "awaiting": "child", "child_id": 2}]}  # fmt: skip
    gate = {"id": 20, "state": "ok", "status": "running", "awaiting": "ready"}
    at_gate = {"id": 2, "status": "running", "steps": [gate]}
    running = {**at_gate, "steps": [{**gate, "awaiting": None}]}
    assert cli._stopped_waiting(parent) == []  # no way to look at the child
    assert cli._stopped_waiting(parent, {2: at_gate}.__getitem__) == [
        {"workflow_id": 2, "step_id": 20, "state": "ok", "awaiting": "ready"}
    ]
    assert cli._stopped_waiting(parent, {2: running}.__getitem__) == []
    loop = {"id": 2, "status": "running", "steps": parent["steps"]}  # a child of itself
    assert cli._stopped_waiting(parent, {2: loop}.__getitem__) == []


def test_definition_files(tmp_path: Path) -> None:
    body = {"name": "kyc", "flow": {"start": {"tool": "echo", "done": True}}}
    path = tmp_path / "kyc.json"
    path.write_text(json.dumps(body))
    assert cli._definition_from_file(str(path)) == body
    # The name defaults to the file's stem; a wrapped body (def show --json) is unwrapped.
    unnamed = tmp_path / "fromstem.json"
    unnamed.write_text(json.dumps({"steps": [{"id": "a"}]}))
    assert cli._definition_from_file(str(unnamed))["name"] == "fromstem"
    wrapped = tmp_path / "shown.json"
    wrapped.write_text(json.dumps({"id": 1, "name": "kyc", "version": 2, "definition": body}))
    assert cli._definition_from_file(str(wrapped)) == body
    for bad in ([1, 2], {"name": "x"}, {"definition": "no"}):
        path.write_text(json.dumps(bad))
        with pytest.raises(cli.CLIError, match="expected a definition"):
            cli._definition_from_file(str(path))
    path.write_text("{nope")
    with pytest.raises(cli.CLIError, match="invalid JSON"):
        cli._definition_from_file(str(path))


def test_errors_name_every_problem() -> None:
    err = cli._http_error(422, {"error": "input does not match input_schema",
                                "error_code": "VALIDATION_ERROR",
                                "errors": ["/age: must be an integer",
                                           {"path": "/name", "message": "required"}]})  # fmt: skip
    assert str(err) == (
        "422: input does not match input_schema\n  - /age: must be an integer\n  - /name: required"
    )
    # Items already in the message are not repeated.
    assert str(cli._http_error(422, {"error": "a; b", "errors": ["a", "b"]})) == "422: a; b"
    assert str(cli._http_error(401, {"error": "no token"})) == "401: no token (set STEPD_TOKEN)"
    assert str(cli._http_error(502, "Bad Gateway")) == "502: Bad Gateway"


def test_the_parser_takes_every_subcommand() -> None:
    p = cli.build_parser()

    def parse(*argv: str) -> argparse.Namespace:
        return p.parse_args(list(argv))

    a = parse("def", "run", "kyc", "--input", '{"a": 1}', "--version", "2", "--wait",
              "--timeout", "5")  # fmt: skip
    assert (a.func, a.ref, a.input, a.version, a.wait, a.timeout) == (
        cli.cmd_def_run, "kyc", '{"a": 1}', 2, True, 5.0
    )  # fmt: skip
    assert parse("def", "list", "--status", "paused", "--tag", "t").func is cli.cmd_def_list
    assert parse("def", "diff", "kyc", "1", "3").v2 == 3
    assert parse("def", "rm", "kyc", "--force").force
    assert parse("def", "import", "f.json", "--mode", "upsert").mode == "upsert"
    assert parse("def", "import", "f.json").mode == "create"
    assert parse("def", "export", "-o", "out.json").ref is None
    assert parse("runs", "kyc").func is parse("def", "runs", "kyc").func is cli.cmd_def_runs
    for argv in (["def", "status", "kyc", "gone"], ["def", "run", "k", "--input", "{}",
                                                    "--input-file", "f"], ["def"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            p.parse_args(argv)
        assert exc.value.code == 2


# -- the real CLI against a real daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with cli_daemon(tmp_path_factory.mktemp("cli-defs"), ("rita", READER)) as d:
        yield d


def stepd(daemon: Daemon, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(daemon, *args, **{"timeout": 30, **kwargs})


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def write(tmp_path: Path, body: Any, name: str = "def.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return str(path)


def echo_def(name: str, msg: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow": {"start": {"tool": "echo", "args": {"msg": msg, "who": "{{input.who}}"},
                           "done": True}},
        **extra,
    }  # fmt: skip


def gate_def(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "flow": {
            "start": {"name": "approve", "tool": None, "args": {}, "next": "after"},
            "after": {"tool": "echo", "args": {"x": 1}, "done": True},
        },
    }


def sleep_def(name: str, seconds: float) -> dict[str, Any]:
    return {"name": name, "flow": {"start": {"tool": "sleep", "args": {"seconds": seconds},
                                             "done": True}}}  # fmt: skip


def get(daemon: Daemon, path: str) -> Any:
    with daemon.client() as c:
        resp = c.get(path)
        assert resp.status_code == 200, resp.text
        return resp.json()


def test_push_creates_then_versions_only_what_changed(daemon: Daemon, tmp_path: Path) -> None:
    path = write(tmp_path, echo_def("cli-push", tags=["kyc"]))
    assert ok(stepd(daemon, "def", "push", path)) == "created cli-push v1\n"
    assert ok(stepd(daemon, "def", "push", path)) == "unchanged: cli-push v1\n"
    path = write(tmp_path, echo_def("cli-push", "hello again", tags=["kyc"]))
    out = ok(stepd(daemon, "def", "push", path, "--summary", "Friendlier"))
    assert out == "updated cli-push v2\n"
    assert ok(stepd(daemon, "def", "push", path)) == "unchanged: cli-push v2\n"
    versions = get(daemon, "/api/workflows/cli-push/versions")["versions"]
    assert [(v["version"], v["change_summary"]) for v in versions][:1] == [(2, "Friendlier")]
    assert [v["version"] for v in versions] == [2, 1]
    wf = get(daemon, "/api/workflows/cli-push")
    assert wf["definition"]["flow"]["start"]["args"]["msg"] == "hello again"
    assert wf["tags"] == ["kyc"] and wf["created_by"] == "james"

    # The name defaults to the file's stem; stdin needs one in the file.
    stem = write(tmp_path, {"flow": echo_def("x")["flow"]}, name="cli-from-stem.json")
    assert ok(stepd(daemon, "def", "push", stem)) == "created cli-from-stem v1\n"
    r = stepd(daemon, "def", "push", "-", stdin=json.dumps({"flow": {}}))
    assert r.returncode == 1 and 'needs a "name"' in r.stderr
    # What `def show --definition` prints can be pushed back unchanged.
    shown = ok(stepd(daemon, "def", "show", "cli-push", "--definition"))
    assert ok(stepd(daemon, "def", "push", "-", stdin=shown)) == "unchanged: cli-push v2\n"

    # An invalid flow: the server's reason, exit 1, nothing created.
    bad = write(tmp_path, {"name": "cli-bad", "flow": {"start": {"tool": "nope", "done": True}}},
                name="bad.json")  # fmt: skip
    r = stepd(daemon, "def", "validate", bad)
    assert r.returncode == 1 and r.stdout.endswith("invalid\n"), r.stdout + r.stderr
    assert r.stdout.startswith("error: ") and "nope" in r.stdout, r.stdout
    assert ok(stepd(daemon, "def", "validate", path)) == "valid\n"
    r = stepd(daemon, "def", "push", bad)
    assert r.returncode == 1 and r.stderr.startswith("stepd: 422: "), r.stderr
    with daemon.client() as c:
        assert c.get("/api/workflows/cli-bad").status_code == 404


def test_list_show_diff_and_rollback(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-ver", tags=["t1", "t2"]))))
    two = echo_def("cli-ver", "changed", tags=["t1", "t2"])
    two["flow"]["start"]["next"] = "nap"
    del two["flow"]["start"]["done"]
    two["flow"]["nap"] = {"tool": "sleep", "args": {"seconds": 0}, "done": True}
    ok(stepd(daemon, "def", "push", write(tmp_path, two), "--summary", "Add a nap"))

    out = ok(stepd(daemon, "def", "list", "--tag", "t2"))
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "VERSION", "STATUS", "TAGS", "UPDATED"]
    row = next(line for line in lines if " cli-ver " in line)
    assert row.split()[1:5] == ["cli-ver", "v2", "active", "t1,t2"]
    assert TIME.search(row)
    listed = json.loads(ok(stepd(daemon, "def", "list", "--tag", "t2", "--json")))
    assert [w["name"] for w in listed["workflows"]] == ["cli-ver"] and listed["total"] == 1
    assert "cli-ver" not in ok(stepd(daemon, "def", "list", "--status", "paused"))

    out = ok(stepd(daemon, "def", "show", "cli-ver"))
    lines = out.splitlines()
    wf = get(daemon, "/api/workflows/cli-ver")
    assert lines[0] == f"definition {wf['id']}  cli-ver"
    assert re.search(r"^  version +v2$", out, re.M) and re.search(r"^  states +start, nap$", out,
                                                                   re.M)  # fmt: skip
    assert re.search(r"^  webhook +not deployed", out, re.M)
    table = lines[lines.index("") + 1 :]
    assert [r.split()[0] for r in table] == ["VERSION", "v2", "v1"]
    assert table[1].endswith("Add a nap") and table[2].endswith("Initial version")
    # By id as well as by name; --json is the API's JSON.
    assert ok(stepd(daemon, "def", "show", str(wf["id"]))) == out
    assert json.loads(ok(stepd(daemon, "def", "show", "cli-ver", "--json")))["id"] == wf["id"]
    v1 = json.loads(ok(stepd(daemon, "def", "show", "cli-ver", "--definition", "--version", "1")))
    assert v1 == get(daemon, "/api/workflows/cli-ver/versions/1")["definition"]

    out = ok(stepd(daemon, "def", "diff", "cli-ver", "1", "2"))
    summary, *ops = out.splitlines()
    api = get(daemon, "/api/workflows/cli-ver/diff?v1=1&v2=2")
    assert summary == api["summary"] and len(ops) == len(api["diff"]) > 0
    assert any(re.fullmatch(r"add +/flow/nap \{.*\}", op) for op in ops), ops
    assert any(re.fullmatch(r'replace +/flow/start/args/msg "changed"', op) for op in ops), ops

    assert ok(stepd(daemon, "def", "rollback", "cli-ver", "1")) == (
        "rolled back cli-ver to v1: now v3\n"
    )
    wf = get(daemon, "/api/workflows/cli-ver")
    assert wf["version"] == 3 and "nap" not in wf["definition"]["flow"]
    assert ok(stepd(daemon, "def", "rollback", "cli-ver", "1")) == (
        "unchanged: cli-ver v3 has v1's content already\n"
    )
    assert get(daemon, "/api/workflows/cli-ver/versions")["versions"][0]["change_summary"] == (
        "Rollback to version 1"
    )

    r = stepd(daemon, "def", "show", "cli-nothing")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 404: "), r.stderr


def test_run_starts_a_run_and_pins_a_version(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-run", "one"))))
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-run", "two"))))
    run_id = json.loads(ok(stepd(daemon, "def", "run", "cli-run", "--input", '{"who": "ann"}')))[
        "run_id"
    ]
    with daemon.client() as c:
        wf = wait_for(c, run_id, timeout=10)
    assert wf["status"] == "completed"
    assert (wf["definition_version"], wf["trigger"]) == (2, "manual")
    assert wf["output"] == {"msg": "two", "who": "ann"}

    inputs = write(tmp_path, {"who": "bob"}, name="in.json")
    out = ok(stepd(daemon, "def", "run", "cli-run", "--input-file", inputs, "--version", "1"))
    with daemon.client() as c:
        wf = wait_for(c, json.loads(out)["run_id"], timeout=10)
    assert wf["definition_version"] == 1 and wf["output"] == {"msg": "one", "who": "bob"}

    r = stepd(daemon, "def", "run", "cli-run", "--version", "1", "--input", '{"who": "cy"}',
              "--wait")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(': output {"msg":"one","who":"cy"}\n'), r.stdout

    r = stepd(daemon, "def", "run", "cli-run", "--input", "who=ann")
    assert r.returncode == 1 and "--input is not valid JSON" in r.stderr, r.stderr

    # `stepd runs REF` and `stepd def runs REF`: newest first.
    out = ok(stepd(daemon, "runs", "cli-run"))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["RUN", "VERSION", "STATUS", "TRIGGER"]
    assert [line.split()[:4] for line in lines[2:4]] == [
        [str(wf["id"]), "v1", "completed", "manual"], [str(run_id), "v2", "completed", "manual"]
    ]  # fmt: skip
    assert lines[1].split()[1:4] == ["v1", "completed", "execute"]
    assert ok(stepd(daemon, "def", "runs", "cli-run")) == out
    runs = json.loads(ok(stepd(daemon, "runs", "cli-run", "--json", "--status", "completed")))
    listed = runs["runs"] if isinstance(runs, dict) else runs
    assert {r["id"] for r in listed} >= {run_id, wf["id"]} and len(listed) == 3


def test_run_wait_exit_codes(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-wait"))))
    r = stepd(daemon, "def", "run", "cli-wait", "--input", '{"who": "cy"}', "--wait")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"run (\d+) completed(?: in \S+)?: output (.*)\n", r.stdout)
    assert m is not None, r.stdout
    assert json.loads(m[2]) == {"msg": "hello", "who": "cy"}
    r = stepd(daemon, "def", "run", "cli-wait", "--input", '{"who": "di"}', "--wait", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    run = json.loads(r.stdout)
    assert run["status"] == "completed" and run["output"] == {"msg": "hello", "who": "di"}
    assert run["trigger"] == "execute" and run["version"] == 1

    failing = sleep_def("cli-wait-fails", -1)
    ok(stepd(daemon, "def", "push", write(tmp_path, failing)))
    r = stepd(daemon, "def", "run", "cli-wait-fails", "--wait")
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.fullmatch(r"run \d+ failed(?: after \S+)?: .*non-negative.*\n", r.stdout), r.stdout

    ok(stepd(daemon, "def", "push", write(tmp_path, gate_def("cli-wait-gate"))))
    r = stepd(daemon, "def", "run", "cli-wait-gate", "--wait")
    assert r.returncode == 2, r.stdout + r.stderr
    m = re.fullmatch(r"run (\d+) waiting at gate '(\w+)' \(step (\d+)\): stepd ready (\d+)\n",
                     r.stdout)  # fmt: skip
    assert m is not None and m[3] == m[4] and m[2] in ("start", "approve"), r.stdout
    ok(stepd(daemon, "ready", m[3]))  # the command it names works
    with daemon.client() as c:
        assert wait_for(c, int(m[1]), timeout=10)["status"] == "completed"

    ok(stepd(daemon, "def", "push", write(tmp_path, sleep_def("cli-wait-slow", 10))))
    r = stepd(daemon, "def", "run", "cli-wait-slow", "--wait", "--timeout", "1")
    assert r.returncode == 3, r.stdout + r.stderr
    m = re.fullmatch(r"run (\d+) still running: stepd show \1\n", r.stdout)
    assert m is not None, r.stdout
    ok(stepd(daemon, "cancel", m[1]))


def test_run_wait_longer_than_the_servers_wait_follows_the_run(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Past the server's longest /execute wait (a 504), the CLI follows the run itself:
    here the server's wait is cut to 1 s to see it without waiting 300 s."""
    ok(stepd(daemon, "def", "push", write(tmp_path, sleep_def("cli-wait-long", 2))))
    monkeypatch.setenv("STEPD_URL", daemon.url)
    monkeypatch.setenv("STEPD_TOKEN", TOKEN)
    monkeypatch.setattr(cli, "EXECUTE_MAX", 1.0)
    assert cli.main(["def", "run", "cli-wait-long", "--wait"]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"run (\d+) completed in \S+: output \{\"slept\":2\}\n", out), out
    assert re.fullmatch(r"run \d+ still running; waiting...\n", err), err


def test_run_wait_names_a_gate_in_a_called_child(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, gate_def("cli-child-gate"))))
    call = {"call": {"workflow": "cli-child-gate"}, "done": True}
    parent = {"name": "cli-calls-gate", "flow": {"start": call}}
    ok(stepd(daemon, "def", "push", write(tmp_path, parent)))
    r = stepd(daemon, "def", "run", "cli-calls-gate", "--wait")
    assert r.returncode == 2, r.stdout + r.stderr
    m = re.fullmatch(r"run (\d+) waiting at gate '(\w+)' \(step (\d+) in child workflow (\d+)\): "
                     r"stepd ready (\d+)\n", r.stdout)  # fmt: skip
    assert m is not None and m[3] == m[5] and m[1] != m[4], r.stdout
    child = get(daemon, f"/api/workflow/{m[4]}")
    assert child["parent"]["workflow_id"] == int(m[1]) and child["trigger"] == "call"
    ok(stepd(daemon, "ready", m[3]))
    with daemon.client() as c:
        assert wait_for(c, int(m[1]), timeout=10)["status"] == "completed"


def test_run_wait_past_the_servers_wait_stops_at_a_gate(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The gate comes after the server's wait (cut to 1 s) ran out: found by following
    the run, with the same line and exit code as /execute's 202 gives."""
    body = {
        "name": "cli-late-gate",
        "flow": {
            "start": {"tool": "sleep", "args": {"seconds": 1.5}, "next": "approve"},
            "approve": {"tool": None, "args": {}, "next": "after"},
            "after": {"tool": "echo", "args": {"x": 1}, "done": True},
        },
    }
    ok(stepd(daemon, "def", "push", write(tmp_path, body)))
    monkeypatch.setenv("STEPD_URL", daemon.url)
    monkeypatch.setenv("STEPD_TOKEN", TOKEN)
    monkeypatch.setattr(cli, "EXECUTE_MAX", 1.0)
    assert cli.main(["def", "run", "cli-late-gate", "--wait"]) == 2
    out, err = capsys.readouterr()
    assert re.fullmatch(r"run \d+ still running; waiting...\n", err), err  # it was a 504
    m = re.fullmatch(r"run (\d+) waiting at gate 'approve' \(step (\d+)\): stepd ready (\d+)\n",
                     out)  # fmt: skip
    assert m is not None and m[2] == m[3], out
    ok(stepd(daemon, "ready", m[2]))
    with daemon.client() as c:
        assert wait_for(c, int(m[1]), timeout=10)["status"] == "completed"


def test_input_schema_problems_and_paused_definitions(daemon: Daemon, tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["who"],
              "properties": {"who": {"type": "string"}, "age": {"type": "integer"}}}  # fmt: skip
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-schema", input_schema=schema))))
    r = stepd(daemon, "def", "run", "cli-schema", "--input", '{"age": "old"}', "--wait")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 422: "), r.stderr
    r = stepd(daemon, "def", "run", "cli-schema", "--input", '{"age": "old"}')
    assert r.returncode == 1 and r.stderr.startswith("stepd: 422: "), r.stderr

    assert ok(stepd(daemon, "def", "status", "cli-schema", "paused")) == "cli-schema: paused\n"
    r = stepd(daemon, "def", "run", "cli-schema", "--input", '{"who": "x"}')
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr
    r = stepd(daemon, "def", "run", "cli-schema", "--input", '{"who": "x"}', "--wait")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr
    assert "cli-schema" in ok(stepd(daemon, "def", "list", "--status", "paused"))
    assert ok(stepd(daemon, "def", "status", "cli-schema", "active")) == "cli-schema: active\n"
    r = stepd(daemon, "def", "run", "cli-schema", "--input", '{"who": "x"}', "--wait")
    assert r.returncode == 0, r.stderr


def test_rm_refuses_while_runs_are_active_unless_forced(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, sleep_def("cli-rm", 30))))
    run_id = json.loads(ok(stepd(daemon, "def", "run", "cli-rm")))["run_id"]
    r = stepd(daemon, "def", "rm", "cli-rm")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr
    assert "(--force deletes it anyway)" in r.stderr
    assert ok(stepd(daemon, "def", "rm", "cli-rm", "--force")) == "deleted cli-rm\n"
    with daemon.client() as c:
        assert c.get("/api/workflows/cli-rm").status_code == 404
        c.delete(f"/api/workflow/{run_id}")  # whatever --force left of the run
    r = stepd(daemon, "def", "rm", "cli-rm")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 404: "), r.stderr


def test_deploy_arm_and_undeploy(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-hook"))))
    out = ok(stepd(daemon, "def", "deploy", "cli-hook"))
    lines = out.splitlines()
    assert lines[0] == "deployed cli-hook"
    wf = get(daemon, "/api/workflows/cli-hook")
    hook = wf["webhook"]
    assert re.fullmatch(rf" +url +{re.escape(daemon.url + hook['url'])}", lines[1]), lines
    assert lines[2].split() == ["id", hook["webhook_id"]]
    assert lines[3].split() == ["secret", hook["webhook_secret"]]
    out = ok(stepd(daemon, "def", "show", "cli-hook"))
    assert re.search(r"^  webhook +single-use, not armed \(stepd def arm cli-hook\)$", out, re.M)
    assert hook["webhook_secret"] not in out

    out = ok(stepd(daemon, "def", "arm", "cli-hook"))
    assert re.fullmatch(rf"armed cli-hook: its webhook takes one call until {TIME.pattern}\n", out)
    out = ok(stepd(daemon, "def", "show", "cli-hook"))
    assert re.search(rf"^  webhook +single-use, armed until {TIME.pattern}$", out, re.M), out

    assert ok(stepd(daemon, "def", "undeploy", "cli-hook")) == "undeployed cli-hook\n"
    assert re.search(r"^  webhook +not deployed", ok(stepd(daemon, "def", "show", "cli-hook")),
                     re.M)  # fmt: skip
    r = stepd(daemon, "def", "arm", "cli-hook")
    assert r.returncode == 1 and r.stderr.startswith("stepd: 409: "), r.stderr


def test_export_and_import(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-exp", "one"))))
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-exp", "two"))))
    out_file = tmp_path / "one.json"
    r = stepd(daemon, "def", "export", "cli-exp", "-o", str(out_file))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert r.stderr == f"exported 1 definition to {out_file}\n"
    doc = json.loads(out_file.read_text())
    assert doc["stepd_export"] == 1 and [w["name"] for w in doc["workflows"]] == ["cli-exp"]
    assert [v["version"] for v in doc["workflows"][0]["versions"]] in ([1, 2], [2, 1])
    everything = json.loads(ok(stepd(daemon, "def", "export")))
    assert "cli-exp" in [w["name"] for w in everything["workflows"]]

    # create mode skips a name that exists; after rm it creates it with its versions.
    assert ok(stepd(daemon, "def", "import", str(out_file))).startswith("skipped cli-exp")
    ok(stepd(daemon, "def", "rm", "cli-exp"))
    assert ok(stepd(daemon, "def", "import", str(out_file))) == "created cli-exp\n"
    assert (
        get(daemon, "/api/workflows/cli-exp")["definition"]["flow"]["start"]["args"]["msg"] == "two"
    )
    # upsert adds the export's latest definition as a new version when it differs.
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-exp", "three"))))
    out = ok(stepd(daemon, "def", "import", str(out_file), "--mode", "upsert"))
    assert out == "updated cli-exp\n"
    wf = get(daemon, "/api/workflows/cli-exp")
    assert wf["definition"]["flow"]["start"]["args"]["msg"] == "two"

    # Anything invalid: every problem listed, nothing written.
    doc["workflows"][0]["name"] = "cli-imp-bad"
    doc["workflows"][0]["versions"][-1]["definition"]["flow"] = {"start": {"tool": "nope"}}
    bad = write(tmp_path, doc, name="bad.json")
    r = stepd(daemon, "def", "import", bad)
    assert r.returncode == 1 and r.stderr.startswith("stepd: 422: "), r.stderr
    with daemon.client() as c:
        assert c.get("/api/workflows/cli-imp-bad").status_code == 404
    r = stepd(daemon, "def", "import", write(tmp_path, [1], name="list.json"))
    assert r.returncode == 1 and "expected an export document" in r.stderr


def test_read_only_tokens_read_but_do_not_write(daemon: Daemon, tmp_path: Path) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-ro"))))
    assert "cli-ro" in ok(stepd(daemon, "def", "list", token=READER))
    ok(stepd(daemon, "def", "show", "cli-ro", token=READER))
    r = stepd(daemon, "def", "push", write(tmp_path, echo_def("cli-ro", "x")), token=READER)
    assert r.returncode == 1 and r.stderr.startswith("stepd: 403: "), r.stderr
    r = stepd(daemon, "def", "run", "cli-ro", token=READER)
    assert r.returncode == 1 and r.stderr.startswith("stepd: 403: "), r.stderr
    r = stepd(daemon, "def", "list", token="wrong")
    assert r.returncode == 1 and r.stderr.rstrip().endswith("(set STEPD_TOKEN)"), r.stderr


def test_def_help_is_readable() -> None:
    r = subprocess.run([*stepd_command(), "def", "--help"], capture_output=True, text=True,
                       timeout=20, env=clean_env(COLUMNS="100"))  # fmt: skip
    assert r.returncode == 0
    for command in ("list", "show", "push", "validate", "diff", "rollback", "run", "runs",
                    "status", "rm", "deploy", "undeploy", "arm", "export", "import"):  # fmt: skip
        assert re.search(rf"^    {command} +\S", r.stdout, re.M), command
    assert "REF is a definition's name or its id" in r.stdout
    assert re.search(r"^  3  --timeout ran out", r.stdout, re.M)
    r = subprocess.run([*stepd_command(), "--help"], capture_output=True, text=True, timeout=20,
                       env=clean_env())  # fmt: skip
    assert re.search(r"^    def +saved definitions", r.stdout, re.M), r.stdout
    assert re.search(r"^    runs ", r.stdout, re.M)
