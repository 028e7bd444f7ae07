"""Bearer-token authentication: SHA-256 hashes from the config, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon import files
from daemon.config import TokenConfig
from daemon.errors import ConfigError, Forbidden, Unauthorized

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


@dataclass(frozen=True)
class ActiveTokens:
    """The tokens a daemon accepts, where each comes from, and a token made just now."""

    tokens: tuple[TokenConfig, ...]
    sources: tuple[str, ...]  # per token: "config", or "generated, <file>"
    new_token: str | None = None  # generated at this start: to be shown once

    def describe(self) -> str:
        """`name (source), ...`: never a secret."""
        pairs = zip(self.tokens, self.sources, strict=True)
        return ", ".join(f"{token.name} ({source})" for token, source in pairs)


def generated_token_path(state_dir: Path) -> Path:
    return state_dir / GENERATED_TOKEN_FILE


def active_tokens(configured: tuple[TokenConfig, ...], state_dir: Path) -> ActiveTokens:
    """The configured tokens, plus the generated admin token.

    The generated token is made only on a first start with no configured token and no
    token file; once made it keeps working, whatever tokens are added to the config,
    until its file is deleted. A configured token named 'admin' replaces it.
    """
    path = generated_token_path(state_dir)
    sources = ("config",) * len(configured)
    if any(t.name == GENERATED_TOKEN_NAME for t in configured):
        if path.exists():
            replaces = f"config, replaces the generated token in {path}"
            sources = tuple(
                replaces if t.name == GENERATED_TOKEN_NAME else "config" for t in configured
            )
        return ActiveTokens(configured, sources)
    generated = f"generated, {path}"
    if path.exists():
        admin = TokenConfig(GENERATED_TOKEN_NAME, read_token_file(path), ("workflow",))
        return ActiveTokens((*configured, admin), (*sources, generated))
    if configured:
        return ActiveTokens(configured, sources)
    token = new_token()
    if not files.write_private(path, hash_token(token) + "\n", keep_existing=True):
        return active_tokens(configured, state_dir)  # made meanwhile by another process
    admin = TokenConfig(GENERATED_TOKEN_NAME, hash_token(token), ("workflow",))
    return ActiveTokens((admin,), (generated,), new_token=token)


def mint_admin_token(state_dir: Path) -> tuple[str, Path]:
    """Replace the generated admin token with a new one; returns the token and its file."""
    token = new_token()
    path = generated_token_path(state_dir)
    files.write_private(path, hash_token(token) + "\n")
    return token, path


def read_token_file(path: Path) -> str:
    """The hex digest in a generated token file (made 0600 if it was looser)."""
    files.tighten(path)
    digest = path.read_text().strip().lower()
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ConfigError(
            f"{path} does not hold a SHA-256 hex digest; delete it to generate a new admin token"
        )
    return digest


SECRET_FILE = "stepd-secret"  # signs sessions and one-click links: never leaves the daemon
WEBHOOK_SECRET_FILE = "stepd-webhook-secret"  # signs webhooks: shared with their receivers


def server_secret(state_dir: Path) -> bytes:
    """This daemon's own signing key (sessions, links): made once, kept 0600."""
    return secret_file(state_dir / SECRET_FILE)


def webhook_secret(state_dir: Path) -> bytes:
    """The generated webhook key: a separate secret, so receivers can forge nothing else."""
    return secret_file(state_dir / WEBHOOK_SECRET_FILE)


def tighten_generated(state_dir: Path) -> None:
    """Make existing token and secret files 0600 (an older stepd left them to the umask)."""
    for name in (GENERATED_TOKEN_FILE, SECRET_FILE, WEBHOOK_SECRET_FILE):
        files.tighten(state_dir / name)


def secret_file(path: Path) -> bytes:
    """32 random bytes kept (hex) in `path`: made 0600 at first use, kept 0600 after."""
    if not path.exists():
        # keep_existing: if another process made one meanwhile, use theirs.
        files.write_private(path, secrets.token_bytes(32).hex() + "\n", keep_existing=True)
    files.tighten(path)
    return bytes.fromhex(path.read_text().strip())
