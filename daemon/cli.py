"""The `stepd` command: `serve` runs the daemon; the other commands talk to its HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import orjson
from httpx_sse import SSEError, connect_sse

from daemon import config as configuration
from daemon.auth import hash_token, new_token
from daemon.errors import ConfigError
from daemon.models import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
NO_BODY = object()


class CLIError(Exception):
    """A one-line error for the user; exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"stepd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `stepd def show kyc | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        Client.close_all()


EXIT_CODES = """\
client commands talk to STEPD_URL (default http://127.0.0.1:8000) with STEPD_TOKEN.

exit status:
  0  done (submit --wait, watch: the workflow completed)
  1  an error (one line on stderr), or the workflow failed or was cancelled
     (submit --wait; watch exits 2 for cancelled)
  2  submit --stop-at-gate: the workflow waits for a person (a gate, a retry-or-fail
     decision, or it is paused); also a command line that does not parse
  3  submit --timeout: still running when the time ran out
  def run --wait exits the same way; there 2 is any wait: a gate, a decision, a
  signal or a timer (stepd def --help)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stepd",
        description="Durable workflow executor daemon.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon (API + executor)")
    s.add_argument("--config", help="TOML config file (default: embedded defaults)")
    s.add_argument("--database", metavar="URL",
                   help="overrides [database]: sqlite:///FILE or postgresql://...")  # fmt: skip
    s.add_argument("--host", help="overrides [server] host")
    s.add_argument("--port", type=int, help="overrides [server] port")
    s.add_argument("--node-id", help="overrides [server] node_id")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("backup", help="copy the database consistently, also while serving")
    s.add_argument("file", help="where to write the copy")
    s.add_argument("--config", help="TOML config file naming the database (default: embedded)")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("submit", help="create a workflow from a JSON file")
    s.add_argument("file", help="JSON file with name, flow, input ('-' for stdin)")
    s.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set input.KEY (VALUE parsed as JSON, else a string); repeatable",
    )
    s.add_argument("--name", help="workflow name (default: the file's, or its stem)")
    s.add_argument(
        "--wait",
        action="store_true",
        help="wait until it ends and print a one-line outcome; "
        "exit 0 completed, 1 failed or cancelled",
    )
    s.add_argument(
        "--stop-at-gate",
        action="store_true",
        help="wait, but stop when it waits for a person (gate, decision, paused); exit 2",
    )
    s.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait at most this long; exit 3 if still running",
    )
    s.add_argument(
        "--json", action="store_true", help="print the workflow as JSON instead of one line"
    )
    s.add_argument("--idempotency-key", help="send an Idempotency-Key header")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("list", help="list workflows, newest first")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--status", choices=["running", "paused", "completed", "failed", "cancelled"])
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("watch", help="follow a workflow's events until it ends")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser("show", help="show a workflow with its steps")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("ready", help="release a waiting approval gate")
    s.add_argument("step_id", type=int)
    s.add_argument("--data", help="JSON value that becomes the gate's result")
    s.set_defaults(func=cmd_ready)

    s = sub.add_parser("retry", help="run an interrupted non-idempotent step again")
    s.add_argument("step_id", type=int)
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("fail", help="fail an interrupted non-idempotent step")
    s.add_argument("step_id", type=int)
    s.add_argument("--reason", help="why (becomes the step's error)")
    s.set_defaults(func=cmd_fail)

    s = sub.add_parser("cancel", help="cancel a running workflow")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("reject", help="reject a waiting approval gate")
    s.add_argument("step_id", type=int)
    s.add_argument("--reason", required=True, help="why (required)")
    s.set_defaults(func=cmd_reject)

    s = sub.add_parser("approvals", help="what waits for a person: gates and decisions")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true", help="print JSON instead of lines")
    s.set_defaults(func=cmd_approvals)

    s = sub.add_parser("pause", help="pause a running workflow: nothing new starts")
    s.add_argument("id", type=int)
    s.add_argument("--reason", help="why (recorded in its events)")
    s.set_defaults(func=cmd_pause)

    s = sub.add_parser(
        "resume", help="carry on a paused workflow, or redrive a failed or cancelled one"
    )
    s.add_argument("id", type=int)
    s.add_argument("--from-step", metavar="STATE", help="state id to continue at")
    s.add_argument("--reason", help="why (recorded in its events)")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser(
        "redrive",
        help="run a failed or cancelled workflow again from where it failed (same as resume)",
    )
    s.add_argument("id", type=int)
    s.add_argument("--from-step", metavar="STATE", help="state id to continue at")
    s.add_argument("--reason", help="why (recorded in its events)")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser(
        "intervene", help="merge-patch the input of a paused workflow or one waiting at a gate"
    )
    s.add_argument("id", type=int)
    s.add_argument(
        "--input",
        required=True,
        metavar="JSON|@FILE",
        help="a JSON merge patch (RFC 7386), or @FILE to read it from a file ('@-': stdin)",
    )
    s.add_argument("--reason", help="why (recorded in its events)")
    s.set_defaults(func=cmd_intervene)

    s = sub.add_parser("signal", help="send a named signal to a workflow")
    s.add_argument("id", type=int)
    s.add_argument("name", help="the signal's name")
    s.add_argument("--data", metavar="JSON", help="JSON value delivered with the signal")
    s.set_defaults(func=cmd_signal)

    s = sub.add_parser("tools", help="the daemon's tools and their parameters")
    s.add_argument("--json", action="store_true", help="print JSON instead of lines")
    s.set_defaults(func=cmd_tools)

    s = sub.add_parser("validate", help="check a workflow file without running it")
    s.add_argument("file")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("token", help="make a new API token and print its config entry")
    s.add_argument("name", help="token name (becomes created_by)")
    s.add_argument("--permission", choices=["workflow", "approve"], default="workflow")
    s.set_defaults(func=cmd_token)

    s = sub.add_parser(
        "admin-token",
        help="replace the generated 'admin' token (e.g. when it is lost); used from the next start",
    )
    s.add_argument("--config", help="TOML config file naming the database (default: embedded)")
    s.set_defaults(func=cmd_admin_token)

    _add_def_parsers(sub)
    _add_schedule_parsers(sub)
    s = sub.add_parser("runs", help="a saved definition's runs, newest first (= stepd def runs)")
    _runs_arguments(s)
    return p


# -- serve ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.service import serve

    try:
        cfg = configuration.load(args.config)
        cfg = configuration.override(cfg, database=args.database, host=args.host,
                                     port=args.port, node_id=args.node_id)  # fmt: skip
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    logs.setup(cfg.log_level, cfg.log_format)
    code = asyncio.run(serve(cfg))
    # Exit without joining worker threads: a sync tool still blocked after the shutdown
    # grace cannot be interrupted, and its step has been requeued already.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_backup(args: argparse.Namespace) -> int:
    from daemon.storage import StorageError
    from daemon.storage.sqlite.store import backup

    try:
        cfg = configuration.load(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if cfg.database_url:
        raise CLIError(
            "the database is PostgreSQL ([database] url): back it up with its own tools, "
            "e.g. pg_dump --format=custom --file=stepd.dump DATABASE_URL"
        )
    if not cfg.db_path.exists():
        raise CLIError(f"no database at {cfg.db_path}")
    dest = Path(args.file)
    if dest.resolve() == cfg.db_path.resolve():
        raise CLIError("the backup must not overwrite the database itself")
    try:
        pages = backup(cfg.db_path, dest)
    except (StorageError, OSError) as exc:
        raise CLIError(f"backup failed: {exc}") from None
    print(f"backed up {cfg.db_path} to {dest} ({pages} pages, integrity ok)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    token = new_token()
    print(f"token: {token}\n")
    print("[[auth.tokens]]")
    print(f'name = "{args.name}"')
    print(f'sha256 = "{hash_token(token)}"')
    print(f'permissions = ["{args.permission}"]')
    return 0


def cmd_admin_token(args: argparse.Namespace) -> int:
    from daemon.auth import GENERATED_TOKEN_NAME, mint_admin_token

    try:
        cfg = configuration.load(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if any(t.name == GENERATED_TOKEN_NAME for t in cfg.tokens):
        raise CLIError(
            f"the config has a token named '{GENERATED_TOKEN_NAME}', which replaces the "
            f"generated one; make a new one with `stepd token {GENERATED_TOKEN_NAME}` instead"
        )
    token, path = mint_admin_token(cfg.state_dir)
    print(
        f"stepd: wrote a new token for '{GENERATED_TOKEN_NAME}' to {path} (shown once). "
        "It replaces the old one when stepd serve next starts:\n\n"
        f"    export TOKEN={token}\n"
    )
    return 0


# -- client commands ------------------------------------------------------------------


class Client:
    opened: list[Client] = []  # closed by main() when the command ends

    def __init__(self) -> None:
        self.url = os.environ.get("STEPD_URL", DEFAULT_URL).rstrip("/")
        token = os.environ.get("STEPD_TOKEN") or os.environ.get("TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        Client.opened.append(self)

    @classmethod
    def close_all(cls) -> None:
        while cls.opened:
            cls.opened.pop().http.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = NO_BODY,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """The answer's status and decoded JSON (None when it has none), whatever the status."""
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if body is not NO_BODY:
            kwargs["content"] = orjson.dumps(body)
            kwargs["headers"]["Content-Type"] = "application/json"
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CLIError(
                f"cannot reach {self.url} ({exc}); is `stepd serve` running? "
                "Set STEPD_URL to point elsewhere."
            ) from None
        try:
            data = resp.json()
        except ValueError:
            data = None if not resp.text.strip() else resp.text.strip()
        return resp.status_code, data

    def call(
        self, method: str, path: str, body: Any = NO_BODY, headers: dict[str, str] | None = None
    ) -> Any:
        status, data = self.request(method, path, body, headers)
        if status >= 400:
            raise _http_error(status, data)
        return None if isinstance(data, str) else data


