"""Log output: text lines for people, JSON lines for pipelines; step lines carry the step.

The in-process tests install the handler on a StringIO and take it away again; the last
test runs the real `stepd serve` with log_format = "json" and reads its stderr.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon import config as configuration
from daemon import logs
from daemon.api import create_app
from daemon.errors import ConfigError
from tests import process_helpers as ph
from tests.helpers import auth, make_config, wait_for

STEP = {"workflow_id": 1795601340941, "step_id": 1795601340942, "state": "start", "attempt": 2}
# A step whose arguments name an undefined variable: it fails at run time, and the
# executor logs that with the step's fields.
BROKEN = {
    "name": "broken",
    "flow": {"start": {"tool": "echo", "args": {"x": "<<input.nope>>"}, "done": True}},
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo logs.setup: the root logger's handlers and level, and uvicorn's loggers."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    loggers = [logging.getLogger(name) for name in logs.UVICORN_LOGGERS]
    saved_uvicorn = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    yield
    for handler in list(root.handlers):
        if handler.get_name() == logs.HANDLER_NAME and handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])
    for lg, handlers, propagate in saved_uvicorn:
        lg.handlers[:] = handlers
        lg.propagate = propagate


def capture(log_format: str, level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    logs.setup(level, log_format, stream=stream)
    return stream


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line]


def test_json_lines_carry_the_step_fields_and_the_exception(restore_logging):
    stream = capture("json")
    log = logging.getLogger("stepd.executor")
    log.warning("step failed: %s", "boom", extra=STEP)
    try:
        raise RuntimeError("multi\nline")
    except RuntimeError:
        log.exception("step crashed", extra=STEP)
    logging.getLogger("stepd.api").debug("below the level: not written")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # a traceback stays inside its line
    first, second = (orjson.loads(line) for line in lines)
    assert first == {
        "ts": first["ts"],
        "level": "warning",
        "logger": "stepd.executor",
        "message": "step failed: boom",
        **STEP,
    }
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert second["level"] == "error" and second["message"] == "step crashed"
    assert second["exception"].startswith("Traceback")
    assert "RuntimeError: multi\nline" in second["exception"]
    assert {k: second[k] for k in STEP} == STEP


def test_json_keeps_other_extras_and_encodes_anything(restore_logging):
    stream = capture("json")
    logging.getLogger("stepd.notify").info(
        "delivered", extra={"url": "https://x", "path": Path("/p"), "ts": "not ours"}
    )
    (line,) = json_lines(stream.getvalue())
    assert line["url"] == "https://x" and line["path"] == "/p"
    assert line["ts"] != "not ours"  # the record's own fields win


def test_text_lines_show_the_step_fields_and_no_timestamp(restore_logging):
    stream = capture("text")
    log = logging.getLogger("stepd.executor")
    log.warning("step failed: %s", "boom", extra=STEP)
    log.info("gate waiting", extra={**STEP, "state": "needs review"})
    logging.getLogger("stepd").info("stepd listening on http://127.0.0.1:8000")

    assert stream.getvalue().splitlines() == [
        "WARNING stepd.executor: step failed: boom "
        "workflow_id=1795601340941 step_id=1795601340942 state=start attempt=2",
        "INFO stepd.executor: gate waiting "
        'workflow_id=1795601340941 step_id=1795601340942 state="needs review" attempt=2',
        "INFO stepd: stepd listening on http://127.0.0.1:8000",
    ]


def test_text_puts_the_traceback_after_the_fields(restore_logging):
    stream = capture("text")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("stepd.executor").exception("step crashed", extra=STEP)
    first, *rest = stream.getvalue().splitlines()
    assert first.startswith("ERROR stepd.executor: step crashed workflow_id=")
    assert first.endswith("attempt=2")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: bad"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_uvicorn_lines_follow_the_format(restore_logging, log_format):
    # uvicorn's default logging config gives its loggers handlers of their own.
    own = io.StringIO()
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(own))
    logging.getLogger("uvicorn").propagate = False
    stream = capture(log_format)
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]", 42, extra={"color_message": "\x1b[36m42\x1b[0m"}
    )
    assert own.getvalue() == ""
    line = stream.getvalue().strip()
    if log_format == "json":
        assert orjson.loads(line)["logger"] == "uvicorn.error"
        assert orjson.loads(line)["message"] == "Started server process [42]"
        assert "color_message" not in orjson.loads(line)
    else:
        assert line == "INFO uvicorn.error: Started server process [42]"


def test_setup_again_replaces_its_handler(restore_logging):
    first = capture("text")
    second = capture("json")
    logging.getLogger("stepd").warning("once")
    assert first.getvalue() == ""
    assert json_lines(second.getvalue())[0]["message"] == "once"


@asynccontextmanager
async def serving(tmp_path: Path, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan, and a client with a workflow token."""
    app = create_app(make_config(tmp_path, **config))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://stepd", headers=auth()
        ) as client:
            yield client


async def test_the_executor_logs_a_failed_step_with_its_fields(tmp_path, restore_logging):
    stream = capture("json")
    async with serving(tmp_path) as client:
        created = await client.post("/api/workflow", json=BROKEN)
        wf = await wait_for(client, created.json()["id"])
    failed = [line for line in json_lines(stream.getvalue()) if "step_id" in line]
    assert failed, stream.getvalue()
    assert failed[0]["logger"] == "stepd.executor"
    assert failed[0]["message"].startswith("step failed: args: undefined")
    step = wf["steps"][0]
    fields = {"workflow_id": wf["id"], "step_id": step["id"], "state": "start", "attempt": 1}
    assert {k: failed[0][k] for k in fields} == fields


