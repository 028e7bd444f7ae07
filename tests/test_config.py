"""Configuration loading: the example file documents every setting with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from daemon import config
from daemon.config import Config
from daemon.errors import ConfigError

ROOT = Path(__file__).parents[1]


def test_example_config_loads_and_matches_the_defaults(tmp_path):
    loaded = config.load(ROOT / "config.example.toml", env={"STATE_DIRECTORY": str(tmp_path)})
    default = config.load(None, env={"STATE_DIRECTORY": str(tmp_path)})
    assert dataclasses.replace(loaded, config_dir=None) == default
    assert loaded.config_dir == ROOT
    assert loaded.db_path == tmp_path / "stepd.db"
    assert loaded.tool_modules == ("daemon.tools.demo",)


def test_example_config_documents_every_setting():
    text = (ROOT / "config.example.toml").read_text()
    documented = {key for section in config._SCHEMA.values() for key in section}
    for key in documented:
        # A setting whose default follows another one is shown commented out.
        shown = f"\n{key} = " in text or f"\n# {key} = " in text
        assert shown, f"{key} is not in config.example.toml"
    settable = {attr for section in config._SCHEMA.values() for attr, _ in section.values()}
    internal = {"tokens", "state_dir", "config_dir"}
    assert {f.name for f in dataclasses.fields(Config)} - internal == settable
    for key in ("[[auth.tokens]]", "name =", "sha256 =", "permissions ="):
        assert key in text


def test_relative_paths_follow_state_directory(tmp_path):
    cfg = config.from_dict({"database": {"path": "x/y.db"}}, env={"STATE_DIRECTORY": "/srv/a:/b"})
    assert cfg.db_path == Path("/srv/a/x/y.db")
    cfg = config.from_dict({"database": {"path": "/abs.db"}}, env={})
    assert cfg.db_path == Path("/abs.db")
    cfg = config.from_dict({}, env={})
    assert cfg.db_path == Path.cwd() / "stepd.db" and cfg.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"serverr": {}}, "unknown config section [serverr]"),
        ({"server": {"prot": 1}}, "unknown key 'prot' in [server]"),
        ({"server": {"port": "80"}}, "[server] port: wrong type"),
        ({"server": {"port": 70000}}, "port must be between"),
        ({"executor": {"poll_interval": 0}}, "poll_interval must be > 0"),
        ({"server": {"max_connections": 0}}, "max_connections must be >= 1"),
        ({"server": {"max_connections": 1.5}}, "[server] max_connections: wrong type"),
        ({"server": {"header_timeout_s": 0}}, "header_timeout_s must be a number of seconds"),
        ({"server": {"header_timeout_s": float("inf")}}, "header_timeout_s must be"),
        ({"server": {"body_timeout_s": -1}}, "body_timeout_s must be a number of seconds"),
        ({"server": {"body_timeout_s": float("nan")}}, "body_timeout_s must be"),
        ({"server": {"body_timeout_s": "60"}}, "[server] body_timeout_s: wrong type"),
        ({"executor": {"concurrency": True}}, "wrong type"),
        ({"database": {"synchronous": "OFF"}}, "synchronous must be"),
        ({"tools": {"modules": [1]}}, "list of module names"),
        ({"auth": {"tokens": [{"name": "a", "sha256": "zz"}]}}, "64 hex"),
        ({"auth": {"tokens": [{"name": "a", "sha256": "g" * 64}]}}, "not hex"),
        ({"auth": {"tokens": [{"name": "", "sha256": "a" * 64}]}}, "name must be"),
        (
            {"auth": {"tokens": [{"name": "a", "sha256": "a" * 64, "permissions": ["root"]}]}},
            "permissions must be",
        ),
        ({"auth": {"users": []}}, "[auth] accepts only"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(data, needle):
    with pytest.raises(ConfigError) as info:
        config.from_dict(data, env={})
    assert needle in str(info.value)


def test_each_tokens_share_of_the_run_slots():
    def share(executor: dict) -> int:
        return config.from_dict({"executor": executor}, env={}).running_share

    assert share({}) == 8  # half of the default concurrency, 16
    assert share({"concurrency": 40}) == 20  # unset, it follows concurrency
    assert share({"concurrency": 1}) == 1
    assert share({"concurrency": 4, "max_running_per_token": 4}) == 4
    for bad in (0, -1, 5):
        with pytest.raises(ConfigError, match="max_running_per_token must be between 1 and"):
            share({"concurrency": 4, "max_running_per_token": bad})


def test_token_entries(tmp_path):
    cfg = config.from_dict(
        {"auth": {"tokens": [{"name": "a", "sha256": "A" * 64, "permissions": ["approve"]}]}},
        env={},
    )
    assert cfg.tokens == (config.TokenConfig("a", "a" * 64, ("approve",)),)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.load(bad)


def test_database_url_picks_the_backend(tmp_path):
    env = {"STATE_DIRECTORY": str(tmp_path)}
    cfg = config.from_dict({"database": {"url": "sqlite:///x/y.db"}}, env=env)
    assert (cfg.db_path, cfg.database_url, cfg.backend) == (tmp_path / "x/y.db", "", "sqlite")
    cfg = config.from_dict({"database": {"url": "sqlite:////abs/s.db"}}, env=env)
    assert cfg.db_path == Path("/abs/s.db") and cfg.state_dir == Path("/abs")
    url = "postgresql://stepd@127.0.0.1:5432/stepd"
    cfg = config.from_dict({"database": {"url": url}}, env=env)
    assert (cfg.database_url, cfg.backend) == (url, "postgresql")
    assert cfg.state_dir == tmp_path  # the token hash and the demo database stay local
    for bad, needle in (
        ({"url": "mysql://x/y"}, "must start with sqlite:/// (a file) or postgresql://"),
        ({"url": "sqlite:///"}, "needs a file name"),
        ({"url": url, "path": "x.db"}, "url or path, not both"),
        ({"url": 5}, "wrong type"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            config.from_dict({"database": bad}, env=env)


def test_node_id_and_command_line_overrides(tmp_path):
    cfg = config.from_dict({"server": {"port": 8123}}, env={})
    assert cfg.node.endswith(":8123") and cfg.node_id == ""
    cfg = config.from_dict({"server": {"node_id": "worker-1"}}, env={})
    assert cfg.node == "worker-1"
    url = "postgresql://stepd@127.0.0.1/stepd"
    out = config.override(cfg, database=url, port=9001, host="127.0.0.2", node_id="w2")
    assert (out.database_url, out.port, out.host, out.node) == (url, 9001, "127.0.0.2", "w2")
    out = config.override(cfg, database=f"sqlite:///{tmp_path}/a.db")  # sqlite:////tmp/...
    assert out.db_path == tmp_path / "a.db" and out.database_url == ""
    assert config.override(cfg) is cfg
    with pytest.raises(ConfigError, match="port"):
        config.override(cfg, port=0)