def _http_error(status: int, data: Any, hint: str = "") -> CLIError:
    """`stepd: 409: <the server's error>`, with every item of an `errors` list it adds."""
    msg = data.get("error") if isinstance(data, dict) else data
    if status == 401:
        hint = " (set STEPD_TOKEN)"
    text = f"{status}: {msg if msg is not None else ''}{hint}".rstrip()
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list):
        more = [e for e in map(_error_item, errors) if e not in str(msg)]
        text += "".join(f"\n  - {e}" for e in more)
    return CLIError(text)


def _error_item(item: Any) -> str:
    """One item of an `errors` list: a string, or an object with a message and where."""
    if not isinstance(item, dict):
        return str(item)
    where = item.get("path") or item.get("field") or item.get("loc")
    if isinstance(where, list):
        where = "/".join(map(str, where))
    message = item.get("message") or item.get("error") or item.get("msg")
    if message is None:
        return orjson.dumps(item).decode()
    return f"{where}: {message}" if where not in (None, "") else str(message)


def _print(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _read_json_file(path: str) -> Any:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CLIError(f"{path}: invalid JSON: {exc}") from None


def _body_from_file(args: argparse.Namespace) -> dict[str, Any]:
    body = _read_json_file(args.file)
    if not isinstance(body, dict):
        raise CLIError(f"{args.file}: expected a JSON object")
    if "flow" not in body:  # a bare flow: {"start": {...}, ...}
        body = {"flow": body}
    if args.__dict__.get("name"):
        body["name"] = args.name
    body.setdefault("name", Path(args.file).stem if args.file != "-" else "workflow")
    inputs = dict(body.get("input") or {})
    for item in args.__dict__.get("input") or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--input expects KEY=VALUE, got '{item}'")
        try:
            inputs[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            inputs[key] = value
    body["input"] = inputs
    return body


def cmd_submit(args: argparse.Namespace) -> int:
    client = Client()
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    created = client.call("POST", "/api/workflow", _body_from_file(args), headers)
    if not (args.wait or args.stop_at_gate or args.timeout is not None):
        _print(created)
        return 0
    wf_id = created["id"]
    print(f"workflow {wf_id} started; waiting...", file=sys.stderr)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    announced: set[int] = set()
    while True:
        wf = client.call("GET", f"/api/workflow/{wf_id}")
        steps = wf.get("steps") or []
        if wf["status"] in TERMINAL:
            return _outcome(args, wf, 0 if wf["status"] == "completed" else 1)
        person = _waiting_for_person(wf)
        if args.stop_at_gate and person is not None:
            return _outcome(args, wf, 2)
        if deadline is not None and time.monotonic() >= deadline:
            return _outcome(args, wf, 3)
        for step in steps:
            if step.get("awaiting") in ("ready", "decision") and step["id"] not in announced:
                announced.add(step["id"])
                print(f"step {step['id']} ({step['name']}) {_awaits(step)}", file=sys.stderr)
        time.sleep(0.2)


def _waiting_for_person(wf: dict[str, Any]) -> dict[str, Any] | None:
    """The step a person must act on (a gate, an interrupted step), or the workflow if it
    is paused; None if it is not waiting for anyone."""
    if wf["status"] == "paused":
        return wf
    for step in wf.get("steps") or []:
        if step.get("status") == "running" and step.get("awaiting") in ("ready", "decision"):
            return step
    return None


def _awaits(step: dict[str, Any]) -> str:
    """What a waiting step waits for, with the command that moves it on."""
    sid = step["id"]
    awaiting = step.get("awaiting")
    if awaiting == "ready":
        return f"awaits approval: stepd ready {sid} (or stepd reject {sid} --reason ...)"
    if awaiting == "decision":
        return f"was interrupted: stepd retry {sid} or stepd fail {sid}"
    if awaiting == "timer":
        return f"waits until {_when(step.get('expires_at'))}"
    if awaiting == "signal":
        until = step.get("expires_at")
        return "waits for a signal" + (f" (times out {_when(until)})" if until else "")
    if awaiting == "branches":
        return "waits for its branches"
    if awaiting == "child" and step.get("child_id"):
        return f"waits for child workflow {step['child_id']} (stepd show {step['child_id']})"
    return f"awaits {awaiting}"


def _outcome(args: argparse.Namespace, wf: dict[str, Any], code: int) -> int:
    """Print the end of `submit --wait`: the workflow as JSON, or one line."""
    if args.json:
        _print(wf)
    else:
        print(_outcome_line(wf))
    return code


def _outcome_line(wf: dict[str, Any]) -> str:
    head = f"workflow {wf['id']}"
    status = wf["status"]
    took = _duration(wf.get("created_at"), wf.get("completed_at") or wf.get("cancelled_at"))
    if status == "completed":
        line = f"{head} completed" + (f" in {took}" if took else "")
        if "output" in wf:
            line += f": output {_short(wf['output'], 200)}"
        else:  # an older daemon: the result of the last step, the one that ended it
            done = [s for s in wf.get("steps") or [] if s.get("status") == "done"]
            if done and done[-1].get("result_json") is not None:
                line += f": output {_decoded(done[-1]['result_json'], 200)}"
        return line
    if status in ("failed", "cancelled"):
        line = f"{head} {status}" + (f" after {took}" if took else "")
        return line + (f": {_one_line(wf['error'])}" if wf.get("error") else "")
    if status == "paused":
        return f"{head} is paused: stepd resume {wf['id']}"
    step = _waiting_for_person(wf)
    if step is not None and step.get("awaiting") == "ready":
        return (
            f"{head} waiting at gate '{step['name']}' (step {step['id']}): stepd ready {step['id']}"
        )
    if step is not None:
        return (
            f"{head} waiting: step '{step['name']}' ({step['id']}) was interrupted: "
            f"stepd retry {step['id']} or stepd fail {step['id']}"
        )
    return f"{head} still {status}: stepd show {wf['id']}"


def cmd_list(args: argparse.Namespace) -> int:
    query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
    items = Client().call("GET", f"/api/workflow{query}")
    if args.json:
        _print(items)
        return 0
    if not items:
        print("no workflows")
        return 0
    print(f"{'ID':<15} {'STATUS':<10} {'CREATED BY':<12} {'UPDATED':<20} NAME")
    for w in items:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w["updated_at"] / 1000))
        print(
            f"{w['id']:<15} {w['status']:<10} {str(w['created_by'] or '-'):<12} "
            f"{updated:<20} {w['name']}"
        )
    return 0


WATCH_EXIT = {"completed": 0, "failed": 1, "cancelled": 2}
MARKS = {
    "created": "+", "step_started": ">", "step_done": "✓", "step_failed": "✗",
    "step_retrying": "↻", "step_requeued": "↻", "gate_waiting": "⏸", "gate_decided": "▶",
    "decision_waiting": "⏸", "step_decided": "▶", "completed": "●", "failed": "●",
    "cancelled": "●", "paused": "⏸", "resumed": "▶", "redriven": "↻", "intervened": "✎",
    "signal_received": "⚑", "signal_consumed": "⚑", "wait_started": "⏲", "wait_ended": "▶",
    "branches_started": "⑂", "branch_done": "✓", "branch_failed": "✗",
    "branches_joined": "▶",
}  # fmt: skip


