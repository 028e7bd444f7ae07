"""What a new user meets first: the generated admin token, where generated files live,
their permissions, and a daemon that survives its package being reinstalled under it."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon import config
from daemon.auth import GENERATED_TOKEN_FILE, active_tokens, hash_token
from daemon.config import TokenConfig
from daemon.errors import ConfigError
from tests.process_helpers import (
    TOKEN,
    Daemon,
    clean_env,
    create,
    free_port,
    gate_waiting,
    stepd_command,
    wait_for,
    write_config,
)

ROOT = Path(__file__).parents[1]
GENERATED = (GENERATED_TOKEN_FILE, "stepd-secret", "stepd-webhook-secret", "stepd-demo.db")
COUNTER_FLOW = {
    "name": "count",
    "flow": {"start": {"tool": "get_counter", "args": {}, "done": True}},
    "input": {},
}

Spawn = Callable[..., Daemon]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Make (not start) a daemon with its own working directory; all are killed at the end."""
    made: list[Daemon] = []

    def make(name: str, *, db: Path, extra: str = "", **cfg: Any) -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        port = free_port()
        path = write_config(workdir / "stepd.toml", port=port, db=db, **cfg)
        path.write_text(path.read_text() + extra)
        daemon = Daemon(workdir, path, port)
        daemon.env.pop("STATE_DIRECTORY")  # started from a shell: only the cwd differs
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


def printed_token(daemon: Daemon) -> str:
    found = re.search(r"export TOKEN=(\S+)", daemon.stdout())
    assert found is not None, daemon.stdout()
    return found.group(1)


def status(daemon: Daemon, token: str, method: str = "GET") -> int:
    with daemon.client(token) as c:
        if method == "POST":
            return c.post("/api/workflow", json=COUNTER_FLOW).status_code
        return c.get("/api/workflow").status_code


def tokens_line(daemon: Daemon) -> str:
    lines = [ln for ln in daemon.stderr().splitlines() if "active tokens:" in ln]
    assert len(lines) == 1, daemon.stderr()
    return lines[0]


# -- the generated admin token -------------------------------------------------------------


