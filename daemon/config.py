"""Configuration: TOML into a frozen dataclass, validated at load."""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from daemon import egress
from daemon.errors import ConfigError

PERMISSIONS = ("workflow", "approve")
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Not token names: `link` is who decides through a one-click link, and the permission
# names stand for every token holding them in a gate's `approvers` list.
RESERVED_TOKEN_NAMES = ("link", *PERMISSIONS)
DEFAULT_TOOL_MODULES = ("daemon.tools.demo",)
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class TokenConfig:
    name: str  # becomes created_by / approved_by
    sha256: str  # lowercase hex digest of the token
    permissions: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    db_path: Path = Path("stepd.db")
    # "" for the SQLite file at db_path; postgresql://... for a PostgreSQL database that
    # several daemons may share ([database] url).
    database_url: str = ""
    node_id: str = ""  # this daemon's name among several on one database (see `node`)
    synchronous: str = "FULL"
    busy_timeout_ms: int = 5000
    poll_interval: float = 1.0
    concurrency: int = 16
    # Steps running at once for one token (the token that created their workflow); None:
    # half of concurrency (see running_share).
    max_running_per_token: int | None = None
    claim_batch: int = 64
    step_limit: int = 1000
    shutdown_grace: float = 30.0
    max_body_bytes: int = 1_048_576
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_states: int = 200
    template_ms: float = 50.0  # CPU one expression may use
    template_mb: int = 64  # memory one evaluation may grow the sandbox process by
    max_workflow_bytes: int = 32 * 2**20  # input, flow and results one workflow may store
    max_map_items: int = 10_000  # items one map state may run
    max_result_bytes: int = 1_048_576
    lease_s: float = 30.0
    recovery_attempts: int = 3
    retention_days: float = 0.0
    retention_batch: int = 500
    retention_interval_s: float = 3600.0
    allow_self_approval: bool = True
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_max_attempts: int = 10
    http_allow: tuple[str, ...] = ()  # egress policy: CIDRs or addresses (daemon.egress)
    http_deny: tuple[str, ...] = ()
    public_url: str = ""
    link_ttl_s: float = 86400.0
    session_ttl_s: float = 43200.0
    tokens: tuple[TokenConfig, ...] = ()
    tool_modules: tuple[str, ...] = DEFAULT_TOOL_MODULES
    log_level: str = "info"
    log_format: str = "text"  # "text" for people and journald, "json" for log pipelines
    metrics_auth: bool = True  # False: /metrics is open like /healthz
    # The database's directory: every file stepd generates (token hash, secrets, demo
    # database) lives beside the database, whichever directory stepd was started from.
    state_dir: Path = field(default_factory=Path.cwd)
    # The config file's directory: [tools] modules are looked for there too.
    config_dir: Path | None = None

    @property
    def backend(self) -> str:
        return "postgresql" if self.database_url else "sqlite"

    @property
    def node(self) -> str:
        """Who runs a step, written as its owner: [server] node_id, else host name:port."""
        return self.node_id or f"{socket.gethostname()}:{self.port}"

    @property
    def running_share(self) -> int:
        """Most tool steps running at once for one token: max_running_per_token, or by
        default half of concurrency (at least 1), so one token cannot take every slot."""
        if self.max_running_per_token is not None:
            return self.max_running_per_token
        return max(1, self.concurrency // 2)


_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    # section -> key -> (Config attribute, accepted types)
    "server": {
        "host": ("host", str),
        "port": ("port", int),
        "max_body_bytes": ("max_body_bytes", int),
        "max_connections": ("max_connections", int),
        "header_timeout_s": ("header_timeout_s", (int, float)),
        "body_timeout_s": ("body_timeout_s", (int, float)),
        "log_level": ("log_level", str),
        "log_format": ("log_format", str),
        "node_id": ("node_id", str),
    },
    "database": {
        "path": ("db_path", str),
        "url": ("database_url", str),
        "synchronous": ("synchronous", str),
        "busy_timeout_ms": ("busy_timeout_ms", int),
    },
    "executor": {
        "poll_interval": ("poll_interval", (int, float)),
        "concurrency": ("concurrency", int),
        "max_running_per_token": ("max_running_per_token", int),
        "claim_batch": ("claim_batch", int),
        "step_limit": ("step_limit", int),
        "shutdown_grace": ("shutdown_grace", (int, float)),
        "max_result_bytes": ("max_result_bytes", int),
        "lease_s": ("lease_s", (int, float)),
        "recovery_attempts": ("recovery_attempts", int),
    },
    "retention": {
        "days": ("retention_days", (int, float)),
        "batch": ("retention_batch", int),
        "interval_s": ("retention_interval_s", (int, float)),
    },
    "limits": {
        "max_states": ("max_states", int),
        "template_ms": ("template_ms", (int, float)),
        "template_mb": ("template_mb", int),
        "max_workflow_bytes": ("max_workflow_bytes", int),
        "max_map_items": ("max_map_items", int),
    },
    "tools": {
        "modules": ("tool_modules", list),
    },
    "approvals": {
        "allow_self_approval": ("allow_self_approval", bool),
    },
    "webhooks": {
        "url": ("webhook_url", str),
        "secret": ("webhook_secret", str),
        "max_attempts": ("webhook_max_attempts", int),
        "public_url": ("public_url", str),
        "link_ttl_s": ("link_ttl_s", (int, float)),
    },
    "http": {
        "allow": ("http_allow", list),
        "deny": ("http_deny", list),
    },
    "web": {
        "session_ttl_s": ("session_ttl_s", (int, float)),
    },
    "metrics": {
        "auth": ("metrics_auth", bool),
    },
}


