"""`stepd schedule ...`: cron schedules from the command line. The formatting alone on the
API's JSON shapes, then the real console script against a real `stepd serve` over
loopback HTTP: what a person reads, what a script parses, and the exit codes."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon import cli
from tests.process_helpers import (
    Daemon,
    clean_env,
    cli_daemon,
    run_cli,
    stepd_command,
    wait_for,
)

READER = "tok-cli-sched-reader"
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
FIRE = r"\d{4}-\d\d-\d\d \d\d:\d\d(?::\d\d)? [+-]\d\d:\d\d"  # 2026-12-04 09:00 -05:00
DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"


# -- formatting, on the API's shapes -------------------------------------------------------


def schedule(**over: Any) -> dict[str, Any]:
    s = {
        "schedule_id": 1733239000000, "workflow_id": 1733200000000, "workflow_name": "kyc",
        "cron_expression": "0 9 * * 1-5", "timezone": "America/New_York",
        "description": "At 09:00 on Monday through Friday", "input_data": {"dataset": "daily"},
        "overlap": "skip", "catchup_window": 60, "paused": False,
        "next_run": "2026-12-04T09:00:00-05:00",
        "next_runs": ["2026-12-04T09:00:00-05:00", "2026-12-07T09:00:00-05:00",
                      "2026-12-08T09:00:00-05:00", "2026-12-09T09:00:00-05:00",
                      "2026-12-10T09:00:00-05:00"],
        "last_fired_at": "2026-12-03T09:00:00-05:00", "buffered": 0, "created_by": "admin",
        "created_at": "2026-12-03T15:00:00.123Z", "updated_at": "2026-12-03T15:05:00.000Z",
    }  # fmt: skip
    return s | over


TICKS = [
    {"id": 12, "fire_time": "2026-12-03T10:17:05-05:00", "kind": "trigger", "outcome": "skipped",
     "run_id": None, "reason": "run 99 of this schedule is still running (overlap skip)",
     "recorded_at": "2026-12-03T15:17:05.001Z"},
    {"id": 11, "fire_time": "2026-12-03T09:00:00-05:00", "kind": "cron", "outcome": "fired",
     "run_id": 99, "reason": None, "recorded_at": "2026-12-03T14:00:00.010Z"},
]  # fmt: skip


def test_fire_times_stay_in_the_schedules_zone() -> None:
    assert cli._fire_time(None) == "-"
    assert cli._fire_time("") == "-"
    assert cli._fire_time("not a time") == "not a time"
    assert cli._fire_time("2026-12-04T09:00:00-05:00") == "2026-12-04 09:00 -05:00"
    assert cli._fire_time("2026-12-04T09:00:00-05:00", weekday=True) == (
        "Fri 2026-12-04 09:00 -05:00"
    )
    assert cli._fire_time("2026-03-08T03:00:00+05:45") == "2026-03-08 03:00 +05:45"
    assert cli._fire_time("2026-12-03T15:17:05Z") == "2026-12-03 15:17:05 +00:00"
    assert cli._fire_time("2026-12-03T15:17:05.250+00:00") == "2026-12-03 15:17:05 +00:00"


def test_schedule_list_table() -> None:
    paused = schedule(schedule_id=1733239000001, workflow_name="a longer name", paused=True,
                      next_run=None, timezone="UTC", cron_expression="@daily",
                      description="At 00:00", overlap="buffer_all")  # fmt: skip
    lines = cli._render_schedule_list({"schedules": [schedule(), paused], "total": 5})
    assert lines[0].split() == ["ID", "DEFINITION", "CRON", "TIMEZONE", "DESCRIPTION", "NEXT",
                                "RUN", "OVERLAP", "PAUSED"]  # fmt: skip
    cells = [c.strip() for c in lines[1].split("  ") if c.strip()]
    assert cells == ["1733239000000", "kyc", "0 9 * * 1-5", "America/New_York",
                     "At 09:00 on Monday through Friday", "2026-12-04 09:00 -05:00", "skip",
                     "no"]  # fmt: skip
    cells = [c.strip() for c in lines[2].split("  ") if c.strip()]
    assert cells == ["1733239000001", "a longer name", "@daily", "UTC", "At 00:00", "-",
                     "buffer_all", "yes"]  # fmt: skip
    # Columns line up: each row's cron starts where the header's CRON does.
    col = lines[0].index("CRON")
    assert lines[1][col:].startswith("0 9 ") and lines[2][col:].startswith("@daily")
    assert lines[-1] == "(1-2 of 5; --offset 2 for more)"
    assert cli._render_schedule_list({"schedules": [], "total": 0}) == ["no schedules"]
    assert cli._render_schedule_list({"schedules": [], "total": 3}, offset=10) == [
        "no schedules here (3 in all)"
    ]
    assert len(cli._render_schedule_list({"schedules": [schedule()], "total": 1})) == 2


def test_schedule_show_header_next_runs_and_ticks() -> None:
    lines = cli._render_schedule(schedule(ticks=TICKS))
    assert lines[0] == "schedule 1733239000000  kyc"
    header = "\n".join(lines[: lines.index("")])
    for pattern in (r"^  definition +kyc \(1733200000000\)$",
                    r"^  cron +0 9 \* \* 1-5  \(At 09:00 on Monday through Friday\)$",
                    r"^  timezone +America/New_York$", r'^  input +\{"dataset":"daily"\}$',
                    r"^  overlap +skip$", r"^  catch-up +60 s$", r"^  paused +no$",
                    r"^  next runs +Fri 2026-12-04 09:00 -05:00$",
                    r"^ +Mon 2026-12-07 09:00 -05:00$", r"^ +Thu 2026-12-10 09:00 -05:00$",
                    r"^  last fired +2026-12-03 09:00 -05:00$",
                    rf"^  created +{TIME.pattern} by admin$",
                    rf"^  updated +{TIME.pattern}$"):  # fmt: skip
        assert re.search(pattern, header, re.M), (pattern, header)
    assert "buffered" not in header  # only when some wait
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["TICK", "FIRE", "TIME", "KIND", "OUTCOME", "RUN", "REASON"]
    assert table[1].split()[:6] == ["12", "2026-12-03", "10:17:05", "-05:00", "trigger", "skipped"]
    assert table[1].endswith("-    run 99 of this schedule is still running (overlap skip)")
    assert table[2].split() == ["11", "2026-12-03", "09:00", "-05:00", "cron", "fired", "99"]
    assert len(table) == 3

    paused = cli._render_schedule(schedule(paused=True, next_run=None, buffered=2, ticks=[]))
    text = "\n".join(paused)
    assert re.search(r"^  paused +yes \(stepd schedule resume 1733239000000\)$", text, re.M)
    assert re.search(r"^  once resumed +Fri 2026-12-04 09:00 -05:00$", text, re.M)
    assert re.search(r"^  buffered +2 ", text, re.M)
    assert paused[-1] == "no ticks yet"
    bare = cli._render_schedule({"schedule_id": 5, "cron_expression": "@daily"})
    assert re.search(r"^  next runs +none$", "\n".join(bare), re.M)
    more = cli._render_ticks(TICKS, total=57)
    assert more[-1] == "(2 most recent of 57; --ticks N for more)"


def test_added_trigger_and_backfill_lines() -> None:
    lines = cli._render_added(1733239000000, schedule(), "kyc")
    assert lines[0] == (
        "added schedule 1733239000000 to kyc: 0 9 * * 1-5 America/New_York "
        "(At 09:00 on Monday through Friday)"
    )
    assert lines[1] == "next runs:"
    assert lines[2:] == [f"  {cli._fire_time(t, weekday=True)}" for t in schedule()["next_runs"]]
    paused = cli._render_added(7, schedule(paused=True, next_run=None), "kyc")
    assert paused[1] == "paused: stepd schedule resume 7; then it fires at"

    line = cli._trigger_line
    assert line({"outcome": "fired", "run_id": 9, "reason": None}) == "fired: run 9 (stepd show 9)"
    assert line({"outcome": "buffered", "run_id": None, "reason": None}) == (
        "buffered: it starts when the running one ends"
    )
    assert line({"outcome": "buffered", "run_id": None, "reason": "run 3 is running"}) == (
        "buffered: run 3 is running"
    )
    assert line({"outcome": "skipped", "run_id": None, "reason": "run 3 ... (overlap skip)"}) == (
        "skipped: run 3 ... (overlap skip)"
    )

    answer = {"fire_times": 4, "fired": 1, "buffered": 1, "skipped": 2,
              "ticks": [{"outcome": "fired"}, {"outcome": "buffered"},
                        {"outcome": "skipped", "reason": "already backfilled"},
                        {"outcome": "skipped", "reason": "already backfilled"}]}  # fmt: skip
    assert cli._render_backfill(answer) == [
        "4 fire times: 1 fired, 1 buffered, 2 skipped",
        "  skipped 2: already backfilled",
    ]
    assert cli._render_backfill({"fire_times": 1, "fired": 1, "buffered": 0, "skipped": 0}) == [
        "1 fire time: 1 fired, 0 buffered, 0 skipped"
    ]


def test_schedule_input(tmp_path: Path) -> None:
    assert cli._schedule_input(None) == {}
    assert cli._schedule_input('{"a": 1}') == {"a": 1}
    path = tmp_path / "in.json"
    path.write_text('{"b": [1, 2]}')
    assert cli._schedule_input(f"@{path}") == {"b": [1, 2]}
    with pytest.raises(cli.CLIError, match="--input is not valid JSON"):
        cli._schedule_input("a=1")
    with pytest.raises(cli.CLIError, match="--input must be a JSON object"):
        cli._schedule_input("[1]")
    with pytest.raises(cli.CLIError, match="cannot read"):
        cli._schedule_input(f"@{tmp_path / 'missing.json'}")


def test_the_parser_takes_every_schedule_subcommand() -> None:
    p = cli.build_parser()

    def parse(*argv: str) -> argparse.Namespace:
        return p.parse_args(list(argv))

    a = parse("schedule", "add", "kyc", "0 9 * * 1-5", "--tz", "Europe/Paris", "--input",
              "@in.json", "--overlap", "buffer_one", "--catchup", "0", "--paused")  # fmt: skip
    assert (a.func, a.ref, a.cron, a.tz, a.input, a.overlap, a.catchup, a.paused) == (
        cli.cmd_schedule_add, "kyc", "0 9 * * 1-5", "Europe/Paris", "@in.json", "buffer_one",
        0, True
    )  # fmt: skip
    assert parse("schedule", "list").ref is None
    assert parse("schedule", "list", "kyc", "--json").ref == "kyc"
    assert parse("schedule", "show", "12", "--ticks", "50").ticks == 50
    assert parse("schedule", "pause", "12").paused is True
    assert parse("schedule", "resume", "12").paused is False
    assert parse("schedule", "trigger", "12").func is cli.cmd_schedule_trigger
    b = parse("schedule", "backfill", "12", "--start", "2026-12-01T00:00:00Z", "--end",
              "2026-12-02T00:00:00Z")  # fmt: skip
    assert (b.sid, b.start, b.end, b.overlap) == (
        12, "2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z", None
    )  # fmt: skip
    assert parse("schedule", "rm", "12").func is cli.cmd_schedule_rm
    for argv in (["schedule"], ["schedule", "show", "abc"], ["schedule", "add", "kyc"],
                 ["schedule", "add", "k", "@daily", "--overlap", "sometimes"],
                 ["schedule", "backfill", "12", "--start", "2026-12-01T00:00:00Z"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            p.parse_args(argv)
        assert exc.value.code == 2


# -- the real CLI against a real daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with cli_daemon(tmp_path_factory.mktemp("cli-sched"), ("rita", READER)) as d:
        yield d


def stepd(daemon: Daemon, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(daemon, *args, **{"timeout": 30, **kwargs})


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def fails(r: subprocess.CompletedProcess[str], status: int) -> str:
    """A one-line `stepd: STATUS: ...` on stderr and exit 1; the line."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(f"stepd: {status}: "), r.stderr
    assert r.stdout == "", r.stdout
    return r.stderr


