"""Bearer-token authentication: SHA-256 hashes from the config, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from daemon.config import TokenConfig
from daemon.errors import Forbidden, Unauthorized

GENERATED_TOKEN_FILE = "stepd-token.sha256"
GENERATED_TOKEN_NAME = "admin"

# What each route asks for; a token's permissions grant these.
GRANTS = {
    "workflow": {"read", "approve", "workflow"},  # everything
    "approve": {"read", "approve"},  # read, and decide gates
}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "stepd_" + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, tokens: Iterable[TokenConfig]) -> None:
        self._tokens = [(bytes.fromhex(t.sha256), t) for t in tokens]

    def identify(self, authorization: str | None) -> TokenConfig:
        """The token an Authorization header carries; Unauthorized if none matches."""
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        # Compare against every configured hash, without stopping early.
        for expected, cfg in self._tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = cfg
        if found is None:
            raise Unauthorized("invalid token")
        return found

    @staticmethod
    def require(token: TokenConfig, need: str) -> None:
        granted: set[str] = set()
        for perm in token.permissions:
            granted |= GRANTS.get(perm, set())
        if need not in granted:
            raise Forbidden(f"token '{token.name}' lacks the '{need}' permission")


def first_start_token(state_dir: Path) -> tuple[TokenConfig, str | None]:
    """The generated admin token: loaded from the state dir, or made now (then returned once)."""
    path = state_dir / GENERATED_TOKEN_FILE
    if path.exists():
        digest = path.read_text().strip()
        return TokenConfig(GENERATED_TOKEN_NAME, digest, ("workflow",)), None
    token = new_token()
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(hash_token(token) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return TokenConfig(GENERATED_TOKEN_NAME, hash_token(token), ("workflow",)), token


SECRET_FILE = "stepd-secret"  # signs sessions and one-click links: never leaves the daemon
WEBHOOK_SECRET_FILE = "stepd-webhook-secret"  # signs webhooks: shared with their receivers


def server_secret(state_dir: Path) -> bytes:
    """This daemon's own signing key (sessions, links): made once, kept 0600."""
    return secret_file(state_dir / SECRET_FILE)


def webhook_secret(state_dir: Path) -> bytes:
    """The generated webhook key: a separate secret, so receivers can forge nothing else."""
    return secret_file(state_dir / WEBHOOK_SECRET_FILE)


def secret_file(path: Path) -> bytes:
    """32 random bytes kept (hex) in `path`, made 0600 at first use."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
    try:
        os.link(tmp, path)  # fails if another process made one meanwhile: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())
