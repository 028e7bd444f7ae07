"""systemd/stepd.service: the settings the daemon relies on, and `systemd-analyze verify`."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.server import reserved_fds

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "stepd.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: keys may repeat (each occurrence appends; an empty value resets)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):  # continuation line
            line = line[:-1] + " " + next(lines, "").strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        key, value = key.strip(), value.strip()
        current[key] = [] if value == "" else [*current.get(key, []), value]
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values is not None, f"{key}= missing"
    assert len(values) == 1, f"{key}= set {len(values)} times: {values}"
    return values[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_lifecycle(service):
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert seconds(one(service, "WatchdogSec")) > 0
    assert one(service, "Restart") == "on-failure"
    assert one(service, "KillMode") == "mixed"
    # SIGTERM -> wait shutdown_grace for running steps -> requeue -> exit 0: must fit.
    assert seconds(one(service, "TimeoutStopSec")) > Config().shutdown_grace


def test_exec_start_runs_stepd_serve(service):
    argv = shlex.split(one(service, "ExecStart"))
    assert Path(argv[0]).name == "stepd" and Path(argv[0]).is_absolute()
    assert argv[1] == "serve"
    assert argv[argv.index("--config") + 1] == "/etc/stepd/stepd.toml"


def test_the_open_file_limit_fits_the_connection_cap(service):
    # An unprivileged process cannot raise its hard limit: the unit sets it.
    soft, _, hard = one(service, "LimitNOFILE").partition(":")
    needed = Config().max_connections + reserved_fds(Config().concurrency)
    assert int(soft) >= needed and int(hard or soft) >= int(soft)


def test_identity_and_directories(service):
    assert one(service, "DynamicUser") == "yes"
    assert one(service, "StateDirectory") == "stepd"
    assert one(service, "ConfigurationDirectory") == "stepd"
    assert "PYTHONUNBUFFERED=1" in service["Environment"]
    assert one(service, "UMask") == "0077"


def test_hardening(service):
    expected_yes = [
        "NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
        "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
        "LockPersonality", "MemoryDenyWriteExecute", "ProtectHome",
    ]  # fmt: skip
    for key in expected_yes:
        assert one(service, key) == "yes", key
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "ProtectProc") == "invisible"
    assert one(service, "ProcSubset") == "pid"
    assert one(service, "SystemCallArchitectures") == "native"
    assert service["CapabilityBoundingSet"] == []  # present and empty: no capabilities
    assert service["AmbientCapabilities"] == []
    assert service["SystemCallFilter"][0] == "@system-service"
    families = set(one(service, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_network_stays_usable(service):
    # The API listens on TCP and the `http` tool reaches arbitrary hosts.
    assert service.get("PrivateNetwork", ["no"]) == ["no"]
    assert "IPAddressDeny" not in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not on PATH")
def test_systemd_analyze_verify(tmp_path):
    def verify(text: str) -> subprocess.CompletedProcess[str]:
        unit = tmp_path / "stepd.service"
        unit.write_text(text)
        return subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit)],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip

    # verify insists that ExecStart's binary exists: point it at this interpreter.
    original = UNIT.read_text()
    text = original.replace("ExecStart=/usr/local/bin/stepd ", f"ExecStart={sys.executable} ", 1)
    assert text != original

    # Sanity check that verify reports problems here at all (it exits 0 on unknown keys).
    bogus = verify(text.replace("[Service]\n", "[Service]\nNoSuchSetting=1\n", 1))
    if "NoSuchSetting" not in bogus.stdout + bogus.stderr:
        pytest.skip(f"systemd-analyze verify is not functional here: {bogus.stderr.strip()!r}")

    result = verify(text)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "stepd.service" not in output, output


def test_the_sandbox_may_cap_its_own_memory(service):
    # @resources is refused as a group, setrlimit (RLIMIT_AS for template_mb) allowed back
    # after it: systemd applies the filter lines in order.
    filters = service["SystemCallFilter"]
    assert filters.index("~@privileged @resources") < filters.index("setrlimit prlimit64")