def write(tmp_path: Path, body: Any, name: str = "def.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return str(path)


def push(daemon: Daemon, tmp_path: Path, body: dict[str, Any]) -> None:
    ok(stepd(daemon, "def", "push", write(tmp_path, body, name=f"{body['name']}.json")))


def echo_def(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow": {"start": {"tool": "echo", "args": {"who": "{{input.who}}"}, "done": True}},
        **extra,
    }


def gate_def(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "flow": {
            "start": {"name": "approve", "tool": None, "args": {}, "next": "after"},
            "after": {"tool": "echo", "args": {"x": 1}, "done": True},
        },
    }


def get(daemon: Daemon, path: str) -> Any:
    with daemon.client() as c:
        resp = c.get(path)
        assert resp.status_code == 200, resp.text
        return resp.json()


def status_of(daemon: Daemon, path: str) -> int:
    with daemon.client() as c:
        return c.get(path).status_code


def add(daemon: Daemon, *args: str) -> int:
    """`stepd schedule add ...`: the new schedule's id."""
    out = ok(stepd(daemon, "schedule", "add", *args))
    m = re.match(r"added schedule (\d+) to ", out)
    assert m is not None, out
    return int(m[1])


def test_add_list_show_pause_resume_and_rm(daemon: Daemon, tmp_path: Path) -> None:
    push(daemon, tmp_path, echo_def("cs-kyc"))
    out = ok(stepd(daemon, "schedule", "add", "cs-kyc", "0 9 * * 1-5", "--tz",
                   "America/New_York", "--input", '{"who": "ann"}'))  # fmt: skip
    head, next_label, *runs = out.splitlines()
    m = re.fullmatch(r"added schedule (\d+) to cs-kyc: 0 9 \* \* 1-5 America/New_York \((.+)\)",
                     head)  # fmt: skip
    assert m is not None, out
    sid = int(m[1])
    api = get(daemon, f"/api/workflows/schedules/{sid}")
    assert api["description"] == m[2] and api["workflow_name"] == "cs-kyc"
    assert (api["timezone"], api["input_data"], api["overlap"]) == (
        "America/New_York", {"who": "ann"}, "skip"
    )  # fmt: skip
    assert api["paused"] is False and api["created_by"] == "james"
    assert next_label == "next runs:"
    assert len(runs) == 5
    for line, when in zip(runs, api["next_runs"], strict=True):
        assert re.fullmatch(rf"  (Mon|Tue|Wed|Thu|Fri) {FIRE}", line), line
        assert re.search(r" 09:00 -0[45]:00$", line), line  # 9 o'clock in New York
        assert line == f"  {cli._fire_time(when, weekday=True)}"

    # A definition's schedules, and all of them.
    out = ok(stepd(daemon, "schedule", "list", "cs-kyc"))
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "DEFINITION", "CRON", "TIMEZONE", "DESCRIPTION", "NEXT",
                                "RUN", "OVERLAP", "PAUSED"]  # fmt: skip
    assert len(lines) == 2
    cells = [c.strip() for c in lines[1].split("  ") if c.strip()]
    assert cells == [str(sid), "cs-kyc", "0 9 * * 1-5", "America/New_York", api["description"],
                     cli._fire_time(api["next_run"]), "skip", "no"]  # fmt: skip
    assert any(
        line.startswith(f"{sid} ") for line in ok(stepd(daemon, "schedule", "list")).splitlines()
    )
    listed = json.loads(ok(stepd(daemon, "schedule", "list", "cs-kyc", "--json")))
    assert [s["schedule_id"] for s in listed["schedules"]] == [sid] and listed["total"] == 1
    wf_id = get(daemon, "/api/workflows/cs-kyc")["id"]
    assert ok(stepd(daemon, "schedule", "list", str(wf_id))) == out  # by id as well as by name

    out = ok(stepd(daemon, "schedule", "show", str(sid)))
    lines = out.splitlines()
    assert lines[0] == f"schedule {sid}  cs-kyc"
    header = "\n".join(lines[: lines.index("")])
    for pattern in (rf"^  definition +cs-kyc \({wf_id}\)$", r"^  timezone +America/New_York$",
                    r'^  input +\{"who":"ann"\}$', r"^  overlap +skip$", r"^  catch-up +60 s$",
                    r"^  paused +no$", rf"^  next runs +{DAY} {FIRE}$",
                    r"^  last fired +-$", rf"^  created +{TIME.pattern} by james$"):  # fmt: skip
        assert re.search(pattern, header, re.M), (pattern, header)
    assert lines[-1] == "no ticks yet"
    shown = json.loads(ok(stepd(daemon, "schedule", "show", str(sid), "--json")))
    assert shown["schedule_id"] == sid and shown["ticks"] == []

    assert ok(stepd(daemon, "schedule", "pause", str(sid))) == f"paused schedule {sid} (cs-kyc)\n"
    api = get(daemon, f"/api/workflows/schedules/{sid}")
    assert api["paused"] is True and api["next_run"] is None
    row = ok(stepd(daemon, "schedule", "list", "cs-kyc")).splitlines()[1]
    assert row.split()[-3:] == ["-", "skip", "yes"], row
    out = ok(stepd(daemon, "schedule", "show", str(sid)))
    assert re.search(rf"^  paused +yes \(stepd schedule resume {sid}\)$", out, re.M), out
    assert re.search(rf"^  once resumed +{DAY} {FIRE}$", out, re.M), out

    out = ok(stepd(daemon, "schedule", "resume", str(sid)))
    api = get(daemon, f"/api/workflows/schedules/{sid}")
    assert api["paused"] is False and api["next_run"] is not None
    assert out == f"resumed schedule {sid} (cs-kyc): next run {cli._fire_time(api['next_run'])}\n"

    assert ok(stepd(daemon, "schedule", "rm", str(sid))) == f"deleted schedule {sid}\n"
    assert status_of(daemon, f"/api/workflows/schedules/{sid}") == 404
    for argv in (["show"], ["rm"], ["pause"], ["resume"], ["trigger"]):
        fails(stepd(daemon, "schedule", *argv, str(sid)), 404)
    assert ok(stepd(daemon, "schedule", "list", "cs-kyc")) == "no schedules\n"


