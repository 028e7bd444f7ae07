"""Big JSON never holds the event loop: a workflow page of big results, and the http tool
parsing a big body or reading one sent in tiny chunks."""

from __future__ import annotations

import asyncio
import http.server
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from daemon import egress
from daemon.tools import builtin
from daemon.web import pages
from tests.helpers import Watch
from tests.test_web import sign_in

DICTS = 330_000  # `{}` items: about 1 MB of JSON


async def test_a_page_of_30_mb_of_results_is_cut_without_holding_the_loop(make_client):
    client, app = await make_client(max_body_bytes=2 * 2**20)
    flow: dict[str, Any] = {
        ("start" if i == 0 else f"s{i}"): {"tool": "echo", "args": {"v": "{{input.x}}"},
                                           "next": f"s{i + 1}"}
        for i in range(30)
    }  # fmt: skip
    flow["s30"] = {"tool": "echo", "args": {}, "done": True}
    body = orjson.dumps({"name": "big", "flow": flow, "input": {"x": [{}] * DICTS}})
    resp = await client.post(
        "/api/workflow", content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    for _ in range(1200):  # the list, not the 30 MB workflow, while it runs
        listed = (await client.get("/api/workflow")).json()
        if next(w for w in listed if w["id"] == wf_id)["status"] != "running":
            break
        await asyncio.sleep(0.05)
    listed = (await client.get("/api/workflow")).json()
    assert next(w for w in listed if w["id"] == wf_id)["status"] == "completed"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as web:
        await sign_in(web, "james")
        async with Watch() as watch:
            page = await web.get(f"/ui/workflows/{wf_id}")
    assert page.status_code == 200
    assert watch.lag < 0.25, f"the page held the event loop for {watch.lag * 1000:.0f} ms"
    assert page.text.count("more characters") == 30  # every result, cut from its text
    assert "more bytes" in page.text  # the input too
    assert len(page.content) < 2 * 2**20


def test_pretty_cuts_long_values_before_parsing_them():
    long = orjson.dumps([{}] * 20_000).decode()  # 60,000 characters
    shown = pages.pretty(long)
    assert (
        shown
        == long[: pages.PRETTY_LIMIT] + f"\n… {len(long) - pages.PRETTY_LIMIT} more characters"
    )
    fragment = orjson.Fragment(long)
    assert pages.pretty(fragment).endswith(f"{len(long) - pages.PRETTY_LIMIT} more bytes")
    assert pages.pretty('{"a":1}') == '{\n  "a": 1\n}'  # short ones are still indented
    assert pages.is_empty_json(orjson.Fragment("{}")) and pages.is_empty_json("null")
    assert not pages.is_empty_json(long) and not pages.is_empty_json('{"a":1}')
    # Not valid JSON though it looks like it: shown as it is, never an error.
    assert pages.pretty("[" * 3000) == "[" * 3000


# -- the http tool --------------------------------------------------------------------------


class _Bodies(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = {
            "/dicts": b"[" + b",".join([b"{}"] * DICTS) + b"]",
            "/nan": b"[NaN, Infinity, -Infinity]",
            "/huge": b"[1e999]",
        }[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bodies() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bodies)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


CHUNKS = 100_000  # one byte each
# A server in a process of its own (in a thread here, it would hold this process's GIL
# and blur what is measured): every answer is CHUNKS chunks of one byte.
CHUNK_SERVER = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
srv.settimeout(60)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        head = b""
        while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
            head += data
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"1\r\nx\r\n" * 10_000
        for _ in range(int(sys.argv[1]) // 10_000):
            conn.sendall(block)
        conn.sendall(b"0\r\n\r\n")
"""


@pytest.fixture
def chunks() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHUNK_SERVER, str(CHUNKS)],
                            stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}/"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_the_http_tool_parses_a_1_mb_json_body(bodies):
    async with Watch() as watch:
        out = await builtin.http(f"{bodies}/dicts")
    assert out["json"] == [{}] * DICTS
    assert watch.lag < 0.5, f"the event loop waited {watch.lag * 1000:.0f} ms"


@pytest.mark.parametrize(
    ("path", "text"),
    [("/nan", "[NaN, Infinity, -Infinity]"), ("/huge", "[1e999]")],
)
async def test_a_body_that_is_not_strict_json_is_text(bodies, path, text):
    out = await builtin.http(f"{bodies}{path}")
    assert out["text"] == text and "json" not in out


async def test_a_body_of_one_byte_chunks_does_not_hold_the_loop(chunks):
    async with Watch() as watch:
        out = await builtin.http(chunks, timeout=60)
    assert out["text"] == "x" * CHUNKS
    assert watch.lag < 0.1, f"reading held the event loop for {watch.lag * 1000:.0f} ms"


def test_an_http_client_does_not_load_the_ca_bundle_again(monkeypatch):
    # Loading it takes ~25 ms of the event loop; the process loads it once.
    egress.client(egress.Policy())
    loads: list[Any] = []
    load = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args)
        load(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    egress.client(egress.Policy())
    assert loads == []
