"""Signed cookies for the web pages: the session, CSRF tokens, the sign-in nonce, flashes.

A session cookie is `base64url(json).hex-hmac`; the JSON names the token, the first
16 hex characters of its configured hash, and when the session ends. Every request
looks the token up again, so rotating or removing a token ends its sessions.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from daemon.auth import server_secret
from daemon.config import Config, TokenConfig

PATH = "/ui"
SESSION_COOKIE = "stepd_session"
LOGIN_COOKIE = "stepd_login"  # the sign-in form's nonce (no session yet)
FLASH_COOKIE = "stepd_flash"  # one message shown after a redirect
LOGIN_TTL_S = 3600
FLASH_TTL_S = 60
HASH_PREFIX = 16


@functools.lru_cache(maxsize=8)
def _secret(state_dir: Path) -> bytes:
    return server_secret(state_dir)


def secret(config: Config) -> bytes:
    """The daemon's signing key (read once per state directory)."""
    return _secret(config.state_dir)


def _mac(key: bytes, purpose: str, value: str) -> str:
    # The purpose keeps a signature made for one use from being accepted for another.
    return hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()


def _pack(key: bytes, purpose: str, data: Any) -> str:
    body = base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()
    return f"{body}.{_mac(key, purpose, body)}"


def _unpack(key: bytes, purpose: str, value: str | None) -> Any:
    """The data of a value made by `_pack`, or None if it is malformed or forged."""
    if not value or value.count(".") != 1:
        return None
    body, sig = value.split(".")
    if not hmac.compare_digest(sig.encode(), _mac(key, purpose, body).encode()):
        return None
    try:
        return orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Session:
    token: TokenConfig
    value: str  # the cookie value, which the CSRF token is derived from
    expires: float

    def csrf(self, config: Config) -> str:
        return _mac(secret(config), "csrf", self.value)


def issue(config: Config, token: TokenConfig, *, now: float | None = None) -> str:
    """A new session cookie value for `token`."""
    now = time.time() if now is None else now
    data = {
        "n": token.name,
        "h": token.sha256[:HASH_PREFIX],
        "exp": int(now + config.session_ttl_s),
    }
    return _pack(secret(config), "session", data)


def load(config: Config, value: str | None, *, now: float | None = None) -> Session | None:
    """The session a cookie value carries, if it is genuine, current, and its token still
    exists with the same hash."""
    data = _unpack(secret(config), "session", value)
    if not isinstance(data, dict) or not isinstance(data.get("exp"), int):
        return None
    now = time.time() if now is None else now
    if data["exp"] <= now:
        return None
    for token in config.tokens:
        if token.name == data.get("n") and hmac.compare_digest(
            token.sha256[:HASH_PREFIX].encode(), str(data.get("h")).encode()
        ):
            assert value is not None
            return Session(token, value, data["exp"])
    return None


def current(request: Request) -> Session | None:
    config: Config = request.app.state.config
    return load(config, request.cookies.get(SESSION_COOKIE))


def identify(config: Config, raw_token: str) -> TokenConfig | None:
    """The configured token a pasted secret is, compared in constant time."""
    digest = hashlib.sha256(raw_token.strip().encode()).hexdigest().encode()
    found = None
    for token in config.tokens:  # every one, without stopping early
        if hmac.compare_digest(digest, token.sha256.encode()) and found is None:
            found = token
    return found


def same(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


# -- the sign-in form: a nonce cookie, and its MAC in the form ----------------------------


def login_nonce(request: Request) -> tuple[str, bool]:
    """The sign-in nonce from the cookie, or a new one (then True: set the cookie)."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if len(nonce) == 32 and nonce.isalnum():
        return nonce, False
    return secrets.token_hex(16), True


def login_csrf(config: Config, nonce: str) -> str:
    return _mac(secret(config), "login", nonce)


# -- cookies ----------------------------------------------------------------------------


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(request: Request, response: Response, name: str) -> None:
    set_cookie(request, response, name, "", 0)


def set_flash(request: Request, response: Response, kind: str, text: str) -> None:
    """A message for the next page ("ok" or "error"), signed so no one else can plant one."""
    value = _pack(secret(request.app.state.config), "flash", [kind, text[:400]])
    set_cookie(request, response, FLASH_COOKIE, value, FLASH_TTL_S)


def flash(request: Request) -> tuple[str, str] | None:
    """The flash message the request carries (the page then clears the cookie)."""
    data = _unpack(secret(request.app.state.config), "flash", request.cookies.get(FLASH_COOKIE))
    if isinstance(data, list) and len(data) == 2 and all(isinstance(x, str) for x in data):
        return data[0], data[1]
    return None