def cmd_watch(args: argparse.Namespace) -> int:
    """Print each event of a workflow as it happens; exit 0 / 1 / 2 for completed / failed /
    cancelled. A dropped connection is resumed from the last event seen."""
    client = Client()
    wf = client.call("GET", f"/api/workflow/{args.id}")
    names = {s["id"]: s["name"] for s in wf["steps"]}
    print(f"watching workflow {wf['id']} ({wf['name']}), {wf['status']}", flush=True)
    last, failures = 0, 0
    while True:
        ended: dict[str, Any] | None = None  # the terminal event this stream ended with
        before = last
        try:
            with connect_sse(client.http, "GET", f"/api/workflow/{args.id}/events",
                             headers={"Last-Event-ID": str(last)},
                             timeout=httpx.Timeout(30, read=None)) as source:  # fmt: skip
                resp = source.response
                if resp.status_code >= 400:
                    raise CLIError(f"{resp.status_code}: {resp.read().decode(errors='replace')}")
                for sse in source.iter_sse():
                    if not sse.data:
                        continue  # the reconnection delay
                    event = orjson.loads(sse.data)
                    failures = 0
                    last = event["id"]
                    if event["step_id"] is not None and event["step_id"] not in names:
                        fresh = client.call("GET", f"/api/workflow/{args.id}")
                        names.update({s["id"]: s["name"] for s in fresh["steps"]})
                    print(_describe(event, names), flush=True)
                    if event["type"] in WATCH_EXIT:
                        ended = event
                        break
            wf = client.call("GET", f"/api/workflow/{args.id}")
            if wf["status"] in WATCH_EXIT:
                # A failed or cancelled workflow may have been redriven since the terminal
                # event just replayed: then more events follow it, so read on.
                if ended is not None and (wf.get("updated_at") or 0) <= ended["at"]:
                    return WATCH_EXIT[ended["type"]]
                if ended is None:  # the stream ended early
                    print(f"● {wf['status']}", flush=True)
                    return WATCH_EXIT[wf["status"]]
            if last == before:
                time.sleep(0.2)
        except SSEError as exc:
            raise CLIError(f"{client.url} did not answer with an event stream: {exc}") from None
        except httpx.HTTPError as exc:
            failures += 1
            if failures > 30:
                raise CLIError(f"lost the connection to {client.url}: {exc}") from None
            time.sleep(1)


def _describe(event: dict[str, Any], names: dict[int, str]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event["at"] / 1000))
    kind = event["type"]
    step = names.get(event["step_id"], "") if event["step_id"] is not None else ""
    data = event.get("data") or {}
    detail = ""
    if kind in ("step_failed", "step_retrying", "failed") and data.get("error"):
        detail = f": {data['error']}"
    elif kind == "gate_waiting":
        detail = f" (stepd ready {event['step_id']})"
    elif kind in ("gate_decided", "step_decided"):
        detail = f": {data.get('decision')} by {data.get('by')}"
        if data.get("reason"):
            detail += f" ({data['reason']})"
    elif kind in ("step_requeued", "decision_waiting"):
        detail = f": {data.get('reason')}"
    elif kind in ("paused", "resumed", "redriven", "intervened"):
        detail = f" by {data['by']}" if data.get("by") else ""
        if data.get("from_step"):
            detail += f" from {data['from_step']}"
        if data.get("reason"):
            detail += f" ({data['reason']})"
    elif kind in ("signal_received", "signal_consumed") and data.get("name"):
        detail = f": {data['name']}"
    elif kind in ("branch_done", "branch_failed"):
        branch = data.get("branch")
        detail = f" [{branch}]" if branch is not None else ""
        if data.get("error"):
            detail += f": {data['error']}"
    elif kind == "branches_started" and data.get("count") is not None:
        detail = f": {data['count']}"
    elif kind == "wait_started":
        if data.get("signal"):
            name = data["signal"]
            detail = f": signal {name} (stepd signal {event.get('workflow_id')} {name})"
            if data.get("until"):
                detail += f", times out {_when(data['until'])}"
        elif data.get("until"):
            detail = f": until {_when(data['until'])}"
    elif kind in ("wait_ended", "branches_joined") and data.get("error"):
        detail = f": {data['error']}"
    label = f" {step}" if step else ""
    return f"{when} {MARKS.get(kind, '·')} {kind}{label}{detail}"


def cmd_show(args: argparse.Namespace) -> int:
    wf = Client().call("GET", f"/api/workflow/{args.id}")
    if args.json:
        _print(wf)
        return 0
    for line in _render_workflow(wf):
        print(line)
    return 0