async def test_a_failed_step_says_what_happens_next(tmp_path, restore_logging):
    # Retried, then handed to on_error; and in another workflow, failed for good.
    stream = capture("json")
    flaky_then_on_error = {
        "name": "retry-then-recover",
        "flow": {
            "start": {"tool": "fail", "args": {"message": "boom"},
                      "retry": {"max_attempts": 2, "backoff_s": 0.01},
                      "on_error": "recover", "done": True},
            "recover": {"tool": "echo", "done": True},
        },
    }  # fmt: skip
    async with serving(tmp_path, tool_modules=("tests.sample_tools",)) as client:
        first = await client.post("/api/workflow", json=flaky_then_on_error)
        assert (await wait_for(client, first.json()["id"]))["status"] == "completed"
        second = await client.post("/api/workflow", json=BROKEN)
        assert (await wait_for(client, second.json()["id"]))["status"] == "failed"
    failed = [line for line in json_lines(stream.getvalue()) if line.get("step_id")
              and line["message"].startswith("step failed")]  # fmt: skip
    assert [line["attempt"] for line in failed] == [1, 2, 1]
    assert re.fullmatch(r"step failed: boom; retrying in 0\.0\d+s", failed[0]["message"])
    assert failed[1]["message"] == "step failed: boom; next: recover"
    assert failed[2]["message"].startswith("step failed: args: undefined")
    assert failed[2]["message"].endswith("; the workflow fails")
    assert failed[2]["workflow_id"] == second.json()["id"]


async def test_a_tools_own_log_lines_carry_the_step_fields(tmp_path, restore_logging):
    stream = capture("json")
    body = {"name": "chatty", "flow": {"start": {"tool": "chatty", "args": {}, "done": True}}}
    async with serving(tmp_path, tool_modules=("tests.sample_tools",)) as client:
        created = await client.post("/api/workflow", json=body)
        wf = await wait_for(client, created.json()["id"])
    lines = {x["message"]: x for x in json_lines(stream.getvalue())}
    line, part = lines["hello from a tool"], lines["hello from a part"]
    step = wf["steps"][0]
    assert line["logger"] == "stepd.tool.chatty" and line["rows"] == 5  # its own extra too
    assert part["logger"] == "stepd.tool.chatty.part"
    fields = {"workflow_id": wf["id"], "step_id": step["id"], "state": "start", "attempt": 1}
    assert {k: line[k] for k in fields} == fields == {k: part[k] for k in fields}


async def test_gates_log_when_they_start_waiting(tmp_path, restore_logging):
    # A gate as the first state, and one after a tool step: both are written waiting.
    stream = capture("json")
    flow = {"start": {"tool": None, "next": "work"},
            "work": {"tool": "echo", "args": {}, "next": "check"},
            "check": {"tool": None, "done": True}}  # fmt: skip
    async with serving(tmp_path) as client:
        created = await client.post("/api/workflow", json={"name": "g", "flow": flow})
        wf_id = created.json()["id"]
        wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "ready")
        await client.post(f"/api/workflow/{wf['steps'][0]['id']}/ready")
        wf = await wait_for(client, wf_id, lambda w: len(w["steps"]) == 3)
    waiting = [line for line in json_lines(stream.getvalue()) if line["message"] == "gate waiting"]
    expected = [
        {"workflow_id": wf_id, "step_id": wf["steps"][i]["id"], "state": state, "attempt": 1}
        for i, state in ((0, "start"), (2, "check"))
    ]
    assert [{k: line[k] for k in expected[0]} for line in waiting] == expected


def test_retry_delays_read_as_plain_seconds():
    from daemon.executor import _duration

    got = [_duration(x) for x in (0.0083, 0.5, 1.84, 12.345, 1234.5, 86400.0)]
    assert got == ["0.0083s", "0.5s", "1.84s", "12.3s", "1234s", "86400s"]


def test_log_format_is_checked():
    assert configuration.from_dict({}).log_format == "text"
    assert configuration.from_dict({"server": {"log_format": "json"}}).log_format == "json"
    with pytest.raises(ConfigError, match=r'\[server\] log_format must be "text" or "json"'):
        configuration.from_dict({"server": {"log_format": "xml"}})
    with pytest.raises(ValueError, match="log_format"):
        logs.formatter("JSON")


def test_stepd_serve_writes_json_lines(tmp_path):
    port = ph.free_port()
    config = ph.write_config(tmp_path / "stepd.toml", port=port, db=tmp_path / "stepd.db")
    text = config.read_text().replace("[server]\n", '[server]\nlog_format = "json"\n', 1)
    config.write_text(text)
    daemon = ph.Daemon(tmp_path, config, port)
    try:
        daemon.started()
        with daemon.client() as client:
            wf = ph.wait_for(client, ph.create(client, BROKEN))
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    lines = json_lines(daemon.stderr())
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines), lines
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "stepd", "stepd.executor"} <= loggers, loggers
    (failed,) = [line for line in lines if line["logger"] == "stepd.executor"]
    assert failed["level"] == "warning"
    assert (failed["workflow_id"], failed["step_id"]) == (wf["id"], wf["steps"][0]["id"])
    assert (failed["state"], failed["attempt"]) == ("start", 1)
