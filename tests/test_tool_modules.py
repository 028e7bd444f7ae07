"""Custom tool modules: found beside the config, one-line errors when they do not load,
tracebacks of failing tools in the log, and arguments checked against annotations."""

from __future__ import annotations

import logging
import subprocess
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import orjson
import pytest

from daemon.tools import make_tool
from tests.helpers import wait_for
from tests.process_helpers import (
    Daemon,
    clean_env,
    create,
    free_port,
    stepd_command,
    write_config,
)
from tests.process_helpers import (
    wait_for as wait_for_process,
)

if TYPE_CHECKING:  # not importable at run time: such an annotation is not checked
    from daemon.tools import ToolContext


def _write(directory: Path, **modules: str) -> None:
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source))


SHOUT = """\
    from helper import loud
    from daemon.tools import tool

    @tool
    def shout(text: str) -> str:
        return loud(text)
"""


def test_a_module_beside_the_config_is_loaded(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    _write(conf_dir, mytools=SHOUT, helper="def loud(text):\n    return text.upper() + '!'\n")
    port = free_port()
    cfg = write_config(conf_dir / "stepd.toml", port=port, db=tmp_path / "stepd.db",
                       modules=("mytools",))  # fmt: skip
    workdir = tmp_path / "run"  # started elsewhere: the config's directory is what counts
    workdir.mkdir()
    daemon = Daemon(workdir, cfg, port)
    try:
        daemon.started()
        with daemon.client() as c:
            body = {"name": "s", "flow": {"start": {"tool": "shout", "args": {"text": "hi"},
                                                    "done": True}}}  # fmt: skip
            wf = wait_for_process(c, create(c, body))
            assert wf["status"] == "completed", wf
            assert orjson.loads(wf["steps"][0]["result_json"]) == "HI!"
        assert daemon.stop() == 0
    finally:
        daemon.kill()


TOOL = "from daemon.tools import tool\n\n@tool\ndef {name}() -> int:\n    return 1\n"


@pytest.mark.parametrize(
    ("modules", "sources", "expected"),
    [
        (["nosuch"], {},
         "[tools] modules: no module named 'nosuch' (searched the config's directory {dir} "
         "and the Python path)"),
        (["broken"], {"broken": "x = 1\ny = 1 / 0\n"},
         "[tools] modules: importing 'broken' failed: ZeroDivisionError: division by zero "
         "({dir}/broken.py, line 2)"),
        (["typo"], {"typo": "def f(:\n    pass\n"},
         "[tools] modules: importing 'typo' failed: SyntaxError: invalid syntax "
         "({dir}/typo.py, line 1)"),
        (["needsdep"], {"needsdep": "import nosuchdep\n"},
         "[tools] modules: importing 'needsdep' failed: ModuleNotFoundError: No module named "
         "'nosuchdep' ({dir}/needsdep.py, line 1)"),
        (["empty"], {"empty": "X = 1\n"},
         "[tools] modules: 'empty' ({dir}/empty.py) defines no @tool functions"),
        (["one", "two"], {"one": TOOL.format(name="twice"), "two": TOOL.format(name="twice")},
         "tool 'twice' is defined twice: by one.twice and by two.twice"),
        (["mine"], {"mine": TOOL.format(name="echo")},
         "tool 'echo' is defined twice: by daemon.tools.builtin.echo and by mine.echo"),
    ],
    ids=["missing", "raises", "syntax", "dependency", "no-tools", "duplicate", "builtin-name"],
)  # fmt: skip
def test_a_module_that_does_not_load_is_one_line_and_exit_1(
    tmp_path: Path, modules: list[str], sources: dict[str, str], expected: str
) -> None:
    _write(tmp_path, **sources)
    cfg = write_config(tmp_path / "stepd.toml", port=free_port(), db=tmp_path / "stepd.db",
                       modules=tuple(modules))  # fmt: skip
    done = subprocess.run(
        [*stepd_command(), "serve", "--config", str(cfg)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "active tokens" not in ln]
    assert lines == [f"stepd: {expected.format(dir=tmp_path)}"], done.stderr


# -- failing tools in the log ---------------------------------------------------------------


async def test_an_unexpected_exception_logs_its_traceback(make_client, caplog) -> None:
    client, _ = await make_client()
    caplog.set_level(logging.WARNING, logger="stepd.executor")
    flaky = {"name": "f", "flow": {"start": {"tool": "flaky", "args": {"fail_times": 1},
                                             "done": True}}}  # fmt: skip
    tool_error = {"name": "t", "flow": {"start": {"tool": "fail", "args": {"retryable": False},
                                                  "done": True}}}  # fmt: skip
    for body in (flaky, tool_error):
        wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
        assert wf["status"] == "failed"
    failed = [r for r in caplog.records if r.getMessage().startswith("step failed")]
    unexpected = [r for r in failed if "RuntimeError" in r.getMessage()]
    expected = [r for r in failed if "boom" in r.getMessage()]
    assert len(unexpected) == 1 and len(expected) == 1, [r.getMessage() for r in failed]
    assert unexpected[0].exc_info is not None
    text = logging.Formatter().formatException(unexpected[0].exc_info)
    assert "sample_tools.py" in text and "flaky failure on attempt 1" in text
    assert expected[0].exc_info is None  # a ToolError is the tool's own, expected message


# -- arguments against annotations ----------------------------------------------------------


def typed(
    s: str,
    i: int,
    f: float,
    b: bool,
    items: list[str],
    mapping: dict[str, int],
    maybe: Optional[int],  # noqa: UP045 - the old spelling is checked too
    either: int | str | None,
    anything: Any,
    bare,
    ctx_like: ToolContext | None = None,
    unknown: NotImportable = None,  # type: ignore[name-defined]  # noqa: F821
) -> None:
    """Every kind of annotation; this module's annotations are strings."""


GOOD = {"s": "x", "i": 1, "f": 1, "b": False, "items": [], "mapping": {}, "maybe": None,
        "either": "x", "anything": object(), "bare": (1,), "ctx_like": 5, "unknown": 5}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("s", 1, "must be str, got int"),
        ("i", True, "must be int, got bool"),
        ("i", 1.0, "must be int, got float"),
        ("f", True, "must be float, got bool"),
        ("f", "1.5", "must be float, got str"),
        ("b", 0, "must be bool, got int"),
        ("items", {"a": 1}, "must be list, got dict"),
        ("mapping", [], "must be dict, got list"),
        ("maybe", "3", "must be int | None, got str"),
        ("either", 1.5, "must be int | str | None, got float"),
    ],
)
def test_arguments_are_checked_against_annotations(name: str, value: Any, problem: str) -> None:
    spec = make_tool("typed", typed)
    assert spec.check_args(GOOD) == []
    assert spec.check_args({**GOOD, "f": 2.5, "maybe": 3, "either": 3}) == []
    assert spec.check_args({**GOOD, name: value}) == [f"argument '{name}' {problem}"]
    assert spec.check_args({**GOOD, name: value}, later=[name]) == []