def _render_workflow(wf: dict[str, Any]) -> list[str]:
    """A workflow for a person: a header, then one line per step (nested ones indented
    under their parallel or map step). Fields an older daemon lacks are left out."""
    out = [f"workflow {wf['id']}  {wf.get('name', '')}".rstrip()]

    def field(label: str, value: str) -> None:
        out.append(f"  {label:<13}{value}")

    field("status", str(wf.get("status")))
    field("created by", str(wf.get("created_by") or "-"))
    created = wf.get("created_at")
    field("created", _when(created))
    if wf.get("updated_at"):
        field("updated", _when(wf["updated_at"]))
    if wf.get("paused_at"):
        field("paused", _when(wf["paused_at"]))
    for label in ("completed", "cancelled"):
        at = wf.get(f"{label}_at")
        if at:
            field(label, f"{_when(at)} (took {_duration(created, at)})")
    if wf.get("status") in ("running", "paused") and created:
        field("running for", _duration(created, int(time.time() * 1000)))
    if wf.get("error"):
        field("error", _one_line(wf["error"]))
    if wf.get("output") is not None:
        field("output", _short(wf["output"], 200))
    steps = wf.get("steps") or []
    if not steps:
        out.append("")
        out.append("no steps")
        return out
    rows = [("STEP", "STATE", "TOOL", "STATUS", "ATTEMPT", "DURATION", "RESULT")]
    for depth, step in _step_tree(steps):
        state = str(step.get("state") or step.get("name") or "")
        if step.get("name") and step["name"] != state:
            state += f" ({step['name']})"
        scope = step.get("scope")
        if depth and isinstance(scope, list) and scope:
            state = f"[{scope[-1]}] {state}"
        tool = step.get("tool")
        if tool is None:  # a gate shows "-"; a parallel, map or wait state its kind
            kind = step.get("kind")
            tool = f"({kind})" if kind and kind not in ("gate", "tool") else "-"
        rows.append((
            str(step["id"]),
            "  " * depth + state,
            str(tool),
            str(step.get("status") or ""),
            str(step.get("attempt", "")),
            _duration(step.get("started_at"), step.get("completed_at")) or "-",
            _step_detail(step),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out.append("")
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(len(widths))]
        out.append("  ".join([*cells, r[-1]]).rstrip())
    return out


def _step_tree(steps: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Steps in order, each nested one right after its parallel or map step (grouped by
    branch or item), with its depth."""
    ids = {s["id"] for s in steps}
    children: dict[int, list[dict[str, Any]]] = {}
    top: list[dict[str, Any]] = []
    for step in steps:
        parent = step.get("parent_id")
        if parent is not None and parent in ids and parent != step["id"]:
            children.setdefault(parent, []).append(step)
        else:
            top.append(step)

    def branch_key(step: dict[str, Any], order: dict[Any, int]) -> tuple[int, Any]:
        scope = step.get("scope")
        last = scope[-1] if isinstance(scope, list) and scope else None
        if isinstance(last, int):
            return (0, last)
        return (1, order.setdefault(str(last), len(order)))

    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[int] = set()

    def visit(step: dict[str, Any], depth: int) -> None:
        if step["id"] in seen:
            return
        seen.add(step["id"])
        out.append((depth, step))
        kids = children.get(step["id"], [])
        order: dict[Any, int] = {}
        for kid in sorted(kids, key=lambda k: branch_key(k, order)):
            visit(kid, depth + 1)

    for step in top:
        scope = step.get("scope")
        visit(step, len(scope) // 2 if isinstance(scope, list) else 0)
    for step in steps:  # a cycle or a missing parent: never lose a step
        visit(step, 0)
    return out


def _step_detail(step: dict[str, Any]) -> str:
    """The last column: what a running step waits for, its error, or its result."""
    if step.get("status") == "running" and step.get("awaiting"):
        return f"awaiting {step['awaiting']}: " + _awaits(step).split(": ", 1)[-1]
    if step.get("error"):
        return "error: " + _one_line(step["error"], 100)
    raw = step.get("result_json")
    return "" if raw is None else _decoded(raw, 80)


def _decoded(raw: str, width: int) -> str:
    """A stored JSON text (result_json) on one line, cut to `width` characters."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _one_line(str(raw), width)
    return _short(value, width)


def _short(value: Any, width: int) -> str:
    """A JSON value on one line, cut to `width` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return _one_line(text, width)


def _one_line(text: str, width: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(ms: int | None) -> str:
    """A local time like 2026-12-03 13:04:05 (milliseconds since the epoch in)."""
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _duration(start: int | None, end: int | None) -> str:
    """How long from `start` to `end` (ms), e.g. 850ms, 2.3s, 4m05s, 2h03m, 3d04h; '' if
    either is unknown."""
    if not start or not end:
        return ""
    ms = max(0, end - start)
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ago(ms: int | None) -> str:
    if not ms:
        return "-"
    took = _duration(ms, int(time.time() * 1000))
    return f"{_when(ms)} ({took} ago)"


def cmd_ready(args: argparse.Namespace) -> int:
    body: Any = NO_BODY
    if args.data is not None:
        try:
            body = orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            raise CLIError(f"--data is not valid JSON: {exc}") from None
    _print(Client().call("POST", f"/api/workflow/{args.step_id}/ready", body))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    _print(Client().call("POST", f"/api/workflow/{args.step_id}/retry"))
    return 0


def cmd_fail(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else NO_BODY
    _print(Client().call("POST", f"/api/workflow/{args.step_id}/fail", body))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _print(Client().call("DELETE", f"/api/workflow/{args.id}"))
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    body = {"reason": args.reason}
    _print(Client().call("POST", f"/api/workflow/{args.step_id}/reject", body))
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    items = Client().call("GET", f"/api/approvals?limit={args.limit}")
    if args.json:
        _print(items)
        return 0
    if not items:
        print("nothing waits for a person")
        return 0
    rows = [("STEP", "WORKFLOW", "STATE", "WAITING SINCE", "WHO MAY DECIDE", "TO DO")]
    for item in items:
        sid = item["step_id"]
        approvers = item.get("approvers")
        if item.get("awaiting") == "decision":
            todo = f"stepd retry {sid} | stepd fail {sid}"
        else:
            todo = f"stepd ready {sid} | stepd reject {sid} --reason ..."
        rows.append((
            str(sid),
            f"{item['workflow_id']} ({item.get('workflow_name') or '-'})",
            str(item.get("state") or item.get("name") or ""),
            _ago(item.get("waiting_since")),
            ", ".join(approvers) if approvers else "any token with approve",
            todo,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join([*(r[i].ljust(widths[i]) for i in range(len(widths))), r[-1]]).rstrip())
    return 0


def _reason(args: argparse.Namespace, body: dict[str, Any]) -> Any:
    if args.reason:
        body["reason"] = args.reason
    return body or NO_BODY


def cmd_pause(args: argparse.Namespace) -> int:
    _print(Client().call("POST", f"/api/workflow/{args.id}/pause", _reason(args, {})))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """`resume` and `redrive`: the server decides which one a workflow's status allows."""
    body = _reason(args, {"from_step": args.from_step} if args.from_step else {})
    _print(Client().call("POST", f"/api/workflow/{args.id}/resume", body))
    return 0


def cmd_intervene(args: argparse.Namespace) -> int:
    raw = args.input
    if raw.startswith("@"):
        patch = _read_json_file(raw[1:])
    else:
        try:
            patch = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CLIError(f"--input is not valid JSON: {exc} (use @FILE to read a file)") from None
    body = _reason(args, {"input": patch})
    _print(Client().call("POST", f"/api/workflow/{args.id}/intervene", body))
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.data is not None:
        try:
            body["data"] = orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            raise CLIError(f"--data is not valid JSON: {exc}") from None
    _print(Client().call("POST", f"/api/workflow/{args.id}/signal", body))
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    tools = Client().call("GET", "/api/tools")
    if args.json:
        _print(tools)
        return 0
    for t in tools:
        params = []
        for p in t.get("parameters") or []:
            text = p["name"] + (f": {p['type']}" if p.get("type") else "")
            if not p.get("required", True):
                text += f" = {_short(p.get('default'), 40)}"
            params.append(text)
        if t.get("accepts_any_args"):
            params.append("**args")
        line = f"{t['name']}({', '.join(params)})"
        if t.get("idempotent") is False:
            line += "  [not idempotent]"
        doc = (t.get("description") or "").strip().splitlines()
        if doc:
            line += f"  {doc[0]}"
        print(line)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    body = _body_from_file(args)
    result = Client().call("POST", "/api/workflow/validate", body)
    for e in result["errors"]:
        print(f"error: {e}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print("valid" if result["valid"] else "invalid")
    return 0 if result["valid"] else 1


# -- saved definitions (stepd def ...) --------------------------------------------------

DEF_HELP = """\
REF is a definition's name or its id (all digits).

exit status of `def run --wait`:
  0  the run completed
  1  it failed or was cancelled (or any other error)
  2  it waits: at a gate or a retry-or-fail decision (the line names the command that
     moves it on), for a signal or a timer, or it is paused
  3  --timeout ran out while it still runs
"""
DEF_STATUSES = ("draft", "active", "paused", "archived")
RUN_STATUSES = ("queued", "running", "paused", "completed", "failed", "cancelled")
EXECUTE_MAX = 300.0  # the server's longest ?timeout= for /execute


def _add_def_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "def",
        help="saved definitions: list, show, push, diff, run, deploy ... (stepd def --help)",
        description="Saved, versioned workflow definitions (/api/workflows).",
        epilog=DEF_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ds = d.add_subparsers(dest="def_command", required=True, metavar="SUBCOMMAND")

    s = ds.add_parser("list", help="definitions: id, name, version, status, tags, updated")
    s.add_argument("--status", choices=DEF_STATUSES)
    s.add_argument("--tag", help="only those with this tag")
    s.add_argument("--limit", type=int, default=50, help="at most this many (1..200, default 50)")
    s.add_argument("--offset", type=int, default=0, help="skip this many")
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_def_list)

    s = ds.add_parser("show", help="a definition: header, versions, webhook state")
    s.add_argument("ref", metavar="REF")
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.add_argument(
        "--definition",
        action="store_true",
        help="print only the definition body (what `def push` takes), as JSON",
    )
    s.add_argument(
        "--version", type=int, metavar="N", help="with --definition or --json: version N's"
    )
    s.set_defaults(func=cmd_def_show)

    s = ds.add_parser(
        "push", help="create a definition from a file, or add a version if its content changed"
    )
    s.add_argument(
        "file",
        metavar="FILE",
        help='JSON: {"name", "flow" | "steps", "description", "input_schema", "concurrency", '
        '"tags", "webhook", "notify_url"} (\'-\' for stdin; name defaults to the file\'s stem)',
    )
    s.add_argument("--summary", metavar="TEXT", help="the new version's change summary")
    s.set_defaults(func=cmd_def_push)

    s = ds.add_parser("validate", help="check a definition file without saving it")
    s.add_argument("file", metavar="FILE", help="as for push")
    s.set_defaults(func=cmd_def_validate)

    s = ds.add_parser("diff", help="what changed between two versions (RFC 6902)")
    s.add_argument("ref", metavar="REF")
    s.add_argument("v1", type=int, metavar="V1")
    s.add_argument("v2", type=int, metavar="V2")
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_def_diff)

    s = ds.add_parser("rollback", help="make a new version with an older version's content")
    s.add_argument("ref", metavar="REF")
    s.add_argument("version", type=int, metavar="VERSION")
    s.set_defaults(func=cmd_def_rollback)

    s = ds.add_parser("run", help="start a run; --wait: wait for its outcome")
    s.add_argument("ref", metavar="REF")
    given = s.add_mutually_exclusive_group()
    given.add_argument("--input", metavar="JSON", help="the run's input, a JSON object")
    given.add_argument("--input-file", metavar="FILE", help="read the input from a JSON file")
    s.add_argument("--version", type=int, metavar="N", help="run version N (default: latest)")
    s.add_argument(
        "--wait",
        action="store_true",
        help="wait for the outcome and print one line; exit 0 completed, 1 failed or "
        "cancelled, 2 waits for a person, signal or timer",
    )
    s.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait: wait at most this long; exit 3 if still running",
    )
    s.add_argument(
        "--json", action="store_true", help="with --wait: print the run as JSON instead of a line"
    )
    s.set_defaults(func=cmd_def_run)

    s = ds.add_parser("runs", help="a definition's runs, newest first")
    _runs_arguments(s)

    s = ds.add_parser("status", help="set the status: draft, active, paused, archived")
    s.add_argument("ref", metavar="REF")
    s.add_argument("status", choices=DEF_STATUSES, metavar="STATUS",
                   help="|".join(DEF_STATUSES) + " (paused and archived refuse runs)")  # fmt: skip
    s.set_defaults(func=cmd_def_status)

    s = ds.add_parser("rm", help="delete a definition and its versions")
    s.add_argument("ref", metavar="REF")
    s.add_argument("--force", action="store_true", help="even while runs are active")
    s.set_defaults(func=cmd_def_rm)

    s = ds.add_parser("deploy", help="give it a webhook; prints its URL and secret")
    s.add_argument("ref", metavar="REF")
    s.set_defaults(func=cmd_def_deploy)

    s = ds.add_parser("undeploy", help="remove its webhook")
    s.add_argument("ref", metavar="REF")
    s.set_defaults(func=cmd_def_undeploy)

    s = ds.add_parser("arm", help="let its single-use webhook take one call in the next 10 minutes")
    s.add_argument("ref", metavar="REF")
    s.set_defaults(func=cmd_def_arm)

    s = ds.add_parser("export", help="definitions with all their versions, as JSON")
    s.add_argument("ref", nargs="?", metavar="REF", help="only this one (default: all)")
    s.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    s.set_defaults(func=cmd_def_export)

    s = ds.add_parser(
        "import", help="load an export file; prints what it created, updated, skipped"
    )
    s.add_argument("file", metavar="FILE", help="a `stepd def export` file ('-' for stdin)")
    s.add_argument(
        "--mode",
        choices=("create", "upsert"),
        default="create",
        help="create: skip names that exist (default); upsert: add a new version where the "
        "content differs",
    )
    s.set_defaults(func=cmd_def_import)


def _runs_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("ref", metavar="REF", help="the definition's name or id")
    s.add_argument("--status", choices=RUN_STATUSES)
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_def_runs)


def _def_path(ref: str, tail: str = "") -> str:
    """/api/workflows/{ref}{tail}, the name percent-encoded (it may hold spaces or '?')."""
    return f"/api/workflows/{quote(str(ref), safe='')}{tail}"


