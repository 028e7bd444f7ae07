"""Built-in tools: echo, sleep, http."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from daemon.tools import ToolError, tool

_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


@tool
async def echo(**args: Any) -> dict[str, Any]:
    """Return the arguments as an object."""
    return args


@tool
async def sleep(seconds: float) -> dict[str, Any]:
    """Wait `seconds` (cancellable) and return {"slept": seconds}."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ToolError("seconds must be a non-negative number", retryable=False)
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
) -> dict[str, Any]:
    """Make an HTTP request; returns {"status", "headers", "json"} or "text" when not JSON.

    A status >= 400 fails the attempt; 5xx and 429 may be retried, other 4xx may not.
    """
    method = str(method).upper()
    if method not in _HTTP_METHODS:
        raise ToolError(f"unsupported HTTP method '{method}'", retryable=False)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ToolError("url must start with http:// or https://", retryable=False)
    if json is not None and body is not None:
        raise ToolError("pass either json or body, not both", retryable=False)
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            resp = await client.request(method, url, headers=headers or {}, json=json, content=body)
    except httpx.HTTPError as exc:
        raise ToolError(f"{method} {url} failed: {exc!r}") from exc
    out: dict[str, Any] = {"status": resp.status_code, "headers": dict(resp.headers)}
    try:
        out["json"] = resp.json()
    except ValueError:
        out["text"] = resp.text
    if resp.status_code >= 400:
        retryable = resp.status_code >= 500 or resp.status_code == 429
        raise ToolError(f"{method} {url} answered {resp.status_code}", retryable=retryable)
    return out