def test_the_tools_listing_keeps_the_annotation_text() -> None:
    params = make_tool("typed", typed).describe()["parameters"]
    assert [p["type"] for p in params[:4]] == ["str", "int", "float", "bool"]
    assert params[8]["type"] == "Any" and params[9]["type"] is None


async def test_literal_arguments_are_checked_at_create_templated_ones_at_run_time(
    make_client,
) -> None:
    client, _ = await make_client()

    def flow(args: dict[str, Any], **state: Any) -> dict[str, Any]:
        start = {"tool": "charge", "args": args, "done": True, **state}
        return {"name": "c", "flow": {"start": start}, "input": {"n": "12", "m": 12}}

    resp = await client.post("/api/workflow", json=flow({"amount": "12"}))
    assert resp.status_code == 422
    assert "state 'start': tool 'charge': argument 'amount' must be int, got str" in resp.text
    resp = await client.post("/api/workflow/validate", json=flow({"amount": True}))
    assert resp.json()["errors"] == [
        "state 'start': tool 'charge': argument 'amount' must be int, got bool"
    ]

    body = flow({"amount": "{{input.n}}"}, retry={"max_attempts": 3})
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    wf = await wait_for(client, resp.json()["id"])
    step = wf["steps"][0]
    assert wf["status"] == "failed" and step["attempt"] == 1
    assert step["error"] == "tool 'charge': argument 'amount' must be int, got str"

    resp = await client.post("/api/workflow", json=flow({"amount": "<<input.m>>"}))
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "completed", wf
    assert orjson.loads(wf["steps"][0]["result_json"])["charged"] == 12