def _query(**params: Any) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def _unwrap(answer: Any, key: str = "workflow") -> Any:
    """The object an answer wraps as {"workflow": {...}}, or the answer itself."""
    if isinstance(answer, dict) and isinstance(answer.get(key), dict):
        return answer[key]
    return answer


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell; the last one is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(r[i].ljust(widths[i]) for i in range(len(widths))), r[-1]]).rstrip()
        for r in rows
    ]


def _iso_when(value: Any) -> str:
    """An ISO 8601 time of the /api/workflows family (or epoch ms) as local time, like
    2026-12-03 16:04:05; '-' when absent."""
    if value in (None, ""):
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _when(int(value))
    text = str(value)
    try:
        at = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return text
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: Any) -> str:
    """A duration in seconds (float) as 850ms, 2.3s, 4m05s...; '' if unknown."""
    if value is None or isinstance(value, bool):
        return ""
    try:
        ms = int(round(float(value) * 1000))
    except (TypeError, ValueError):
        return ""
    return _duration(1, 1 + ms) if ms > 0 else "0ms"


def _tags(tags: Any) -> str:
    return ", ".join(map(str, tags)) if isinstance(tags, list) and tags else "-"


def cmd_def_list(args: argparse.Namespace) -> int:
    query = _query(status=args.status, tag=args.tag, limit=args.limit, offset=args.offset or None)
    answer = Client().call("GET", f"/api/workflows{query}")
    if args.json:
        _print(answer)
        return 0
    for line in _render_def_list(answer, args.offset):
        print(line)
    return 0


def _render_def_list(answer: dict[str, Any], offset: int = 0) -> list[str]:
    items = answer.get("workflows") or []
    total = answer.get("total")
    if not items:
        return ["no definitions" + (f" here ({total} in all)" if total else "")]
    rows = [("ID", "NAME", "VERSION", "STATUS", "TAGS", "UPDATED")]
    for w in items:
        rows.append((
            str(w.get("id")),
            str(w.get("name")),
            f"v{w.get('version')}",
            str(w.get("status")) + (" (deployed)" if w.get("deployed") else ""),
            _tags(w.get("tags")).replace(", ", ","),
            _iso_when(w.get("updated_at")),
        ))  # fmt: skip
    return _table(rows) + _more(total, offset, len(items))


def _more(total: Any, offset: int, shown: int) -> list[str]:
    """The line under a page of a list that has more: which rows these were."""
    if isinstance(total, int) and total > offset + shown:
        return [f"({offset + 1}-{offset + shown} of {total}; --offset {offset + shown} for more)"]
    return []


def cmd_def_show(args: argparse.Namespace) -> int:
    client = Client()
    if args.version is not None:
        if not (args.definition or args.json):
            raise CLIError("--version goes with --definition or --json")
        version = client.call("GET", _def_path(args.ref, f"/versions/{args.version}"))
        _print(_unwrap(version, "version").get("definition") if args.definition else version)
        return 0
    wf = _unwrap(client.call("GET", _def_path(args.ref)))
    if args.definition:
        _print(wf.get("definition"))
        return 0
    if args.json:
        _print(wf)
        return 0
    versions = client.call("GET", _def_path(args.ref, "/versions"))
    if isinstance(versions, dict):
        versions = versions.get("versions")
    for line in _render_definition(wf, versions or [], client.url):
        print(line)
    return 0


def _render_definition(
    wf: dict[str, Any], versions: list[dict[str, Any]], base_url: str = "", most: int = 20
) -> list[str]:
    """A definition for a person: a header, its webhook, then its versions, newest first."""
    ref = wf.get("name") or wf.get("id")
    out = [f"definition {wf.get('id')}  {wf.get('name', '')}".rstrip()]

    def field(label: str, value: Any) -> None:
        out.append(f"  {label:<13}{value}")

    field("version", f"v{wf.get('version')}")
    field("status", wf.get("status"))
    field("trigger", wf.get("trigger_type") or "manual")
    field("tags", _tags(wf.get("tags")))
    if wf.get("description"):
        field("description", _one_line(wf["description"], 200))
    if wf.get("concurrency") is not None:
        field("concurrency", f"{wf['concurrency']} runs at once")
    body = wf.get("definition") if isinstance(wf.get("definition"), dict) else {}
    flow = body.get("flow") if isinstance(body.get("flow"), dict) else None
    steps = body.get("steps") if isinstance(body.get("steps"), list) else None
    if flow is not None:
        field("states", _one_line(", ".join(map(str, flow)), 200))
    elif steps is not None:
        names = [str(st.get("id")) if isinstance(st, dict) else "?" for st in steps]
        field("steps", _one_line(", ".join(names), 200))
    if body.get("input_schema") is not None:
        field("input", "checked against input_schema")
    field("created", f"{_iso_when(wf.get('created_at'))} by {wf.get('created_by') or '-'}")
    field("updated", _iso_when(wf.get("updated_at")))
    hook = wf.get("webhook") if isinstance(wf.get("webhook"), dict) else {}
    mode = hook.get("mode") or (body.get("webhook") or {}).get("mode") or "single"
    if not wf.get("deployed"):
        field("webhook", f"not deployed (stepd def deploy {ref})")
    else:
        if mode == "persistent":
            state = "persistent: takes calls while deployed"
        elif _armed(hook.get("armed_until")):
            state = f"single-use, armed until {_iso_when(hook['armed_until'])}"
        else:
            state = f"single-use, not armed (stepd def arm {ref})"
        field("webhook", state)
        if hook.get("url"):
            url = hook["url"]
            field("url", base_url + url if url.startswith("/") else url)
        if hook.get("webhook_secret"):
            field("secret", f"set (stepd def show {ref} --json shows it)")
    out.append("")
    if not versions:
        out.append("no versions")
        return out
    rows = [("VERSION", "CREATED", "BY", "SUMMARY")]
    for v in versions[:most]:
        rows.append((
            f"v{v.get('version')}",
            _iso_when(v.get("created_at")),
            str(v.get("created_by") or "-"),
            _one_line(v.get("change_summary") or "", 120),
        ))  # fmt: skip
    out.extend(_table(rows))
    if len(versions) > most:
        out.append(f"(and {len(versions) - most} older: stepd def show {ref} --json)")
    return out


def _armed(until: Any) -> bool:
    if not until:
        return False
    text = str(until)
    try:
        at = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return True  # cannot tell: say what the server says
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at > datetime.now(UTC)


def _definition_from_file(path: str) -> dict[str, Any]:
    """A definition body from a file: the body itself, or anything that wraps it in
    "definition" (`stepd def show --json`, a version)."""
    body = _read_json_file(path)
    if (
        isinstance(body, dict)
        and "flow" not in body
        and "steps" not in body
        and isinstance(body.get("definition"), dict)
    ):
        body = body["definition"]
    if not isinstance(body, dict) or ("flow" not in body and "steps" not in body):
        raise CLIError(
            f'{path}: expected a definition, a JSON object {{"name", "flow" or "steps", ...}}'
        )
    name = body.get("name")
    if name is None and path != "-":
        name = Path(path).stem
    if not isinstance(name, str) or not name:
        raise CLIError(f'{path}: the definition needs a "name"')
    return {**body, "name": name}


def cmd_def_push(args: argparse.Namespace) -> int:
    body = _definition_from_file(args.file)
    name = body["name"]
    client = Client()
    status, current = client.request("GET", _def_path(name))
    if status == 404:
        create: dict[str, Any] = {"definition": body}
        if isinstance(body.get("tags"), list):
            create["tags"] = body["tags"]
        status, answer = client.request("POST", "/api/workflows", create)
        if status < 400:
            wf = _unwrap(answer)
            print(f"created {wf.get('name', name)} v{wf.get('version', 1)}")
            _warn(answer)
            return 0
        if status != 409:
            raise _http_error(status, answer)
        current = None  # created meanwhile by someone else: add a version to it
    elif status >= 400:
        raise _http_error(status, current)
    before = _unwrap(current).get("version") if isinstance(current, dict) else None
    update: dict[str, Any] = {"definition": body}
    if args.summary:
        update["change_summary"] = args.summary
    answer = client.call("PUT", _def_path(name), update)
    wf = _unwrap(answer)
    version = wf.get("version")
    changed = answer.get("changed", wf.get("changed")) if isinstance(answer, dict) else None
    if changed is None:
        changed = before is None or version != before
    print(f"{'updated' if changed else 'unchanged:'} {wf.get('name', name)} v{version}")
    _warn(answer)
    return 0


def _warn(answer: Any) -> None:
    """The server's warnings about a definition it saved, on stderr."""
    warnings = answer.get("warnings") if isinstance(answer, dict) else None
    for w in warnings if isinstance(warnings, list) else []:
        print(f"warning: {_error_item(w)}", file=sys.stderr)


def cmd_def_validate(args: argparse.Namespace) -> int:
    body = _definition_from_file(args.file)
    result = Client().call("POST", "/api/workflows/validate", {"definition": body})
    for e in result.get("errors") or []:
        print(f"error: {_error_item(e)}")
    for w in result.get("warnings") or []:
        print(f"warning: {_error_item(w)}")
    print("valid" if result.get("valid") else "invalid")
    return 0 if result.get("valid") else 1


