"""Signed values for the web (decision links, cookies), made and checked by itsdangerous.

Every use has its own purpose, which is the signer's salt: the key for it is an HMAC of
the server secret and the purpose, so a value signed for one use (a session cookie) is
refused for every other (a link, a flash message). The webhook secret signs none of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from itsdangerous import Signer, URLSafeSerializer, URLSafeTimedSerializer

from daemon.auth import server_secret

PURPOSES = frozenset({"link", "session", "csrf", "login", "flash"})


def _signer_kwargs() -> dict[str, Any]:
    return {"key_derivation": "hmac", "digest_method": hashlib.sha256}


def _salt(purpose: str) -> bytes:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown signing purpose {purpose!r}")
    return f"stepd.{purpose}".encode()


_secrets: dict[Path, bytes] = {}  # state directory -> its daemon's signing secret


def secret(state_dir: Path) -> bytes:
    """The daemon's own signing secret: the one its database shares among several daemons
    (remembered at start-up), else the one in the state directory (read once)."""
    if state_dir not in _secrets:
        _secrets[state_dir] = server_secret(state_dir)
    return _secrets[state_dir]


def remember(state_dir: Path, key: bytes) -> None:
    """Use `key` as the signing secret of the daemon at `state_dir` (from its database)."""
    _secrets[state_dir] = key


def serializer(key: bytes, purpose: str) -> URLSafeSerializer:
    """JSON values signed for `purpose`, URL-safe."""
    return URLSafeSerializer(key, salt=_salt(purpose), signer_kwargs=_signer_kwargs())


def timed_serializer(key: bytes, purpose: str) -> URLSafeTimedSerializer:
    """JSON values signed for `purpose` with the time they were made (for a max_age)."""
    return URLSafeTimedSerializer(key, salt=_salt(purpose), signer_kwargs=_signer_kwargs())


def signer(key: bytes, purpose: str) -> Signer:
    """Signatures of plain strings for `purpose` (CSRF tokens)."""
    return Signer(key, salt=_salt(purpose), **_signer_kwargs())
