"""Sessions and signed cookies for the web pages: the session, CSRF tokens, the sign-in
nonce, flashes.

A session is a row in the database (web_sessions) under the hash of a random id; the
cookie carries that id, signed. Every request reads the row (one primary-key lookup) and
looks its token up again, so signing out ends every copy of the cookie, and rotating or
removing a token ends its sessions. Signing is itsdangerous's (daemon/signing.py), with
one purpose per use: a value made for one is refused for every other.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature
from starlette.requests import Request
from starlette.responses import Response

from daemon import signing
from daemon.config import Config, TokenConfig
from daemon.storage.base import BaseStore

PATH = "/ui"
SESSION_COOKIE = "stepd_session"
LOGIN_COOKIE = "stepd_login"  # the sign-in form's nonce (no session yet)
FLASH_COOKIE = "stepd_flash"  # one message shown after a redirect
LOGIN_TTL_S = 3600
FLASH_TTL_S = 60
HASH_PREFIX = 16
MAX_VALUE = 400  # characters of a session cookie or a CSRF token; ours are under 100


def secret(config: Config) -> bytes:
    """The daemon's signing secret (read once per state directory)."""
    return signing.secret(config.state_dir)


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    token: TokenConfig
    id: str  # the random session id the cookie carries, which the CSRF token is bound to
    expires: float  # epoch seconds

    def csrf(self, config: Config) -> str:
        return signing.signer(secret(config), "csrf").get_signature(self.id).decode()

    def csrf_ok(self, config: Config, given: str | None) -> bool:
        if not given or len(given) > MAX_VALUE:
            return False
        return signing.signer(secret(config), "csrf").verify_signature(self.id, given)


async def issue(
    store: BaseStore, config: Config, token: TokenConfig, *, now: float | None = None
) -> str:
    """Start a session for `token`: the new session cookie's value."""
    now = time.time() if now is None else now
    session_id = secrets.token_urlsafe(32)
    await store.add_web_session(
        _id_hash(session_id), token.name, token.sha256[:HASH_PREFIX],
        int((now + config.session_ttl_s) * 1000), now=int(now * 1000),
    )  # fmt: skip
    return signing.signer(secret(config), "session").sign(session_id).decode()


def _session_id(config: Config, value: str | None) -> str | None:
    if not value or len(value) > MAX_VALUE:
        return None
    try:
        return signing.signer(secret(config), "session").unsign(value).decode()
    except (BadSignature, UnicodeDecodeError):
        return None


async def load(
    store: BaseStore, config: Config, value: str | None, *, now: float | None = None
) -> Session | None:
    """The session a cookie value carries, if it is genuine, has not ended or expired, and
    its token still exists with the same hash."""
    session_id = _session_id(config, value)
    if session_id is None:
        return None
    now = time.time() if now is None else now
    row = await store.web_session(_id_hash(session_id), now=int(now * 1000))
    if row is None:
        return None
    for token in config.tokens:
        if token.name == row["token_name"] and hmac.compare_digest(
            token.sha256[:HASH_PREFIX].encode(), row["token_hash"].encode()
        ):
            return Session(token, session_id, row["expires_at"] / 1000)
    return None


async def end(store: BaseStore, session: Session) -> None:
    """Sign out: the session ends for every copy of its cookie."""
    await store.end_web_session(_id_hash(session.id))


async def current(request: Request) -> Session | None:
    app = request.app.state
    return await load(app.store, app.config, request.cookies.get(SESSION_COOKIE))


def identify(config: Config, raw_token: str) -> TokenConfig | None:
    """The configured token a pasted secret is, compared in constant time."""
    digest = hashlib.sha256(raw_token.strip().encode()).hexdigest().encode()
    found = None
    for token in config.tokens:  # every one, without stopping early
        if hmac.compare_digest(digest, token.sha256.encode()) and found is None:
            found = token
    return found


# -- the sign-in form: a nonce cookie, and its signature in the form ----------------------


def login_nonce(request: Request) -> tuple[str, bool]:
    """The sign-in nonce from the cookie, or a new one (then True: set the cookie)."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if len(nonce) == 32 and nonce.isalnum():
        return nonce, False
    return secrets.token_hex(16), True


def login_csrf(config: Config, nonce: str) -> str:
    return signing.signer(secret(config), "login").get_signature(nonce).decode()


def login_csrf_ok(config: Config, nonce: str, given: str | None) -> bool:
    if not nonce or not given or len(given) > MAX_VALUE:
        return False
    return signing.signer(secret(config), "login").verify_signature(nonce, given)


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
    flashes = signing.timed_serializer(secret(request.app.state.config), "flash")
    set_cookie(request, response, FLASH_COOKIE, flashes.dumps([kind, text[:400]]), FLASH_TTL_S)


def flash(request: Request) -> tuple[str, str] | None:
    """The flash message the request carries (the page then clears the cookie)."""
    value = request.cookies.get(FLASH_COOKIE)
    if not value:
        return None
    flashes = signing.timed_serializer(secret(request.app.state.config), "flash")
    try:
        data: Any = flashes.loads(value, max_age=FLASH_TTL_S)
    except BadSignature:  # forged, made for another use, or too old
        return None
    if isinstance(data, list) and len(data) == 2 and all(isinstance(x, str) for x in data):
        return data[0], data[1]
    return None