def cmd_def_diff(args: argparse.Namespace) -> int:
    query = _query(v1=args.v1, v2=args.v2)
    answer = Client().call("GET", _def_path(args.ref, f"/diff{query}"))
    if args.json:
        _print(answer)
        return 0
    for line in _render_diff(answer):
        print(line)
    return 0


def _render_diff(answer: dict[str, Any]) -> list[str]:
    ops = answer.get("diff") or []
    summary = answer.get("summary") or ("no changes" if not ops else f"{len(ops)} changes")
    return [summary, *(_op_line(op) for op in ops)]


def _op_line(op: dict[str, Any]) -> str:
    """One RFC 6902 operation on a line: `replace /flow/start/args/msg "hi"`."""
    kind = str(op.get("op"))
    path = op.get("path")
    where = '""' if path == "" else str(path)
    if kind in ("move", "copy"):
        return f"{kind:<7} {op.get('from')} -> {where}"
    if kind == "remove" or "value" not in op:
        return f"{kind:<7} {where}"
    return f"{kind:<7} {where} {orjson.dumps(op['value']).decode()}"


def cmd_def_rollback(args: argparse.Namespace) -> int:
    answer = Client().call("POST", _def_path(args.ref, "/rollback"), {"version": args.version})
    wf = _unwrap(answer)
    name = wf.get("name", args.ref)
    if isinstance(answer, dict) and answer.get("changed") is False:
        print(f"unchanged: {name} v{wf.get('version')} has v{args.version}'s content already")
    else:
        print(f"rolled back {name} to v{args.version}: now v{wf.get('version')}")
    _warn(answer)
    return 0


def cmd_def_status(args: argparse.Namespace) -> int:
    answer = Client().call("PATCH", _def_path(args.ref, "/status"), {"status": args.status})
    wf = _unwrap(answer) if isinstance(answer, dict) else {}
    print(f"{wf.get('name', args.ref)}: {wf.get('status', args.status)}")
    return 0


def cmd_def_rm(args: argparse.Namespace) -> int:
    client = Client()
    status, answer = client.request(
        "DELETE", _def_path(args.ref, "?force=true" if args.force else "")
    )
    if status >= 400:
        hint = " (--force deletes it anyway)" if status == 409 and not args.force else ""
        raise _http_error(status, answer, hint)
    print(f"deleted {args.ref}")
    return 0


def cmd_def_deploy(args: argparse.Namespace) -> int:
    client = Client()
    answer = client.call("POST", _def_path(args.ref, "/deploy"))
    url = str(answer.get("url") or "")
    print(f"deployed {args.ref}")
    print(f"  url      {client.url + url if url.startswith('/') else url}")
    print(f"  id       {answer.get('webhook_id')}")
    print(f"  secret   {answer.get('webhook_secret')}")
    print(
        "  sign     X-Stepd-Timestamp: <unix seconds>, X-Stepd-Signature: v1=<hex HMAC-SHA256"
        ' of "<timestamp>.<body>" with the secret>'
    )
    return 0


def cmd_def_undeploy(args: argparse.Namespace) -> int:
    Client().call("POST", _def_path(args.ref, "/undeploy"))
    print(f"undeployed {args.ref}")
    return 0


def cmd_def_arm(args: argparse.Namespace) -> int:
    answer = Client().call("POST", _def_path(args.ref, "/arm"))
    until = answer.get("armed_until") if isinstance(answer, dict) else None
    print(f"armed {args.ref}: its webhook takes one call until {_iso_when(until)}")
    return 0


def cmd_def_export(args: argparse.Namespace) -> int:
    path = _def_path(args.ref, "/export") if args.ref else "/api/workflows/export"
    doc = Client().call("GET", path)
    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    if not args.output:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as exc:
        raise CLIError(f"cannot write {args.output}: {exc.strerror}") from None
    count = len(doc.get("workflows") or []) if isinstance(doc, dict) else 0
    print(f"exported {count} definition{'s' if count != 1 else ''} to {args.output}",
          file=sys.stderr)  # fmt: skip
    return 0


def cmd_def_import(args: argparse.Namespace) -> int:
    doc = _read_json_file(args.file)
    if not isinstance(doc, dict):
        raise CLIError(f"{args.file}: expected an export document (stepd def export)")
    answer = Client().call("POST", f"/api/workflows/import{_query(mode=args.mode)}", doc)
    for line in _render_import(answer):
        print(line)
    return 0


def _render_import(answer: dict[str, Any]) -> list[str]:
    out = [f"created {name}" for name in answer.get("created") or []]
    out += [f"updated {name}" for name in answer.get("updated") or []]
    for item in answer.get("skipped") or []:
        if isinstance(item, dict):
            reason = item.get("reason")
            out.append(f"skipped {item.get('name')}" + (f": {reason}" if reason else ""))
        else:
            out.append(f"skipped {item}")
    return out or ["nothing to import"]


def cmd_def_runs(args: argparse.Namespace) -> int:
    query = _query(status=args.status, limit=args.limit, offset=args.offset or None)
    answer = Client().call("GET", _def_path(args.ref, f"/runs{query}"))
    if args.json:
        _print(answer)
        return 0
    for line in _render_runs(answer):
        print(line)
    return 0


def _render_runs(answer: Any) -> list[str]:
    items = answer.get("runs", []) if isinstance(answer, dict) else answer or []
    if not items:
        return ["no runs"]
    errors = any(r.get("error") for r in items)  # a column only when there is one
    rows = [("RUN", "VERSION", "STATUS", "TRIGGER", "STARTED", "DURATION", "ERROR")[: 6 + errors]]
    for r in items:
        version = r.get("version", r.get("definition_version"))
        took = _seconds(r.get("duration_seconds"))
        rows.append((
            str(r.get("id", r.get("run_id"))),
            f"v{version}" if version is not None else "-",
            str(r.get("status")),
            str(r.get("trigger") or "-"),
            _iso_when(r.get("started_at") or r.get("created_at")),
            took or "-",
            _one_line(r["error"], 80) if r.get("error") else "",
        )[: 6 + errors])  # fmt: skip
    out = _table(rows)
    total = answer.get("total") if isinstance(answer, dict) else None
    if isinstance(total, int) and total > len(items):
        out.append(f"({len(items)} of {total}; --limit and --offset for more)")
    return out


def _run_input(args: argparse.Namespace) -> Any:
    if args.input_file is not None:
        return _read_json_file(args.input_file)
    if args.input is None:
        return {}
    try:
        return orjson.loads(args.input)
    except orjson.JSONDecodeError as exc:
        raise CLIError(
            f'--input is not valid JSON: {exc} (a JSON object, e.g. \'{{"msg": "hi"}}\')'
        ) from None


def cmd_def_run(args: argparse.Namespace) -> int:
    client = Client()
    inputs = _run_input(args)
    if not (args.wait or args.timeout is not None):
        body: dict[str, Any] = {"input_data": inputs, "trigger": "manual"}
        if args.version is not None:
            body["version"] = args.version
        _print(client.call("POST", _def_path(args.ref, "/run"), body))
        return 0
    if args.timeout is not None and args.timeout <= 0:
        raise CLIError("--timeout must be more than 0 seconds")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    wait = EXECUTE_MAX if args.timeout is None else min(args.timeout, EXECUTE_MAX)
    body = {"variables": inputs}
    if args.version is not None:
        body["version"] = args.version
    status, answer = client.request(
        "POST", _def_path(args.ref, f"/execute?timeout={wait:g}"), body, timeout=wait + 30
    )
    if not isinstance(answer, dict) or "run_id" not in answer:
        raise (
            _http_error(status, answer)
            if status >= 400
            else CLIError(f"{status}: unexpected answer {_short(answer, 200)}")
        )
    run_id = answer["run_id"]
    if status == 200:
        return _run_outcome(args, client, run_id, 0)
    if status == 500:
        return _run_outcome(args, client, run_id, 1, answer.get("error"))
    if status == 202:
        return _run_outcome(args, client, run_id, 2, awaiting=answer.get("awaiting"))
    if status != 504:
        raise _http_error(status, answer)
    # The server's longest wait ran out before ours: follow the run itself.
    print(f"run {run_id} still running; waiting...", file=sys.stderr)

    def fetch(wf_id: int) -> Any:
        return client.call("GET", f"/api/workflow/{wf_id}")

    while deadline is None or time.monotonic() < deadline:
        wf = client.call("GET", f"/api/workflow/{run_id}")
        if wf["status"] in TERMINAL:
            return _run_outcome(args, client, run_id, 0 if wf["status"] == "completed" else 1)
        if wf["status"] == "paused" or _stopped_waiting(wf, fetch):
            return _run_outcome(args, client, run_id, 2)
        time.sleep(0.2)
    return _run_outcome(args, client, run_id, 3)


WAITS = ("ready", "decision", "signal", "timer")
CALL_LEVELS = 6  # a run, and children of call states down to the daemon's deepest


