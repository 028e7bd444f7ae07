"""The egress policy: the matching rule, config, and the http tool against loopback servers.

Only 127.0.0.0/8 is ever connected to. Denied addresses are loopback addresses that a
test's policy denies; for built-in denials the decision is asserted and a guard makes
sure no connection is attempted.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpcore
import orjson
import pytest
import trustme

from daemon import config, egress
from daemon.errors import ConfigError
from daemon.tools import ToolContext, ToolError
from daemon.tools import builtin as builtin_tools
from tests.helpers import Watch, wait_for
from tests.loopback import Server, gzip_bomb, serving

# --- the matching rule ------------------------------------------------------------------

RULES = egress.Policy(
    allow=["10.1.0.0/16", "10.1.2.3", "169.254.10.0/24", "169.254.169.254", "fd00::/8",
           "192.168.1.0/24"],
    deny=["10.0.0.0/8", "10.1.2.0/24", "127.0.0.0/8", "::1", "fc00::/7", "192.168.1.0/24"],
)  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "address", "allowed", "rule"),
    [
        # Nothing matches: allowed.
        (egress.Policy(), "93.184.215.14", True, None),
        (egress.Policy(), "2001:db8::1", True, None),
        (egress.Policy(), "127.0.0.1", True, None),
        # Built-in denials.
        (egress.Policy(), "169.254.1.1", False, "built-in deny 169.254.0.0/16 (link-local)"),
        (egress.Policy(), "fe80::1", False, "built-in deny fe80::/10 (link-local)"),
        (egress.Policy(), "224.0.0.251", False, "built-in deny 224.0.0.0/4 (multicast)"),
        (egress.Policy(), "ff02::1", False, "built-in deny ff00::/8 (multicast)"),
        (egress.Policy(), "0.0.0.0", False, "built-in deny 0.0.0.0/8 (unspecified)"),
        (egress.Policy(), "0.1.2.3", False, "built-in deny 0.0.0.0/8 (unspecified)"),
        (egress.Policy(), "::", False, "built-in deny ::/128 (unspecified)"),
        (egress.Policy(), "169.254.169.254", False,
         "built-in deny 169.254.169.254/32 (cloud metadata)"),
        (egress.Policy(), "100.100.100.200", False,
         "built-in deny 100.100.100.200/32 (cloud metadata)"),
        (egress.Policy(), "168.63.129.16", False,
         "built-in deny 168.63.129.16/32 (cloud metadata)"),
        (egress.Policy(), "fd00:ec2::254", False,
         "built-in deny fd00:ec2::254/128 (cloud metadata)"),
        (egress.Policy(), "fd20:ce::254", False,
         "built-in deny fd20:ce::254/128 (cloud metadata)"),
        (egress.Policy(), "100.100.100.201", True, None),
        # IPv4-mapped IPv6 is judged as IPv4.
        (egress.Policy(), "::ffff:169.254.169.254", False,
         "built-in deny 169.254.169.254/32 (cloud metadata)"),
        (egress.Policy(), "::ffff:0.0.0.0", False, "built-in deny 0.0.0.0/8 (unspecified)"),
        (RULES, "::ffff:127.0.0.1", False, "[http] deny 127.0.0.0/8"),
        (RULES, "::ffff:10.1.2.3", True, "[http] allow 10.1.2.3/32"),
        # deny adds; allow carves; the longest prefix decides.
        (RULES, "127.0.0.1", False, "[http] deny 127.0.0.0/8"),
        (RULES, "::1", False, "[http] deny ::1/128"),
        (RULES, "10.9.9.9", False, "[http] deny 10.0.0.0/8"),
        (RULES, "10.1.9.9", True, "[http] allow 10.1.0.0/16"),
        (RULES, "10.1.2.4", False, "[http] deny 10.1.2.0/24"),
        (RULES, "10.1.2.3", True, "[http] allow 10.1.2.3/32"),
        (RULES, "fd12::1", True, "[http] allow fd00::/8"),
        (RULES, "fc12::1", False, "[http] deny fc00::/7"),
        (RULES, "169.254.10.7", True, "[http] allow 169.254.10.0/24"),
        (RULES, "169.254.11.7", False, "built-in deny 169.254.0.0/16 (link-local)"),
        # Deny wins a tie: with a built-in entry, and between [http] entries.
        (RULES, "169.254.169.254", False, "built-in deny 169.254.169.254/32 (cloud metadata)"),
        (RULES, "192.168.1.7", False, "[http] deny 192.168.1.0/24"),
        (RULES, "192.168.2.7", True, None),
    ],
)  # fmt: skip
def test_the_most_specific_entry_decides(
    policy: egress.Policy, address: str, allowed: bool, rule: str | None
) -> None:
    decision = policy.decide(address)
    assert decision.allowed is allowed
    assert (None if decision.rule is None else str(decision.rule)) == rule


def test_allowing_only_a_list_of_hosts() -> None:
    policy = egress.Policy(allow=["203.0.113.10", "2001:db8::10"], deny=["0.0.0.0/0", "::/0"])
    assert policy.decide("203.0.113.10").allowed and policy.decide("2001:db8::10").allowed
    for other in ("203.0.113.11", "127.0.0.1", "::1", "2001:db8::11", "::ffff:8.8.8.8"):
        assert not policy.decide(other).allowed, other


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.1", "10.0.0.1/32"),
        ("::1", "::1/128"),
        (" fc00::/7 ", "fc00::/7"),
        ("::ffff:127.0.0.0/104", "127.0.0.0/8"),  # IPv4-mapped: an IPv4 rule
        ("::ffff:10.0.0.1", "10.0.0.1/32"),
    ],
)
def test_parse_network(text: str, network: str) -> None:
    assert egress.parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # decimal
        ("0x7f000001", "127.0.0.1"),  # hex
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("127.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("example.com", None),
        ("cafe", None),
        ("1.2.3.4.5", None),
    ],
)
def test_literal_addresses_are_read_as_the_resolver_reads_them(
    host: str, address: str | None
) -> None:
    found = egress.literal_address(host)
    assert found == (None if address is None else ipaddress.ip_address(address))


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"http": {"deny": ["10.0.0.1/8"]}}, "[http] deny: '10.0.0.1/8' is not an address or CIDR"),
        ({"http": {"allow": ["localhost"]}}, "[http] allow: 'localhost' is not an address"),
        ({"http": {"deny": ["10.0.0.0/33"]}}, "[http] deny: '10.0.0.0/33'"),
        ({"http": {"deny": [10]}}, "[http] deny: entries must be strings"),
        ({"http": {"deny": "10.0.0.0/8"}}, "[http] deny: wrong type str"),
        ({"http": {"block": []}}, "unknown key 'block' in [http]"),
        ({"webhooks": {"url": "http://169.254.169.254/hook"}},
         "[webhooks] url is refused by the egress policy: 169.254.169.254 matches built-in deny"),
        ({"webhooks": {"url": "http://2130706433:9/hook"}, "http": {"deny": ["127.0.0.0/8"]}},
         "refused by the egress policy: 127.0.0.1 matches [http] deny 127.0.0.0/8"),
    ],
)  # fmt: skip
def test_bad_policy_settings_are_refused_at_load(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_dict(data, env={})
    assert needle in str(err.value)


def test_policy_settings_load() -> None:
    cfg = config.from_dict(
        {"http": {"deny": ["127.0.0.0/8", "::1"], "allow": ["127.0.0.5"]},
         "webhooks": {"url": "http://hooks.example/x"}},
        env={},
    )  # fmt: skip
    assert cfg.http_deny == ("127.0.0.0/8", "::1") and cfg.http_allow == ("127.0.0.5",)
    assert not egress.policy(cfg.http_allow, cfg.http_deny).decide("127.0.0.1").allowed


# --- the http tool ----------------------------------------------------------------------


def ctx(tmp_path: Path, *, deny: tuple[str, ...] = (), allow: tuple[str, ...] = (),
        limit: int = 1_048_576) -> ToolContext:  # fmt: skip
    return ToolContext(
        workflow_id=1, step_id=2, state="s", attempt=1, created_by="james", state_dir=tmp_path,
        logger=logging.getLogger("t"), max_result_bytes=limit, egress=egress.Policy(allow, deny),
    )  # fmt: skip


@pytest.fixture
def allowed() -> Iterator[Server]:
    with serving("127.0.0.1") as server:
        yield server


@pytest.fixture
def denied() -> Iterator[Server]:
    with serving("127.0.0.2") as server:
        yield server


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address a connection is opened to; anything outside 127/8 fails the test
    without connecting."""
    seen: list[str] = []
    original = httpcore.AnyIOBackend.connect_tcp

    async def guarded(self: Any, host: str, port: int, **kwargs: Any) -> Any:
        seen.append(host)
        if ipaddress.ip_address(host) not in ipaddress.ip_network("127.0.0.0/8"):
            raise AssertionError(f"a connection to {host} was attempted")
        return await original(self, host, port, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", guarded)
    return seen


async def refused(tmp_path: Path, url: str, **policy: Any) -> str:
    with pytest.raises(ToolError) as err:
        await builtin_tools.http(url, timeout=10, ctx=ctx(tmp_path, **policy))
    assert not err.value.retryable
    return str(err.value)


async def test_denied_addresses_are_refused_before_connecting(
    tmp_path: Path, allowed: Server, denied: Server, connects: list[str]
) -> None:
    deny = ("127.0.0.2", "127.0.0.3/32")
    port = denied.server_address[1]
    message = await refused(tmp_path, f"{denied.base}/json", deny=deny)
    assert f"GET {denied.base}/json: refused by the egress policy: 127.0.0.2 matches " \
           "[http] deny 127.0.0.2/32" in message  # fmt: skip
    # Other spellings of the same address: decimal, hex, octal, short, IPv4-mapped IPv6.
    for host in ("2130706434", "0x7f000002", "0x7f.2", "127.2", "[::ffff:127.0.0.2]"):
        message = await refused(tmp_path, f"http://{host}:{port}/json", deny=deny)
        assert "127.0.0.2 matches [http] deny 127.0.0.2/32" in message, host
    # Dotted octal is refused as a URL before anything resolves it.
    assert "invalid URL" in await refused(tmp_path, f"http://0177.0.0.2:{port}/", deny=deny)
    # A redirect from an allowed server to a denied one: the hop is refused.
    hop = f"{allowed.base}/redirect?to=http://2130706434:{port}/json"
    message = await refused(tmp_path, hop, deny=deny)
    assert "127.0.0.2 matches [http] deny 127.0.0.2/32" in message
    assert len(allowed.requests) == 1  # the redirect itself was allowed
    assert denied.connections == 0 and "127.0.0.2" not in connects
    # The same policy lets the allowed server's answers through, redirects included.
    out = await builtin_tools.http(f"{allowed.base}/redirect?to={allowed.base}/json",
                                   ctx=ctx(tmp_path, deny=deny))  # fmt: skip
    assert out["json"] == {"ok": True, "host": "127.0.0.1"}


async def test_a_name_is_judged_by_the_addresses_it_resolves_to(
    tmp_path: Path, allowed: Server, connects: list[str]
) -> None:
    url = f"http://localhost:{allowed.server_address[1]}/json"
    message = await refused(tmp_path, url, deny=("127.0.0.0/8", "::1"))
    assert "127.0.0.1 matches [http] deny 127.0.0.0/8 (from 'localhost')" in message
    assert allowed.connections == 0 and connects == []
    out = await builtin_tools.http(url, ctx=ctx(tmp_path, deny=("127.0.0.0/8", "::1"),
                                                allow=("127.0.0.1", "::1")))  # fmt: skip
    assert out["json"]["ok"] is True
    assert connects and all(ipaddress.ip_address(a).is_loopback for a in connects)


async def test_metadata_is_denied_by_default_without_connecting(
    tmp_path: Path, connects: list[str]
) -> None:
    urls = [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://2852039166/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://0.0.0.0:8000/",
    ]
    for url in urls:
        message = await refused(tmp_path, url)
        assert "refused by the egress policy" in message and "built-in deny" in message, url
    assert connects == []
    # No ctx (a direct call): the built-in denials still apply.
    with pytest.raises(ToolError, match="cloud metadata"):
        await builtin_tools.http("http://169.254.169.254/")
    assert connects == []


async def test_proxy_variables_are_ignored(
    tmp_path: Path, allowed: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving("127.0.0.3") as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.base)
        out = await builtin_tools.http(f"{allowed.base}/json", ctx=ctx(tmp_path))
        assert out["json"]["host"] == "127.0.0.1"
        await refused(tmp_path, f"{allowed.base}/json", deny=("127.0.0.1",))
        assert proxy.connections == 0


async def test_an_endless_response_stops_at_the_limit(tmp_path: Path, allowed: Server) -> None:
    limit = 1_048_576
    message = await refused(tmp_path, f"{allowed.base}/endless", limit=limit)
    assert f"larger than the result limit of {limit} bytes" in message
    assert "stopped reading" in message
    # The server could write only what the socket buffers took beyond the limit.
    assert allowed.sent < 64 * limit
    message = await refused(tmp_path, f"{allowed.base}/large", limit=limit)
    assert "Content-Length is 419430400; stopped reading" in message


async def test_a_gzip_bomb_stops_at_the_limit_in_bounded_memory(
    tmp_path: Path, allowed: Server
) -> None:
    allowed.bomb = gzip_bomb(256)  # 256 MiB once decoded, about 256 KiB on the wire
    limit = 1_048_576
    tracemalloc.start()
    try:
        message = await refused(tmp_path, f"{allowed.base}/bomb", limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"more than {limit} bytes once decoded" in message
    assert peak < 32 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while reading a bomb"
    out = await builtin_tools.http(f"{allowed.base}/gzip", ctx=ctx(tmp_path))
    assert out["json"] == {"zipped": True}  # a gzip body within the limit is decoded


async def test_encodings_that_cannot_be_bounded_are_refused(tmp_path: Path) -> None:
    from daemon.tools import bounded

    with pytest.raises(bounded.UnsupportedEncoding, match="'br'"):
        bounded.decoders(["br"])
    with pytest.raises(bounded.UnsupportedEncoding):
        bounded.decoders(["gzip"] * 5)
    assert len(bounded.decoders(["identity", "gzip", "deflate"])) == 2


@pytest.fixture
def tls_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """An HTTPS server on 127.0.0.1 with a certificate for "localhost" only, from a CA the
    daemon's TLS context is made to trust."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    monkeypatch.setattr(egress, "_ssl_context", lambda: client_ctx)
    with serving("127.0.0.1") as server:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server_ctx)
        server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
        yield server


async def test_tls_verifies_the_host_name_not_the_address(
    tmp_path: Path, tls_server: Server, connects: list[str]
) -> None:
    port = tls_server.server_address[1]
    out = await builtin_tools.http(f"https://localhost:{port}/json", ctx=ctx(tmp_path))
    assert out["json"]["ok"] is True
    assert "127.0.0.1" in connects  # connected to the checked address, verified the name
    with pytest.raises(ToolError, match="CERTIFICATE_VERIFY_FAILED"):
        await builtin_tools.http(f"https://127.0.0.1:{port}/json", ctx=ctx(tmp_path))


async def test_a_refused_request_fails_the_step_at_once(make_client: Any, denied: Server) -> None:
    client, _ = await make_client(http_deny=("127.0.0.2",))
    flow = {"start": {"tool": "http", "args": {"url": f"{denied.base}/json"},
                      "retry": {"max_attempts": 3, "backoff_s": 0.01}, "done": True}}  # fmt: skip
    resp = await client.post("/api/workflow", json={"name": "egress", "flow": flow})
    assert resp.status_code == 201, resp.text
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "failed"
    (step,) = wf["steps"]
    assert step["attempt"] == 1  # not retried
    assert "127.0.0.2 matches [http] deny 127.0.0.2/32" in step["error"]
    assert denied.connections == 0


async def test_the_step_limit_reaches_the_tool(make_client: Any, allowed: Server) -> None:
    client, _ = await make_client(max_result_bytes=200_000)
    flow = {"start": {"tool": "http", "args": {"url": f"{allowed.base}/endless"},
                      "retry": {"max_attempts": 3, "backoff_s": 0.01}, "done": True}}  # fmt: skip
    resp = await client.post("/api/workflow", json={"name": "big", "flow": flow})
    wf = await wait_for(client, resp.json()["id"])
    (step,) = wf["steps"]
    assert wf["status"] == "failed" and step["attempt"] == 1
    assert "larger than the result limit of 200000 bytes" in step["error"]


@pytest.mark.parametrize(
    ("notify_url", "deny", "needle"),
    [
        ("http://169.254.169.254/hook", (), "169.254.169.254 matches built-in deny"),
        ("http://127.0.0.2:9/hook", ("127.0.0.2",), "127.0.0.2 matches [http] deny 127.0.0.2/32"),
        ("http://2130706434:9/hook", ("127.0.0.2",), "127.0.0.2 matches [http] deny"),
        ("http://[::ffff:127.0.0.2]:9/hook", ("127.0.0.0/8",), "127.0.0.2 matches [http] deny"),
    ],
)
async def test_a_notify_url_naming_a_denied_address_is_422(
    make_client: Any, notify_url: str, deny: tuple[str, ...], needle: str
) -> None:
    client, _ = await make_client(http_deny=deny)
    flow = {"start": {"tool": "echo", "args": {}, "done": True}}
    body = {"name": "n", "flow": flow, "notify_url": notify_url}
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 422, resp.text
    assert f"field 'notify_url' is refused by the egress policy: {needle}" in resp.json()["error"]
    assert (await client.get("/api/workflow")).json() == []
    # A name is judged when the delivery connects, on the addresses it resolves to.
    resp = await client.post("/api/workflow", json={**body, "notify_url": "http://localhost:9/"})
    assert resp.status_code == 201


async def test_many_response_headers_cost_linear_time(make_client: Any, allowed: Server) -> None:
    # 9,000 headers (a third of them Set-Cookie) in ~90 kB: dict(httpx.Headers) scans the
    # list per name (1.5 s on the event loop), and cookie parsing took 100 ms more.
    client, _ = await make_client()
    flow = {"start": {"tool": "http", "args": {"url": f"{allowed.base}/headers?n=9000"},
                      "done": True}}  # fmt: skip
    async with Watch() as watch:
        resp = await client.post("/api/workflow", json={"name": "headers", "flow": flow})
        wf = await wait_for(client, resp.json()["id"], timeout=30)
    assert wf["status"] == "completed", wf
    result = orjson.loads(wf["steps"][0]["result_json"])
    assert result["headers"]["x1"] == "1" and result["headers"]["set-cookie"].count("=1") == 3000
    assert watch.lag < 0.5, f"the event loop stalled {watch.lag * 1000:.0f} ms"


@pytest.mark.parametrize(
    "notify_url", ["http://a b/hook", "http://x:99999/hook", "http:///hook", "https://:0/x"]
)
async def test_a_notify_url_without_a_valid_host_and_port_is_422(
    make_client: Any, notify_url: str
) -> None:
    client, _ = await make_client()
    body = {
        "name": "n",
        "flow": {"start": {"tool": "echo", "done": True}},
        "notify_url": notify_url,
    }
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 422, resp.text
    assert "notify_url" in resp.json()["error"]