@pytest.mark.sqlite_only  # files kept beside the SQLite database file
def test_generated_token_survives_new_tokens_and_other_directories(
    spawn: Spawn, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    db = data / "stepd.db"
    first = spawn("first", db=db, tokens=None).started()
    admin = printed_token(first)
    with first.client(admin) as c:
        wf = wait_for(c, create(c, COUNTER_FLOW))
        assert wf["status"] == "completed", wf
        assert c.get("/ui/login").status_code == 200  # makes the session secret
    # Everything generated is beside the database, nothing in the working directory.
    for name in (GENERATED_TOKEN_FILE, "stepd-secret", "stepd-demo.db"):
        assert (data / name).exists(), name
    assert not any(p.name.startswith("stepd-") for p in first.workdir.iterdir())
    token_file = data / GENERATED_TOKEN_FILE
    assert tokens_line(first).endswith(f"active tokens: admin (generated, {token_file})")
    assert first.stop() == 0

    # Another working directory, and a token added to the config: the admin token stays.
    second = spawn("second", db=db).started()
    assert "export TOKEN=" not in second.stdout()
    assert status(second, admin, "POST") == 201 and status(second, TOKEN, "POST") == 201
    line = tokens_line(second)
    assert line.endswith(f"active tokens: james (config), admin (generated, {token_file})")
    assert admin not in second.stdout() + second.stderr()
    assert TOKEN not in second.stdout() + second.stderr()
    assert not any(p.name.startswith("stepd-") for p in second.workdir.iterdir())
    assert second.stop() == 0


@pytest.mark.sqlite_only  # files kept beside the SQLite database file
def test_admin_token_command_mints_a_new_admin_token(spawn: Spawn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = spawn("d", db=data / "stepd.db", tokens=None).started()
    lost = printed_token(daemon)
    assert daemon.stop() == 0

    minted = subprocess.run(
        [*stepd_command(), "admin-token", "--config", str(daemon.config)],
        env=clean_env(), capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    assert f"to {data / GENERATED_TOKEN_FILE}" in minted.stdout
    found = re.search(r"export TOKEN=(\S+)", minted.stdout)
    assert found is not None, minted.stdout
    new = found.group(1)
    assert (data / GENERATED_TOKEN_FILE).read_text().strip() == hash_token(new)
    assert stat.S_IMODE((data / GENERATED_TOKEN_FILE).stat().st_mode) == 0o600

    daemon.started()
    assert "export TOKEN=" not in daemon.stdout()
    assert status(daemon, new, "POST") == 201
    assert status(daemon, lost) == 401
    assert daemon.stop() == 0


@pytest.mark.sqlite_only  # files kept beside the SQLite database file
def test_a_configured_admin_replaces_the_generated_one(spawn: Spawn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = spawn("d", db=data / "stepd.db", tokens=None).started()
    generated = printed_token(daemon)
    assert daemon.stop() == 0
    write_config(daemon.config, port=daemon.port, db=data / "stepd.db",
                 tokens=[("admin", "tok-configured-admin", "approve")])  # fmt: skip
    daemon.started()
    assert tokens_line(daemon).endswith(
        "active tokens: admin (config, replaces the generated token in "
        f"{data / GENERATED_TOKEN_FILE})"
    )
    assert status(daemon, generated) == 401
    assert status(daemon, "tok-configured-admin") == 200
    assert daemon.stop() == 0
    refused = subprocess.run(
        [*stepd_command(), "admin-token", "--config", str(daemon.config)],
        env=clean_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.startswith("stepd: the config has a token named 'admin'")


def test_token_rule(tmp_path: Path) -> None:
    james = TokenConfig("james", hash_token("tok-james"), ("workflow",))
    # Configured tokens and no file: no admin token is made.
    only = active_tokens((james,), tmp_path)
    assert only.tokens == (james,) and only.new_token is None
    assert not (tmp_path / GENERATED_TOKEN_FILE).exists()
    assert only.describe() == "james (config)"
    # Delete the file with no token configured: a new admin token is made.
    made = active_tokens((), tmp_path)
    assert made.new_token is not None and [t.name for t in made.tokens] == ["admin"]
    (tmp_path / GENERATED_TOKEN_FILE).unlink()
    again = active_tokens((), tmp_path)
    assert again.new_token not in (None, made.new_token)
    # A file that is not a digest is a clear error, not a silent lock-out.
    (tmp_path / GENERATED_TOKEN_FILE).write_text("oops\n")
    with pytest.raises(ConfigError, match="delete it to generate a new admin token"):
        active_tokens((james,), tmp_path)


def test_generated_files_follow_the_database_not_the_working_directory(tmp_path: Path) -> None:
    cfg = config.from_dict({"database": {"path": str(tmp_path / "d" / "x.db")}}, env={})
    assert cfg.state_dir == tmp_path / "d"
    cfg = config.from_dict({"database": {"path": "y/x.db"}}, env={"STATE_DIRECTORY": "/srv/s"})
    assert cfg.state_dir == Path("/srv/s/y")


# -- permissions --------------------------------------------------------------------------


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


def _wait_for_files(directory: Path, names: set[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not names <= {p.name for p in directory.iterdir()}:
        assert time.monotonic() < deadline, (names, sorted(p.name for p in directory.iterdir()))
        time.sleep(0.05)


@pytest.mark.sqlite_only  # files kept beside the SQLite database file
def test_every_file_stepd_writes_is_owner_only_whatever_the_umask(
    spawn: Spawn, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: the delivery just fails
    daemon = spawn("d", db=data / "stepd.db", tokens=None,
                   extra=f'\n[webhooks]\nurl = "{hook}"\n')  # fmt: skip
    daemon.umask = 0
    daemon.env["STATE_DIRECTORY"] = str(data)  # (so an older stepd wrote here as well)
    expected = {
        "stepd.db", "stepd.db-wal", "stepd.db-shm", "stepd.db.lock", GENERATED_TOKEN_FILE,
        "stepd-secret", "stepd-webhook-secret", "stepd-demo.db",
    }  # fmt: skip
    # (The demo database's -wal and -shm go away when its last connection closes.)

    def exercise() -> None:
        with daemon.client(token) as c:
            assert wait_for(c, create(c, COUNTER_FLOW))["status"] == "completed"
            assert c.get("/ui/login").status_code == 200  # the session secret
        _wait_for_files(data, expected)  # the webhook secret: at the first delivery

    daemon.started()
    token = printed_token(daemon)
    exercise()
    assert _modes(data) == dict.fromkeys(_modes(data), 0o600)

    backup = tmp_path / "backup.db"
    out = subprocess.run(
        [*stepd_command(), "backup", str(backup), "--config", str(daemon.config)],
        env=clean_env(), capture_output=True, text=True, timeout=30, umask=0,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert daemon.stop() == 0

    # Files an older version left readable are tightened when the daemon opens them.
    for path in data.iterdir():
        path.chmod(0o644)
    daemon.started()
    exercise()
    assert _modes(data) == dict.fromkeys(_modes(data), 0o600)
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("tokens", "needle"),
    [
        ([{"name": "link"}], "the name 'link' is reserved"),
        ([{"name": "approve"}], "the name 'approve' is reserved"),
        ([{"name": "workflow"}], "the name 'workflow' is reserved"),
        ([{"name": "ann"}, {"name": "bob"}, {"name": "ann"}], "#3: the name 'ann' is used"),
        ([{"name": "Link"}], "the name 'Link' is reserved"),
        ([{"name": "ann"}, {"name": "ANN"}], "#2: the name 'ANN' is used"),
        ([{"name": "link "}], "#1: name must be 1 to 64 letters"),
        ([{"name": "a\nINFO stepd: forged"}], "#1: name must be"),
        ([{"name": ""}], "#1: name must be"),
        ([{"name": "ann"}, {"name": "bob", "sha256": "0" * 64}], "#2 (bob): another token"),
    ],
)
def test_reserved_and_duplicate_token_names_are_refused(tokens, needle) -> None:
    entries = [{"sha256": f"{i:064x}", **t} for i, t in enumerate(tokens)]
    with pytest.raises(ConfigError) as info:
        config.from_dict({"auth": {"tokens": entries}}, env={})
    assert needle in str(info.value)


# -- the quick start's two commands ---------------------------------------------------------


def _readme_block(after: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(re.escape(after) + r".*?```sh\n(.*?)\n```", text, re.S)
    assert found is not None, after
    return found.group(1)


def test_ci_runs_the_readme_test_command_in_a_venv_of_its_own() -> None:
    serve = _readme_block("## Quick start")
    test = _readme_block("and run the tests, once on SQLite and once on PostgreSQL:")
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
    # Both passes: the default backend (SQLite), then PostgreSQL.
    passes = test.split(" && ")[2:]
    assert passes == [".venv-test/bin/python -m pytest",
                      "STEPD_TEST_BACKEND=postgresql .venv-test/bin/python -m pytest"]  # fmt: skip

    def venvs(command: str) -> set[str]:
        return {w.split("/")[0] for w in shlex.split(command) if w.startswith(".venv")}

    assert venvs(serve) == {".venv"} and venvs(test) == {".venv-test"}
    assert "-e" in shlex.split(test)  # only the test venv is an editable install


class _Hooks(http.server.BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type("Hooks", (_Hooks,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    finally:
        server.shutdown()
        server.server_close()


def test_pages_keep_working_when_the_package_is_replaced_under_the_daemon(
    tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    hook, bodies = receiver
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "daemon", pkg / "daemon", ignore=shutil.ignore_patterns("__pycache__"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    port = free_port()
    cfg = write_config(workdir / "stepd.toml", port=port, db=workdir / "stepd.db")
    cfg.write_text(cfg.read_text() + f'\n[webhooks]\nurl = "{hook}"\n'
                   f'public_url = "http://127.0.0.1:{port}"\n')  # fmt: skip
    daemon = Daemon(workdir, cfg, port, PYTHONPATH=str(pkg))
    where = subprocess.run(
        [sys.executable, "-c", "import daemon; print(daemon.__file__)"],
        env=daemon.env, cwd=workdir, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert where.stdout.strip() == str(pkg / "daemon" / "__init__.py"), where
    try:
        daemon.started()
        with daemon.client() as c:
            assert c.get("/ui/login").status_code == 200  # one template used before
            wf_id = create(c, {
                "name": "gated",
                "flow": {"start": {"tool": None, "next": "after"},
                         "after": {"tool": "echo", "args": {}, "done": True}},
                "input": {},
            })  # fmt: skip
            wait_for(c, wf_id, gate_waiting)
        deadline = time.monotonic() + 10
        while not any(b["event"] == "gate_waiting" for b in bodies):
            assert time.monotonic() < deadline, bodies
            time.sleep(0.05)
        link = next(b for b in bodies if b["event"] == "gate_waiting")["links"]["approve"]

        shutil.rmtree(pkg / "daemon")  # what `pip install` into the daemon's venv does

        with httpx.Client(base_url=daemon.url, timeout=5) as web:
            page = web.get("/ui/login")
            assert page.status_code == 200, page.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf is not None, page.text
            form = {"csrf": csrf.group(1), "token": TOKEN, "next": "/ui/approvals"}
            assert web.post("/ui/login", data=form).status_code == 303
            for path in ("/ui/approvals", "/ui/workflows", f"/ui/workflows/{wf_id}"):
                resp = web.get(path)
                assert resp.status_code == 200, (path, resp.text)
            css = web.get("/ui/static/app.css")
            assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
            again = web.get("/ui/static/app.css", headers={"If-None-Match": css.headers["etag"]})
            assert again.status_code == 304
            assert web.get("/ui/static/nope.css").status_code == 404
            confirm = web.get(link)
            assert confirm.status_code == 200 and "<form" in confirm.text, confirm.text
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert "Traceback" not in daemon.stderr(), daemon.stderr()