def _stopped_waiting(wf: dict[str, Any], fetch: Any = None, level: int = 0) -> list[dict[str, Any]]:
    """What /execute calls waiting: every open step waits for a person, a signal or a
    timer (a parallel or map step waiting for its branches does not count; a call step
    counts as what its child waits at, read with `fetch(child_id)`) and nothing runs.
    Those steps as /execute lists them; [] otherwise."""
    out: list[dict[str, Any]] = []
    for s in wf.get("steps") or []:
        if s.get("status") not in ("pending", "running") or s.get("awaiting") == "branches":
            continue
        if s.get("awaiting") in WAITS:
            state = s.get("state") or s.get("name")
            out.append(
                {"workflow_id": wf.get("id"), "step_id": s["id"], "state": state,
                 "awaiting": s["awaiting"]}
            )  # fmt: skip
            continue
        if s.get("awaiting") != "child" or not s.get("child_id") or fetch is None:
            return []  # it runs, is due, or waits for something else
        if level + 1 >= CALL_LEVELS:
            return []
        child = fetch(s["child_id"])
        inner = _stopped_waiting(child, fetch, level + 1) if child["status"] == "running" else []
        if not inner:
            return []
        out += inner
    return out


def _run_outcome(
    args: argparse.Namespace,
    client: Client,
    run_id: int,
    code: int,
    error: str | None = None,
    awaiting: list[dict[str, Any]] | None = None,
) -> int:
    """Print the end of `def run --wait`: the run as JSON, or one line; return `code`."""
    status, answer = client.request("GET", f"/api/workflows/runs/{run_id}")
    run = _unwrap(answer, "run") if status == 200 and isinstance(answer, dict) else {}
    if args.json:
        _print(run or {"run_id": run_id, "error": error, "awaiting": awaiting})
        return code
    if code == 2 and not awaiting:  # found by polling: ask the part-one view what waits
        wf = client.call("GET", f"/api/workflow/{run_id}")
        if wf["status"] == "paused":
            awaiting = [{"paused": True}]
        else:
            awaiting = _stopped_waiting(wf, lambda i: client.call("GET", f"/api/workflow/{i}"))
    print(_run_outcome_line(run_id, code, run, error, awaiting or []))
    return code


def _run_outcome_line(
    run_id: int,
    code: int,
    run: dict[str, Any],
    error: str | None = None,
    awaiting: list[dict[str, Any]] | None = None,
) -> str:
    head = f"run {run_id}"
    took = _seconds(run.get("duration_seconds"))
    if code == 0:
        line = f"{head} completed" + (f" in {took}" if took else "")
        return line + (f": output {_short(run['output'], 200)}" if "output" in run else "")
    if code == 1:
        status = run.get("status") if run.get("status") in ("failed", "cancelled") else "failed"
        why = run.get("error") or error
        line = f"{head} {status}" + (f" after {took}" if took else "")
        return line + (f": {_one_line(why)}" if why else "")
    if code == 3:
        return f"{head} still {run.get('status') or 'running'}: stepd show {run_id}"
    order = {kind: n for n, kind in enumerate(WAITS)}  # a person's part first
    waits = sorted(awaiting or [], key=lambda w: order.get(w.get("awaiting"), len(order)))
    if not waits:
        return f"{head} waiting: stepd show {run_id}"
    first = waits[0]
    more = f" (and {len(waits) - 1} more: stepd show {run_id})" if len(waits) > 1 else ""
    if first.get("paused"):
        return f"{head} is paused: stepd resume {run_id}"
    sid, state, kind = first.get("step_id"), first.get("state"), first.get("awaiting")
    where = first.get("workflow_id") or run_id
    child = f" in child workflow {where}" if where != run_id else ""  # a call state's child
    if kind == "ready":
        return f"{head} waiting at gate '{state}' (step {sid}{child}): stepd ready {sid}{more}"
    step = f"step '{state}' ({sid}{child})"
    if kind == "decision":
        return (
            f"{head} waiting: {step} was interrupted: stepd retry {sid} or stepd fail {sid}{more}"
        )
    if kind == "signal":
        return f"{head} waiting: {step} waits for a signal: stepd signal {where} NAME{more}"
    if kind == "timer":
        return f"{head} waiting: {step} waits for its timer{more}"
    return f"{head} waiting: {step} awaits {kind}{more}"


# -- schedules (stepd schedule ...) --------------------------------------------------------

SCHEDULE_HELP = """\
DEFINITION is a definition's name or its id; SID a schedule's id (stepd schedule list).
CRON has five fields (minute hour day-of-month month day-of-week; six with seconds
first) or is one of @hourly, @daily, @weekly, @monthly, @yearly; it is read in --tz, an
IANA zone (default UTC).

overlap, when the schedule's previous run is still going:
  skip          the new tick is skipped (default)
  buffer_one    one tick waits and starts when the run ends; more are skipped
  buffer_all    every tick waits its turn (the default of backfill)
  cancel_other  the running runs are cancelled and the new one starts
  allow_all     the new run starts anyway

Fire times are shown in the schedule's zone, with its UTC offset.
"""
OVERLAPS = ("skip", "buffer_one", "buffer_all", "cancel_other", "allow_all")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _add_schedule_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "schedule",
        help="cron schedules of definitions: list, show, add, pause, trigger, backfill ... "
        "(stepd schedule --help)",
        description="Cron schedules that start runs of saved definitions "
        "(/api/workflows/.../schedules).",
        epilog=SCHEDULE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ds = d.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")

    s = ds.add_parser(
        "list", help="schedules (all, or one definition's): cron, zone, next run, overlap"
    )
    s.add_argument("ref", nargs="?", metavar="DEFINITION", help="only this definition's")
    s.add_argument("--limit", type=int, default=100, help="at most this many (1..200, default 100)")
    s.add_argument("--offset", type=int, default=0, help="skip this many")
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_schedule_list)

    s = ds.add_parser("show", help="a schedule: header, its next runs, its recent ticks")
    s.add_argument("sid", type=int, metavar="SID")
    s.add_argument(
        "--ticks", type=int, metavar="N", help="show the N most recent ticks (default 20)"
    )
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_schedule_show)

    s = ds.add_parser("add", help="add a schedule to a definition; prints its id and next runs")
    s.add_argument("ref", metavar="DEFINITION")
    s.add_argument("cron", metavar="CRON", help="e.g. '0 9 * * 1-5' (quote it) or @daily")
    s.add_argument("--tz", metavar="ZONE", help="IANA time zone, e.g. Europe/Paris (default UTC)")
    s.add_argument(
        "--input",
        metavar="JSON|@FILE",
        help="each run's input, a JSON object, or @FILE to read it from a file ('@-': stdin)",
    )
    s.add_argument("--overlap", choices=OVERLAPS, metavar="POLICY",
                   help="|".join(OVERLAPS) + " (default skip)")  # fmt: skip
    s.add_argument(
        "--catchup",
        type=int,
        metavar="SECONDS",
        help="a tick missed while no daemon ran still fires if at most this late (default 60)",
    )
    s.add_argument("--paused", action="store_true", help="add it paused (stepd schedule resume)")
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_schedule_add)

    s = ds.add_parser("pause", help="stop firing until resumed (no ticks are recorded meanwhile)")
    s.add_argument("sid", type=int, metavar="SID")
    s.set_defaults(func=cmd_schedule_pause, paused=True)

    s = ds.add_parser("resume", help="fire again, from the next fire time after now")
    s.add_argument("sid", type=int, metavar="SID")
    s.set_defaults(func=cmd_schedule_pause, paused=False)

    s = ds.add_parser("trigger", help="start a run now (obeys overlap; works while paused)")
    s.add_argument("sid", type=int, metavar="SID")
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_schedule_trigger)

    s = ds.add_parser(
        "backfill", help="one run per fire time between --start and --end; prints counts"
    )
    s.add_argument("sid", type=int, metavar="SID")
    s.add_argument("--start", required=True, metavar="ISO",
                   help="ISO 8601 with an offset, e.g. 2026-12-01T00:00:00Z")  # fmt: skip
    s.add_argument("--end", required=True, metavar="ISO", help="likewise; not in the future")
    s.add_argument("--overlap", choices=OVERLAPS, metavar="POLICY",
                   help="|".join(OVERLAPS) + " (default buffer_all)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print the API's JSON as is")
    s.set_defaults(func=cmd_schedule_backfill)

    s = ds.add_parser("rm", help="delete a schedule and its ticks (its runs stay)")
    s.add_argument("sid", type=int, metavar="SID")
    s.set_defaults(func=cmd_schedule_rm)


def _schedule_path(sid: int, tail: str = "") -> str:
    return f"/api/workflows/schedules/{int(sid)}{tail}"


def _fire_time(value: Any, weekday: bool = False) -> str:
    """A fire time (ISO 8601 with the schedule zone's offset) as 2026-12-04 09:00 -05:00,
    kept in that zone; seconds only when it has some; '-' when absent."""
    if value in (None, ""):
        return "-"
    text = str(value)
    try:
        at = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return text
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    clock = "%H:%M:%S" if at.second or at.microsecond else "%H:%M"
    offset = at.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if len(offset) == 5 else offset
    out = at.strftime(f"%Y-%m-%d {clock}") + f" {offset}"
    return f"{WEEKDAYS[at.weekday()]} {out}" if weekday else out