def test_add_options_and_what_the_server_refuses(daemon: Daemon, tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["who"], "properties": {"who": {"type": "string"}}}
    push(daemon, tmp_path, echo_def("cs-opts", input_schema=schema))
    inputs = write(tmp_path, {"who": "bob"}, name="in.json")
    out = ok(stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--input", f"@{inputs}",
                   "--overlap", "allow_all", "--catchup", "0", "--paused"))  # fmt: skip
    head, paused, *runs = out.splitlines()
    sid = int(re.fullmatch(r"added schedule (\d+) to cs-opts: @daily UTC \(.+\)", head)[1])  # type: ignore[index]
    assert paused == f"paused: stepd schedule resume {sid}; then it fires at"
    assert len(runs) == 5 and all(re.fullmatch(rf"  {DAY} \S+ 00:00 \+00:00", r) for r in runs)
    api = get(daemon, f"/api/workflows/schedules/{sid}")
    assert (api["input_data"], api["overlap"], api["catchup_window"], api["paused"]) == (
        {"who": "bob"}, "allow_all", 0, True
    )  # fmt: skip
    assert api["timezone"] == "UTC"
    added = json.loads(ok(stepd(daemon, "schedule", "add", "cs-opts", "*/5 * * * *", "--paused",
                                "--input", '{"who": "cy"}', "--json")))  # fmt: skip
    assert added["schedule"]["schedule_id"] == added["schedule_id"]
    assert added["schedule"]["cron_expression"] == "*/5 * * * *"
    r = stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--paused", "--input", "@-",
              stdin='{"who": "di"}')  # fmt: skip
    sid_stdin = int(re.match(r"added schedule (\d+)", ok(r))[1])  # type: ignore[index]
    assert get(daemon, f"/api/workflows/schedules/{sid_stdin}")["input_data"] == {"who": "di"}

    # The server's refusals: one `stepd: STATUS: ...` line and exit 1; nothing added.
    before = get(daemon, "/api/workflows/cs-opts/schedules")["total"]
    fails(stepd(daemon, "schedule", "add", "cs-opts", "61 * * * *"), 422)
    fails(stepd(daemon, "schedule", "add", "cs-opts", "0 9 * *"), 422)
    fails(stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--tz", "Mars/Olympus"), 422)
    fails(stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--input", '{"who": 5}'), 422)
    fails(stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--catchup", "-1"), 422)
    fails(stepd(daemon, "schedule", "add", "cs-nothing", "@daily"), 404)
    assert get(daemon, "/api/workflows/cs-opts/schedules")["total"] == before
    fails(stepd(daemon, "schedule", "list", "cs-nothing"), 404)
    # What the command line itself refuses.
    r = stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--input", "who=x")
    assert r.returncode == 1 and r.stderr.startswith("stepd: --input is not valid JSON"), r.stderr
    r = stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--input", "[1]")
    assert r.returncode == 1 and "--input must be a JSON object" in r.stderr, r.stderr
    r = stepd(daemon, "schedule", "add", "cs-opts", "@daily", "--overlap", "sometimes")
    assert r.returncode == 2 and "invalid choice" in r.stderr, r.stderr
    r = stepd(daemon, "schedule", "show", "cs-opts")
    assert r.returncode == 2 and "invalid int value" in r.stderr, r.stderr


def test_trigger_obeys_overlap(daemon: Daemon, tmp_path: Path) -> None:
    """A run waiting at a gate is still going: `skip` skips the next trigger with the
    server's reason, `buffer_one` buffers one and skips the next; a paused schedule
    fires when triggered."""
    push(daemon, tmp_path, gate_def("cs-gate"))
    sid = add(daemon, "cs-gate", "0 0 1 1 *", "--paused")
    out = ok(stepd(daemon, "schedule", "trigger", str(sid)))
    m = re.fullmatch(r"fired: run (\d+) \(stepd show \1\)\n", out)
    assert m is not None, out
    run_id = int(m[1])
    wf = get(daemon, f"/api/workflow/{run_id}")
    assert wf["trigger"] == "schedule" and wf["schedule"]["schedule_id"] == sid

    out = ok(stepd(daemon, "schedule", "trigger", str(sid)))
    assert out.startswith("skipped: ") and "overlap skip" in out, out
    answer = json.loads(ok(stepd(daemon, "schedule", "trigger", str(sid), "--json")))
    assert answer["outcome"] == "skipped" and answer["run_id"] is None

    out = ok(stepd(daemon, "schedule", "show", str(sid)))
    table = out.splitlines()[out.splitlines().index("") + 1 :]
    assert table[0].split() == ["TICK", "FIRE", "TIME", "KIND", "OUTCOME", "RUN", "REASON"]
    rows = [line.split() for line in table[1:]]
    assert [r[4:7] for r in rows] == [["trigger", "skipped", "-"], ["trigger", "skipped", "-"],
                                      ["trigger", "fired", str(run_id)]]  # fmt: skip
    assert "overlap skip" in table[1]

    ok(stepd(daemon, "schedule", "rm", str(sid)))
    sid = add(daemon, "cs-gate", "0 0 1 1 *", "--paused", "--overlap", "buffer_one")
    first = ok(stepd(daemon, "schedule", "trigger", str(sid)))
    first_run = int(re.fullmatch(r"fired: run (\d+) \(stepd show \1\)\n", first)[1])  # type: ignore[index]
    out = ok(stepd(daemon, "schedule", "trigger", str(sid)))
    assert out.startswith("buffered"), out
    out = ok(stepd(daemon, "schedule", "trigger", str(sid)))
    assert out.startswith("skipped: ") and "buffer is full" in out, out
    assert re.search(r"^  buffered +1 ", ok(stepd(daemon, "schedule", "show", str(sid))), re.M)

    # Released, the first run ends and the buffered one starts (waiting at its own gate).
    gate = next(s for s in get(daemon, f"/api/workflow/{first_run}")["steps"]
                if s.get("awaiting") == "ready")  # fmt: skip
    ok(stepd(daemon, "ready", str(gate["id"])))
    with daemon.client() as c:
        assert wait_for(c, first_run, timeout=10)["status"] == "completed"
    ticks: list[dict[str, Any]] = []
    for _ in range(100):
        ticks = get(daemon, f"/api/workflows/schedules/{sid}")["ticks"]
        if any(t["run_id"] not in (None, first_run) for t in ticks):
            break
        time.sleep(0.1)
    second = next(t for t in ticks if t["run_id"] not in (None, first_run))
    assert second["outcome"] == "fired"
    rows = [r.split() for r in ok(stepd(daemon, "schedule", "show", str(sid))).splitlines()]
    assert [str(second["id"]), "fired", str(second["run_id"])] in [
        [r[0], *r[5:7]] for r in rows if len(r) >= 7
    ], rows
    for run in (first_run, second["run_id"]):
        stepd(daemon, "cancel", str(run))


def days_ago(n: int, hour: int = 0, minute: int = 0) -> str:
    day = datetime.now(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return (day - timedelta(days=n)).isoformat()


def test_backfill_counts_and_refusals(daemon: Daemon, tmp_path: Path) -> None:
    push(daemon, tmp_path, echo_def("cs-back"))
    # Daily at 04:15 UTC: the window from five days ago to two days ago holds four.
    sid = add(daemon, "cs-back", "15 4 * * *", "--input", '{"who": "eve"}')
    start, end = days_ago(5), days_ago(2, 23)
    out = ok(stepd(daemon, "schedule", "backfill", str(sid), "--start", start, "--end", end,
                   "--overlap", "allow_all"))  # fmt: skip
    assert out == "4 fire times: 4 fired, 0 buffered, 0 skipped\n", out
    ticks = get(daemon, f"/api/workflows/schedules/{sid}/ticks?outcome=fired")["ticks"]
    backfilled = sorted((t for t in ticks if t["kind"] == "backfill"), key=lambda t: t["fire_time"])
    assert [t["fire_time"] for t in backfilled] == [days_ago(n, 4, 15) for n in (5, 4, 3, 2)]
    with daemon.client() as c:
        for t in backfilled:
            wf = wait_for(c, t["run_id"], timeout=10)
            assert wf["status"] == "completed" and wf["output"] == {"who": "eve"}
            assert wf["trigger"] == "schedule"

    # The same window again: every fire time was backfilled already (default buffer_all).
    out = ok(stepd(daemon, "schedule", "backfill", str(sid), "--start", start, "--end", end))
    lines = out.splitlines()
    assert lines[0] == "4 fire times: 0 fired, 0 buffered, 4 skipped", out
    assert len(lines) == 2 and re.fullmatch(r"  skipped 4: .*already backfilled.*", lines[1]), out
    answer = json.loads(ok(stepd(daemon, "schedule", "backfill", str(sid), "--start", start,
                                 "--end", end, "--json")))  # fmt: skip
    assert answer["fire_times"] == 4 and answer["skipped"] == 4 and len(answer["ticks"]) == 4

    # Refused: an end in the future, a start after the end, no offset, too many fire times.
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    fails(stepd(daemon, "schedule", "backfill", str(sid), "--start", start, "--end", future), 422)
    fails(stepd(daemon, "schedule", "backfill", str(sid), "--start", end, "--end", start), 422)
    fails(stepd(daemon, "schedule", "backfill", str(sid), "--start", start[:19], "--end", end),
          422)  # fmt: skip
    every = add(daemon, "cs-back", "* 4 * * *")  # 60 a day: 20 days hold more than 1,000

    fails(stepd(daemon, "schedule", "backfill", str(every), "--start", days_ago(21), "--end",
                days_ago(1)), 422)  # fmt: skip
    fails(stepd(daemon, "schedule", "backfill", "12345", "--start", start, "--end", end), 404)
    for s in (sid, every):
        ok(stepd(daemon, "schedule", "rm", str(s)))


def test_read_only_tokens_read_but_do_not_write(daemon: Daemon, tmp_path: Path) -> None:
    push(daemon, tmp_path, echo_def("cs-ro"))
    sid = add(daemon, "cs-ro", "0 0 1 1 *", "--paused")
    assert str(sid) in ok(stepd(daemon, "schedule", "list", token=READER))
    assert str(sid) in ok(stepd(daemon, "schedule", "list", "cs-ro", token=READER))
    ok(stepd(daemon, "schedule", "show", str(sid), token=READER))
    for argv in (["add", "cs-ro", "@daily"], ["pause", str(sid)], ["resume", str(sid)],
                 ["trigger", str(sid)], ["rm", str(sid)],
                 ["backfill", str(sid), "--start", days_ago(3), "--end", days_ago(1)]):  # fmt: skip
        fails(stepd(daemon, "schedule", *argv, token=READER), 403)
    r = stepd(daemon, "schedule", "list", token="wrong")
    assert r.returncode == 1 and r.stderr.rstrip().endswith("(set STEPD_TOKEN)"), r.stderr
    assert get(daemon, f"/api/workflows/schedules/{sid}")["ticks"] == []
    ok(stepd(daemon, "schedule", "rm", str(sid)))


def test_schedule_help_is_readable() -> None:
    r = subprocess.run([*stepd_command(), "schedule", "--help"], capture_output=True, text=True,
                       timeout=20, env=clean_env(COLUMNS="100"))  # fmt: skip
    assert r.returncode == 0
    for command in ("list", "show", "add", "pause", "resume", "trigger", "backfill", "rm"):
        assert re.search(rf"^    {command} +\S", r.stdout, re.M), command
    for policy in cli.OVERLAPS:
        assert re.search(rf"^  {policy} +\S", r.stdout, re.M), policy
    r = subprocess.run([*stepd_command(), "--help"], capture_output=True, text=True, timeout=20,
                       env=clean_env())  # fmt: skip
    assert re.search(r"^    schedule +cron schedules", r.stdout, re.M), r.stdout
