"""Built-in tools: echo, sleep, http."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import httpx
import orjson

from daemon import egress
from daemon import flow as flows
from daemon.placeholders import parse_off_loop
from daemon.tools import ToolContext, ToolError, bounded, tool

_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
MAX_REDIRECTS = 20  # as httpx's default


@tool
async def echo(**args: Any) -> dict[str, Any]:
    """Return the arguments as an object."""
    return args


@tool
async def sleep(seconds: float) -> dict[str, Any]:
    """Wait `seconds` (cancellable, at most a year) and return {"slept": seconds}."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ToolError("seconds must be a non-negative number", retryable=False)
    if not seconds <= flows.MAX_SECONDS:  # NaN too
        raise ToolError(f"seconds must be at most {flows.MAX_SECONDS} (a year), like timeouts",
                        retryable=False)  # fmt: skip
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@tool
async def http(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    json: Any = None,
    body: str | None = None,
    timeout: float = 30,
    *,
    ctx: ToolContext | None = None,
) -> dict[str, Any]:
    """Make an HTTP request; returns {"status", "headers", "json"}, or "text" when the body
    is not strict JSON (NaN and Infinity are not).

    A status >= 400 fails the attempt; 5xx and 429 may be retried, other 4xx may not.
    Every connection, redirects included, obeys the [http] egress policy; the body is
    read up to [executor] max_result_bytes, and `timeout` bounds the whole request.
    """
    method = _checked(url, method, json, body, timeout)
    policy = ctx.egress if ctx is not None else egress.Policy()
    limit = ctx.max_result_bytes if ctx is not None else ToolContext.max_result_bytes
    what = f"{method} {url}"
    try:
        async with (
            asyncio.timeout(timeout),
            egress.client(
                policy, timeout=timeout, headers={"Accept-Encoding": bounded.ACCEPT_ENCODING}
            ) as client,
        ):
            request = client.build_request(method, url, headers=headers or {}, json=json,
                                           content=body)  # fmt: skip
            status, resp_headers, data, encoding = await _fetch(client, request, limit)
    except TimeoutError:
        raise ToolError(f"{what} timed out after {timeout:g}s") from None
    except (egress.EgressDenied, bounded.UnsupportedEncoding) as exc:
        raise ToolError(f"{what}: {exc}", retryable=False) from None
    except bounded.BodyTooLarge as exc:
        raise ToolError(f"{what}: the response is larger than the result limit of {limit} "
                        f"bytes ([executor] max_result_bytes): {exc}; stopped reading",
                        retryable=False) from None  # fmt: skip
    except httpx.InvalidURL as exc:
        raise ToolError(f"{what}: invalid URL: {exc}", retryable=False) from None
    except (httpx.HTTPError, zlib.error) as exc:
        raise ToolError(f"{what} failed: {exc!r}") from exc
    if status >= 400:
        raise ToolError(f"{what} answered {status}", retryable=status >= 500 or status == 429)
    return {"status": status, "headers": resp_headers, **await _body(data, encoding)}


async def _body(data: bytes, encoding: str) -> dict[str, Any]:
    """{"json": value} for a body that is strict JSON, else {"text": text}."""
    try:
        # At most max_result_bytes: ~25 ms for 1 MiB of `{}` items, the costliest shape.
        return {"json": await parse_off_loop(data)}
    except orjson.JSONDecodeError:  # also NaN, Infinity, 1e999 and nesting past 1024
        return {"text": data.decode(encoding, errors="replace")}


def _checked(url: Any, method: Any, json: Any, body: Any, timeout: Any) -> str:
    """The upper-cased method, once the arguments make a request (else a ToolError)."""
    method = str(method).upper()
    if method not in _HTTP_METHODS:
        raise ToolError(f"unsupported HTTP method '{method}'", retryable=False)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ToolError("url must start with http:// or https://", retryable=False)
    if json is not None and body is not None:
        raise ToolError("pass either json or body, not both", retryable=False)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ToolError("timeout must be a positive number of seconds", retryable=False)
    return method


async def _fetch(
    client: httpx.AsyncClient, request: httpx.Request, limit: int
) -> tuple[int, dict[str, str], bytes, str]:
    """Send, following redirects without reading their bodies; (status, headers, body,
    text encoding) of the final answer."""
    for _ in range(MAX_REDIRECTS + 1):
        resp = await client.send(request, stream=True)
        try:
            if resp.next_request is None:
                data = await bounded.read(resp, limit)
                return resp.status_code, _headers(resp.headers), data, resp.encoding or "utf-8"
            request = resp.next_request
        finally:
            await resp.aclose()
    raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=request)


def _headers(headers: httpx.Headers) -> dict[str, str]:
    """The headers as a dict, repeated names joined with ", " as httpx does; in one pass
    (dict(httpx.Headers) scans every header per name: seconds for 16,000 of them)."""
    out: dict[str, str] = {}
    for name, value in headers.multi_items():
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out