def _schedule_items(answer: Any) -> list[dict[str, Any]]:
    items = answer.get("schedules") if isinstance(answer, dict) else answer
    return [s for s in items or [] if isinstance(s, dict)]


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def cmd_schedule_list(args: argparse.Namespace) -> int:
    query = _query(limit=args.limit, offset=args.offset or None)
    if args.ref is not None:
        path = _def_path(args.ref, f"/schedules{query}")
    else:
        path = f"/api/workflows/recurring{query}"
    answer = Client().call("GET", path)
    if args.json:
        _print(answer)
        return 0
    for line in _render_schedule_list(answer, args.offset):
        print(line)
    return 0


def _render_schedule_list(answer: Any, offset: int = 0) -> list[str]:
    items = _schedule_items(answer)
    total = answer.get("total") if isinstance(answer, dict) else None
    if not items:
        return ["no schedules" + (f" here ({total} in all)" if total else "")]
    rows = [("ID", "DEFINITION", "CRON", "TIMEZONE", "DESCRIPTION", "NEXT RUN", "OVERLAP",
             "PAUSED")]  # fmt: skip
    for s in items:
        rows.append((
            str(s.get("schedule_id")),
            str(s.get("workflow_name") or s.get("workflow_id")),
            str(s.get("cron_expression")),
            str(s.get("timezone") or "UTC"),
            _one_line(s.get("description") or "-", 60),
            _fire_time(s.get("next_run")),
            str(s.get("overlap") or "-"),
            _yes(s.get("paused")),
        ))  # fmt: skip
    return _table(rows) + _more(total, offset, len(items))


def cmd_schedule_show(args: argparse.Namespace) -> int:
    client = Client()
    schedule = client.call("GET", _schedule_path(args.sid))
    total = None
    if args.ticks is not None:
        if args.ticks < 1:
            raise CLIError("--ticks must be at least 1")
        page = client.call("GET", _schedule_path(args.sid, f"/ticks{_query(limit=args.ticks)}"))
        schedule = {**schedule, "ticks": page.get("ticks") or []}
        total = page.get("total")
    if args.json:
        _print(schedule)
        return 0
    for line in _render_schedule(schedule, total):
        print(line)
    return 0


def _render_schedule(s: dict[str, Any], total: int | None = None) -> list[str]:
    """A schedule for a person: a header, its next runs, then its ticks, newest first."""
    sid = s.get("schedule_id")
    out = [f"schedule {sid}  {s.get('workflow_name') or s.get('workflow_id') or ''}".rstrip()]

    def field(label: str, value: Any) -> None:
        out.append(f"  {label:<13}{value}")

    field("definition", f"{s.get('workflow_name') or '-'} ({s.get('workflow_id')})")
    cron = str(s.get("cron_expression"))
    field("cron", cron + (f"  ({s['description']})" if s.get("description") else ""))
    field("timezone", s.get("timezone") or "UTC")
    field("input", _short(s.get("input_data") or {}, 200))
    field("overlap", s.get("overlap") or "skip")
    if s.get("catchup_window") is not None:
        field("catch-up", f"{s['catchup_window']} s")
    field("paused", f"yes (stepd schedule resume {sid})" if s.get("paused") else "no")
    runs = [r for r in s.get("next_runs") or [] if r]
    label = "once resumed" if s.get("paused") else "next runs"
    if not runs:
        field(label, "none")
    for n, when in enumerate(runs):
        field(label if n == 0 else "", _fire_time(when, weekday=True))
    field("last fired", _fire_time(s.get("last_fired_at")))
    if s.get("buffered"):
        field("buffered", f"{s['buffered']} (they start as the running runs end)")
    field("created", f"{_iso_when(s.get('created_at'))} by {s.get('created_by') or '-'}")
    if s.get("updated_at"):
        field("updated", _iso_when(s.get("updated_at")))
    out.append("")
    out.extend(_render_ticks(s.get("ticks") or [], total))
    return out


def _render_ticks(ticks: list[dict[str, Any]], total: int | None = None) -> list[str]:
    if not ticks:
        return ["no ticks yet"]
    rows = [("TICK", "FIRE TIME", "KIND", "OUTCOME", "RUN", "REASON")]
    for t in ticks:
        rows.append((
            str(t.get("id")),
            _fire_time(t.get("fire_time")),
            str(t.get("kind") or "-"),
            str(t.get("outcome") or "-"),
            str(t["run_id"]) if t.get("run_id") is not None else "-",
            _one_line(t.get("reason") or "", 120),
        ))  # fmt: skip
    out = _table(rows)
    if isinstance(total, int) and total > len(ticks):
        out.append(f"({len(ticks)} most recent of {total}; --ticks N for more)")
    return out


def _schedule_input(raw: str | None) -> dict[str, Any]:
    """--input: a JSON object, or @FILE holding one."""
    if raw is None:
        return {}
    if raw.startswith("@"):
        value = _read_json_file(raw[1:])
    else:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CLIError(
                f"--input is not valid JSON: {exc} (a JSON object, or @FILE to read a file)"
            ) from None
    if not isinstance(value, dict):
        raise CLIError('--input must be a JSON object, e.g. \'{"dataset": "daily"}\'')
    return value


def cmd_schedule_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"cron_expression": args.cron, "input_data": _schedule_input(args.input)}
    if args.tz is not None:
        body["timezone"] = args.tz
    if args.overlap is not None:
        body["overlap"] = args.overlap
    if args.catchup is not None:
        body["catchup_window"] = args.catchup
    if args.paused:
        body["paused"] = True
    answer = Client().call("POST", _def_path(args.ref, "/schedules"), body)
    if args.json:
        _print(answer)
        return 0
    schedule = _unwrap(answer, "schedule") if isinstance(answer, dict) else {}
    sid = answer.get("schedule_id", schedule.get("schedule_id"))
    for line in _render_added(sid, schedule, args.ref):
        print(line)
    return 0


def _render_added(sid: Any, s: dict[str, Any], ref: str) -> list[str]:
    name = s.get("workflow_name") or ref
    what = f"{s.get('cron_expression')} {s.get('timezone') or 'UTC'}"
    if s.get("description"):
        what += f" ({s['description']})"
    out = [f"added schedule {sid} to {name}: {what}"]
    if s.get("paused"):
        out.append(f"paused: stepd schedule resume {sid}; then it fires at")
    else:
        out.append("next runs:")
    runs = [r for r in s.get("next_runs") or [] if r]
    out += [f"  {_fire_time(r, weekday=True)}" for r in runs] or ["  none"]
    return out


def cmd_schedule_pause(args: argparse.Namespace) -> int:
    s = Client().call("PATCH", _schedule_path(args.sid), {"paused": args.paused})
    s = s if isinstance(s, dict) else {}
    name = s.get("workflow_name")
    head = f"{'paused' if args.paused else 'resumed'} schedule {args.sid}"
    head += f" ({name})" if name else ""
    if not args.paused:
        head += f": next run {_fire_time(s.get('next_run'))}"
    print(head)
    return 0


def cmd_schedule_trigger(args: argparse.Namespace) -> int:
    answer = Client().call("POST", _schedule_path(args.sid, "/trigger"))
    if args.json:
        _print(answer)
        return 0
    print(_trigger_line(answer if isinstance(answer, dict) else {}))
    return 0


def _trigger_line(answer: dict[str, Any]) -> str:
    """`fired: run 123 (stepd show 123)`, `buffered: ...`, `skipped: <why>`."""
    outcome = str(answer.get("outcome") or "?")
    run_id = answer.get("run_id")
    parts = [f"run {run_id} (stepd show {run_id})"] if run_id is not None else []
    if answer.get("reason"):
        parts.append(_one_line(answer["reason"]))
    elif outcome == "buffered" and run_id is None:
        parts.append("it starts when the running one ends")
    return outcome + (": " + "; ".join(parts) if parts else "")


def cmd_schedule_backfill(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"start": args.start, "end": args.end}
    if args.overlap is not None:
        body["overlap"] = args.overlap
    answer = Client().call("POST", _schedule_path(args.sid, "/backfill"), body)
    if args.json:
        _print(answer)
        return 0
    for line in _render_backfill(answer if isinstance(answer, dict) else {}):
        print(line)
    return 0


def _render_backfill(answer: dict[str, Any]) -> list[str]:
    n = answer.get("fire_times", 0)
    counts = ", ".join(f"{answer.get(k, 0)} {k}" for k in ("fired", "buffered", "skipped"))
    out = [f"{n} fire time{'s' if n != 1 else ''}: {counts}"]
    reasons: dict[str, int] = {}
    for t in answer.get("ticks") or []:
        if isinstance(t, dict) and t.get("outcome") == "skipped":
            why = _one_line(t.get("reason") or "no reason given", 120)
            reasons[why] = reasons.get(why, 0) + 1
    out += [f"  skipped {count}: {why}" for why, count in reasons.items()]
    return out


def cmd_schedule_rm(args: argparse.Namespace) -> int:
    Client().call("DELETE", _schedule_path(args.sid))
    print(f"deleted schedule {args.sid}")
    return 0