def state_directory(env: dict[str, str] | None = None) -> Path:
    """What a relative database path is relative to: $STATE_DIRECTORY (systemd) or the cwd."""
    env = os.environ if env is None else env
    raw = env.get("STATE_DIRECTORY", "")
    # systemd may pass several colon-separated directories; the first is ours.
    first = raw.split(":")[0]
    return Path(first) if first else Path.cwd()


def load(path: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> Config:
    """Load a config file (or the embedded default when `path` is None)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    cfg = from_dict(data, env)
    if path is None:
        return cfg
    return replace(cfg, config_dir=Path(path).resolve().parent)


def from_dict(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML, rejecting unknown sections, keys and bad types."""
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section == "auth":
            continue
        if section not in _SCHEMA:
            raise ConfigError(f"unknown config section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in body.items():
            if key not in _SCHEMA[section]:
                raise ConfigError(f"unknown key '{key}' in [{section}]")
            attr, types = _SCHEMA[section][key]
            wants = types if isinstance(types, tuple) else (types,)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in wants):
                raise ConfigError(f"[{section}] {key}: wrong type {type(value).__name__}")
            values[attr] = value

    base = state_directory(env)
    if "database_url" in values:
        if "db_path" in values:
            raise ConfigError("[database] takes url or path, not both")
        values["database_url"], path = database_url(values["database_url"])
        if path is not None:
            values["db_path"] = path
    db_path = Path(values.pop("db_path", "stepd.db"))
    if not db_path.is_absolute():
        db_path = base / db_path
    for key in ("poll_interval", "shutdown_grace", "lease_s", "retention_days",
                "retention_interval_s", "link_ttl_s", "session_ttl_s", "template_ms",
                "header_timeout_s", "body_timeout_s"):  # fmt: skip
        if key in values:
            values[key] = float(values[key])
    if "tool_modules" in values:
        modules = values["tool_modules"]
        if not all(isinstance(m, str) for m in modules):
            raise ConfigError("[tools] modules must be a list of module names")
        values["tool_modules"] = tuple(modules)
    for key in ("http_allow", "http_deny"):
        if key in values:
            values[key] = _networks(values[key], key.removeprefix("http_"))
    cfg = Config(
        db_path=db_path,
        state_dir=db_path.resolve().parent,
        tokens=_tokens(data.get("auth", {})),
        **values,
    )
    _check(cfg)
    return cfg


def override(
    cfg: Config,
    *,
    database: str | None = None,
    host: str | None = None,
    port: int | None = None,
    node_id: str | None = None,
) -> Config:
    """`cfg` with the command line's choices (stepd serve --database/--host/--port/--node-id)."""
    changes: dict[str, Any] = {}
    if database is not None:
        url, path = database_url(database)
        changes["database_url"] = url
        if path is not None:
            db_path = Path(path)
            if not db_path.is_absolute():
                db_path = state_directory() / db_path
            changes |= {"db_path": db_path, "state_dir": db_path.resolve().parent}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if node_id is not None:
        changes["node_id"] = node_id
    if not changes:
        return cfg
    out = replace(cfg, **changes)
    _check(out)
    return out


def database_url(url: str) -> tuple[str, str | None]:
    """[database] url as (PostgreSQL URL or "", SQLite path or None): sqlite:///relative,
    sqlite:////absolute, or postgresql://user@host:port/database."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path or path.endswith("/"):
            raise ConfigError(
                "[database] url: sqlite:/// needs a file name, e.g. sqlite:///stepd.db"
            )
        return "", path
    if url.startswith(("postgresql://", "postgres://")):
        return url, None
    raise ConfigError(
        "[database] url must start with sqlite:/// (a file) or postgresql:// (a server), "
        f"not {url.split(':', 1)[0]!r}"
    )


def _networks(entries: list[Any], key: str) -> tuple[str, ...]:
    """[http] allow / deny: every entry a CIDR network or a bare address."""
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f'[http] {key}: entries must be strings like "10.0.0.0/8"')
        try:
            egress.parse_network(entry)
        except ValueError as exc:
            raise ConfigError(f"[http] {key}: '{entry}' is not an address or CIDR network "
                              f"({exc})") from None  # fmt: skip
    return tuple(entries)


def _tokens(auth: Any) -> tuple[TokenConfig, ...]:
    if not isinstance(auth, dict) or set(auth) - {"tokens"}:
        raise ConfigError("[auth] accepts only [[auth.tokens]] entries")
    out = []
    for i, tok in enumerate(auth.get("tokens", [])):
        where = f"[[auth.tokens]] #{i + 1}"
        if not isinstance(tok, dict) or set(tok) - {"name", "sha256", "permissions"}:
            raise ConfigError(f"{where}: expected keys name, sha256, permissions")
        name, digest = tok.get("name"), tok.get("sha256")
        perms = tok.get("permissions", ["workflow"])
        if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
            raise ConfigError(f"{where}: name must be 1 to 64 letters, digits or . _ @ - "
                              "(it is shown as created_by and decided_by)")  # fmt: skip
        if name.lower() in RESERVED_TOKEN_NAMES:
            raise ConfigError(
                f"{where}: the name '{name}' is reserved ({', '.join(RESERVED_TOKEN_NAMES)} "
                "mean one-click links and permissions); choose another"
            )
        if any(t.name.lower() == name.lower() for t in out):
            raise ConfigError(f"{where}: the name '{name}' is used by another token already")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"{where} ({name}): sha256 must be 64 hex characters")
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise ConfigError(f"{where} ({name}): sha256 is not hex") from None
        if not isinstance(perms, list) or not perms or set(perms) - set(PERMISSIONS):
            raise ConfigError(f"{where} ({name}): permissions must be a subset of {PERMISSIONS}")
        if any(t.sha256 == digest.lower() for t in out):
            raise ConfigError(f"{where} ({name}): another token has the same sha256: one "
                              "token would act as both")  # fmt: skip
        out.append(TokenConfig(name=name, sha256=digest.lower(), permissions=tuple(perms)))
    return tuple(out)


def _check(cfg: Config) -> None:
    if not 0 < cfg.port < 65536:
        raise ConfigError("[server] port must be between 1 and 65535")
    if cfg.poll_interval <= 0:
        raise ConfigError("[executor] poll_interval must be > 0")
    for attr in ("concurrency", "claim_batch", "step_limit", "max_body_bytes", "max_states",
                 "recovery_attempts", "retention_batch", "max_workflow_bytes",
                 "max_connections", "max_map_items"):  # fmt: skip
        if getattr(cfg, attr) < 1:
            raise ConfigError(f"{attr} must be >= 1")
    for attr in ("header_timeout_s", "body_timeout_s"):
        if not 0 < getattr(cfg, attr) < math.inf:
            raise ConfigError(f"[server] {attr} must be a number of seconds > 0")
    if not 1 <= cfg.running_share <= cfg.concurrency:
        raise ConfigError(
            f"[executor] max_running_per_token must be between 1 and concurrency "
            f"({cfg.concurrency}); leave it out for half of concurrency"
        )
    if cfg.webhook_url and not cfg.webhook_url.startswith(("http://", "https://")):
        raise ConfigError("[webhooks] url must start with http:// or https://")
    if cfg.webhook_url:
        _check_webhook_url(cfg)
    if cfg.public_url and not cfg.public_url.startswith(("http://", "https://")):
        raise ConfigError("[webhooks] public_url must start with http:// or https://")
    if cfg.link_ttl_s <= 0 or cfg.session_ttl_s <= 0 or cfg.webhook_max_attempts < 1:
        raise ConfigError("link_ttl_s, session_ttl_s and max_attempts must be positive")
    if cfg.lease_s < 1:
        raise ConfigError("[executor] lease_s must be >= 1")
    if cfg.retention_days < 0 or cfg.retention_interval_s <= 0:
        raise ConfigError("[retention] days must be >= 0 and interval_s > 0")
    if not 1 <= cfg.template_ms <= 60_000 or not 8 <= cfg.template_mb <= 65_536:
        raise ConfigError("[limits] template_ms must be 1 to 60000, template_mb 8 to 65536")
    if cfg.shutdown_grace < 0:
        raise ConfigError("[executor] shutdown_grace must be >= 0")
    if cfg.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("[database] synchronous must be FULL, NORMAL or EXTRA")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("[server] log_level must be debug, info, warning or error")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(f'[server] log_format must be "text" or "json" (got "{cfg.log_format}")')


def _check_webhook_url(cfg: Config) -> None:
    """An operator's webhook URL naming an address the egress policy refuses is a mistake."""
    try:
        host = httpx.URL(cfg.webhook_url).host
    except httpx.InvalidURL as exc:
        raise ConfigError(f"[webhooks] url: {exc}") from None
    address = egress.literal_address(host)
    if address is None:
        return  # a name: judged on the addresses it resolves to, at each delivery
    decision = egress.policy(cfg.http_allow, cfg.http_deny).decide(address)
    if not decision.allowed:
        raise ConfigError(f"[webhooks] url is refused by the egress policy: {decision.reason()}")
