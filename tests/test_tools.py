"""The tool registry, entry-point discovery and the built-in tools."""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.tools import Registry, ToolError, build_registry, make_tool, tool
from daemon.tools import builtin as builtin_tools


def test_make_tool_describes_parameters():
    async def search(query: str, limit: int = 5, *, ctx) -> list:
        """Search things.

        Longer text that is not part of the description."""
        return []

    t = make_tool("search", search)
    assert t.is_async and t.takes_ctx and not t.takes_any
    assert t.describe()["description"] == "Search things."
    assert t.describe()["parameters"] == [
        {"name": "query", "required": True, "type": "str"},
        {"name": "limit", "required": False, "type": "int", "default": 5},
    ]
    assert t.check_args({"query": "x"}) == []
    assert t.check_args({"limit": 1, "q": "x"}) == [
        "unknown argument 'q'",
        "missing required argument 'query'",
    ]


def test_registry_rejects_a_name_registered_twice():
    reg = Registry()
    reg.add("a", lambda: 1)
    with pytest.raises(ConfigError, match="tool 'a' is defined twice: by tests.test_tools"):
        reg.add("a", lambda: 2)


def test_decorator_forms():
    @tool("renamed", idempotent=False)
    def f() -> int:
        return 1

    @tool
    def g() -> int:
        return 2

    mod = type(sys)("fake_tools_mod")
    mod.f, mod.g = f, g
    reg = Registry()
    assert reg.add_module(mod) == 2
    assert reg.names() == ["g", "renamed"]
    assert reg.get("renamed").idempotent is False  # type: ignore[union-attr]


def test_config_module_without_tools_is_an_error():
    with pytest.raises(ConfigError, match=r"'json' \(.*json/__init__.py\) defines no @tool"):
        build_registry(["json"], use_entry_points=False)


@pytest.fixture
def entry_point_dist(tmp_path: Path) -> Iterator[None]:
    """An installed distribution that publishes tools through the stepd.tools group."""
    (tmp_path / "ep_tools.py").write_text(
        "from daemon.tools import tool\n\n"
        "def shout(text: str) -> str:\n    return text.upper()\n\n"
        "@tool\ndef whisper(text: str) -> str:\n    return text.lower()\n"
    )
    info = tmp_path / "ep_tools-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-tools\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[stepd.tools]\nshout = ep_tools:shout\nwhole_module = ep_tools\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ep_tools", None)


def test_entry_point_group_registers_callables_and_modules(entry_point_dist):
    assert any(ep.name == "shout" for ep in metadata.entry_points(group="stepd.tools"))
    reg = build_registry([])
    assert "shout" in reg and "whisper" in reg
    assert reg.get("shout").fn("hi") == "HI"  # type: ignore[union-attr]
    assert {"echo", "sleep", "http"} <= set(reg.names())


async def test_echo_and_sleep():
    assert await builtin_tools.echo(a=1, b=[2]) == {"a": 1, "b": [2]}
    assert await builtin_tools.sleep(0.01) == {"slept": 0.01}
    with pytest.raises(ToolError) as info:
        await builtin_tools.sleep(-1)
    assert info.value.retryable is False
    for too_long in (1e9, 366 * 86400 + 1, float("inf"), float("nan")):
        with pytest.raises(ToolError, match="at most 31622400") as info:
            await asyncio.wait_for(builtin_tools.sleep(too_long), timeout=1)
        assert info.value.retryable is False
    task = asyncio.create_task(builtin_tools.sleep(30))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        routes = {
            "/json": (200, "application/json", json.dumps({"ok": True})),
            "/text": (200, "text/plain", "plain words"),
            "/missing": (404, "application/json", json.dumps({"error": "nope"})),
            "/broken": (500, "text/plain", "oops"),
            "/busy": (429, "text/plain", "slow down"),
        }
        status, ctype, body = routes.get(self.path, (404, "text/plain", ""))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("X-Seen-Header", self.headers.get("X-Test", ""))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length).decode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"got": json.loads(body)}).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_http_tool_json_text_and_post(http_server):
    out = await builtin_tools.http(f"{http_server}/json", headers={"X-Test": "yes"})
    assert out["status"] == 200 and out["json"] == {"ok": True}
    assert out["headers"]["x-seen-header"] == "yes"
    out = await builtin_tools.http(f"{http_server}/text")
    assert out["text"] == "plain words" and "json" not in out
    out = await builtin_tools.http(f"{http_server}/post", method="post", json={"a": 1})
    assert out["status"] == 201 and out["json"] == {"got": {"a": 1}}


@pytest.mark.parametrize(("path", "retryable"), [("/missing", False), ("/broken", True),
                                                 ("/busy", True)])  # fmt: skip
async def test_http_tool_errors(http_server, path, retryable):
    with pytest.raises(ToolError) as info:
        await builtin_tools.http(f"{http_server}{path}")
    assert info.value.retryable is retryable
    assert path in str(info.value)


async def test_http_tool_rejects_bad_arguments():
    for kwargs in ({"url": "file:///etc/passwd"}, {"url": "http://x", "method": "BREW"},
                   {"url": "http://x", "json": {}, "body": "x"}):  # fmt: skip
        with pytest.raises(ToolError) as info:
            await builtin_tools.http(**kwargs)
        assert info.value.retryable is False


async def test_http_tool_connection_failure_is_retryable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ToolError) as info:
        await builtin_tools.http(f"http://127.0.0.1:{port}/", timeout=2)
    assert info.value.retryable is True
