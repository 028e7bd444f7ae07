"""The egress policy: which addresses the daemon may connect to on a workflow's behalf.

Built-in denials (link-local, multicast, unspecified, cloud metadata) always apply;
`[http] deny` adds to them and `[http] allow` carves exceptions. The most specific
matching entry (longest prefix) decides, deny wins a tie, and an address nothing
matches is allowed. IPv4-mapped IPv6 addresses are judged as their IPv4 address.

The policy is enforced where connections are made: `client()` builds an httpx client
whose every TCP connection (each redirect hop included) resolves the host itself,
checks every address it resolved to, and connects to a checked address, so neither
the URL's spelling nor a second DNS answer can get around it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# (network, why): denied whatever [http] says, unless `allow` names a more specific range.
BUILTIN_DENY: tuple[tuple[str, str], ...] = (
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("0.0.0.0/8", "unspecified"),  # "this network": 0.0.0.0 reaches the host itself
    ("::/128", "unspecified"),
    # Cloud metadata and credential services. Most are link-local already; naming them
    # keeps them denied when `allow` opens link-local (the longer prefix decides).
    ("169.254.169.254/32", "cloud metadata"),  # AWS, GCP, Azure, Oracle, OpenStack, ...
    ("169.254.170.2/32", "cloud metadata"),  # AWS ECS task credentials
    ("169.254.170.23/32", "cloud metadata"),  # AWS EKS Pod Identity
    ("169.254.0.23/32", "cloud metadata"),  # Tencent Cloud
    ("100.100.100.200/32", "cloud metadata"),  # Alibaba Cloud
    ("168.63.129.16/32", "cloud metadata"),  # Azure WireServer
    ("192.0.0.192/32", "cloud metadata"),  # Oracle Cloud (classic)
    ("fd00:ec2::254/128", "cloud metadata"),  # AWS IMDS over IPv6
    ("fd00:ec2::23/128", "cloud metadata"),  # AWS EKS Pod Identity over IPv6
    ("fd20:ce::254/128", "cloud metadata"),  # GCP metadata over IPv6
    ("fe80::a9fe:a9fe/128", "cloud metadata"),  # OpenStack metadata over IPv6
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NUMERIC = re.compile(r"^[0-9a-fA-FxX.]+$")


class EgressDenied(Exception):
    """A connection the egress policy refused; the message names the address and the rule."""


@dataclass(frozen=True)
class Rule:
    network: Network
    allow: bool
    builtin: str | None = None  # why a built-in denial exists; None: from [http]

    def __str__(self) -> str:
        if self.builtin is not None:
            return f"built-in deny {self.network} ({self.builtin})"
        return f"[http] {'allow' if self.allow else 'deny'} {self.network}"


@dataclass(frozen=True)
class Decision:
    address: Address
    allowed: bool
    rule: Rule | None  # None: no entry matched (allowed)

    def reason(self) -> str:
        if self.rule is None:
            return f"{self.address} matches no rule"
        return f"{self.address} matches {self.rule}"


def parse_network(text: str) -> Network:
    """A CIDR network or a bare address (/32 or /128); IPv4-mapped IPv6 becomes IPv4.

    Raises ValueError, e.g. for host bits set ("10.0.0.1/8").
    """
    net = ipaddress.ip_network(text.strip(), strict=True)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        # ::ffff:127.0.0.1 is judged as 127.0.0.1, so a rule naming it is an IPv4 rule.
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def canonical(address: Address) -> Address:
    """An IPv4-mapped IPv6 address as its IPv4 address; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Policy:
    """Longest-prefix matching over the built-in denials and [http] allow / deny."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        rules = [Rule(ipaddress.ip_network(n), False, why) for n, why in BUILTIN_DENY]
        rules += [Rule(parse_network(n), False) for n in deny]
        rules += [Rule(parse_network(n), True) for n in allow]
        # Longest prefix first; at equal length deny before allow: the first match decides.
        self.rules = tuple(sorted(rules, key=lambda r: (-r.network.prefixlen, r.allow)))

    def decide(self, address: Address | str) -> Decision:
        addr = canonical(ipaddress.ip_address(address) if isinstance(address, str) else address)
        for rule in self.rules:
            if rule.network.version == addr.version and addr in rule.network:
                return Decision(addr, rule.allow, rule)
        return Decision(addr, True, None)

    def check(self, address: Address, host: str) -> None:
        """Raise EgressDenied unless `address` (resolved from `host`) is allowed."""
        decision = self.decide(address)
        if not decision.allowed:
            shown = "" if host == str(address) else f" (from '{host}')"
            raise EgressDenied(f"refused by the egress policy: {decision.reason()}{shown}")


@functools.lru_cache(maxsize=8)
def policy(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> Policy:
    """The Policy of an [http] section (cached: configs are immutable)."""
    return Policy(allow, deny)


def literal_address(host: str) -> Address | None:
    """The address a host names without DNS: an IP literal, or a numeric IPv4 spelling
    the resolver accepts too (2130706433, 0x7f.1, 0177.0.0.1, 127.1)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


async def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to, in the resolver's order, without duplicates."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve '{host}': {exc.strerror}") from None
    out: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if addr not in out:
            out.append(addr)
    return out


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to addresses the policy allows.

    The host is resolved here, every address it resolves to must be allowed (a name
    with any denied address is refused outright), and the socket is opened to one of
    those addresses: the inner backend gets an IP literal, so there is no second
    lookup to rebind. TLS still verifies the URL's host name: httpcore passes it to
    start_tls as the server name, whatever address was connected to.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving '{host}' timed out") from None
        for address in addresses:
            self.policy.check(address, host)
        error: Exception = httpcore.ConnectError(f"'{host}' resolved to no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )  # fmt: skip
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc  # try the next address, like a resolver-order fallback
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise EgressDenied("refused by the egress policy: Unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs tens of milliseconds: once per process, not per client.
    return httpx.create_ssl_context(trust_env=False)


_LIMITS = httpx.Limits()  # httpx's defaults


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport over a connection pool that connects through GuardedBackend."""

    def __init__(self, policy: Policy, limits: httpx.Limits = _LIMITS) -> None:
        # With the context given: httpx would otherwise load the CA bundle for a pool that
        # is thrown away at once (~25 ms on the event loop for every request of the tool).
        super().__init__(trust_env=False, limits=limits, verify=_ssl_context())
        # httpx takes no network backend; its pool is replaced by one that has ours, built
        # from httpcore's public constructor. Fails loudly should httpx's internals move.
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("httpx.AsyncHTTPTransport has no connection pool to replace")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


def client(policy: Policy, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx.AsyncClient whose connections obey `policy`.

    Proxy environment variables are ignored (trust_env=False): a proxy would make the
    connection the policy judges the proxy's, not the destination's. It keeps no cookies.
    """
    made = httpx.AsyncClient(transport=GuardedTransport(policy), trust_env=False, **kwargs)
    made._cookies = _NoCookies()  # the `cookies` property reads it; there is no option
    return made


class _NoCookies(httpx.Cookies):
    """Cookies the client never keeps: a workflow's requests share no session state, and
    parsing 16,000 Set-Cookie headers would hold the event loop for 200 ms."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass
