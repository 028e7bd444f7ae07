"""The `stepd` command: `serve` runs the daemon; the other commands talk to its HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepd", description="Durable workflow executor daemon.")
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
        "--wait", action="store_true", help="wait until it finishes; exit 0 only if it completed"
    )
    s.add_argument("--idempotency-key", help="send an Idempotency-Key header")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("list", help="list workflows, newest first")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--status", choices=["running", "completed", "failed", "cancelled"])
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("watch", help="follow a workflow's events until it ends")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser("show", help="show a workflow with its steps (JSON)")
    s.add_argument("id", type=int)
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
    def __init__(self) -> None:
        self.url = os.environ.get("STEPD_URL", DEFAULT_URL).rstrip("/")
        token = os.environ.get("STEPD_TOKEN") or os.environ.get("TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def call(
        self, method: str, path: str, body: Any = NO_BODY, headers: dict[str, str] | None = None
    ) -> Any:
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if body is not NO_BODY:
            kwargs["content"] = orjson.dumps(body)
            kwargs["headers"]["Content-Type"] = "application/json"
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
            data = None
        if resp.status_code >= 400:
            msg = data.get("error") if isinstance(data, dict) else resp.text.strip()
            hint = " (set STEPD_TOKEN)" if resp.status_code == 401 else ""
            raise CLIError(f"{resp.status_code}: {msg}{hint}")
        return data


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
    if not args.wait:
        _print(created)
        return 0
    wf_id = created["id"]
    print(f"workflow {wf_id} started; waiting...", file=sys.stderr)
    announced: set[int] = set()
    while True:
        wf = client.call("GET", f"/api/workflow/{wf_id}")
        if wf["status"] in TERMINAL:
            _print(wf)
            return 0 if wf["status"] == "completed" else 1
        for step in wf["steps"]:
            if step["awaiting"] == "ready" and step["id"] not in announced:
                announced.add(step["id"])
                print(
                    f"step {step['id']} ({step['name']}) awaits approval: stepd ready {step['id']}",
                    file=sys.stderr,
                )
        time.sleep(0.2)


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
    "cancelled": "●",
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
                        return WATCH_EXIT[event["type"]]
            wf = client.call("GET", f"/api/workflow/{args.id}")  # the stream ended early
            if wf["status"] in WATCH_EXIT:
                print(f"● {wf['status']}", flush=True)
                return WATCH_EXIT[wf["status"]]
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
    label = f" {step}" if step else ""
    return f"{when} {MARKS.get(kind, '·')} {kind}{label}{detail}"


def cmd_show(args: argparse.Namespace) -> int:
    _print(Client().call("GET", f"/api/workflow/{args.id}"))
    return 0


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


def cmd_validate(args: argparse.Namespace) -> int:
    body = _body_from_file(args)
    result = Client().call("POST", "/api/workflow/validate", body)
    for e in result["errors"]:
        print(f"error: {e}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print("valid" if result["valid"] else "invalid")
    return 0 if result["valid"] else 1
