"""contrib/systemd/popproxy.service: its settings, and systemd's own checks of it.

`systemd-analyze verify` runs against a throwaway root (the host's unit directory
copied in, stand-ins for the executables), because it also checks that ExecStart
exists; `systemd-analyze security --offline` scores the sandbox. Neither needs a
running systemd.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from popproxy import cli

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "popproxy.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
# systemd-analyze runs in well under a second; this only stops a hung one.
ANALYZE_TIMEOUT_SECONDS = 60
# `systemd-analyze security` exposure, in tenths (its --threshold unit): 2.0 of 10 is
# well inside its "OK" band; the unit scores 1.4 today.
MAX_EXPOSURE_TENTHS = 20


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting before any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, (
        "systemd-analyze is missing: install Debian's systemd package (scripts/test does)"
    )
    return tool


def test_the_unit_runs_popproxy_as_a_notify_service_reloaded_by_sighup() -> None:
    service = unit_settings(UNIT)["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/bin/popproxy run -c /etc/popproxy/popproxy.yaml"]
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == ["on-failure"]
    assert service["DynamicUser"] == ["yes"]
    assert service["StateDirectory"] == ["popproxy"]


def test_the_units_command_lines_are_ones_popproxy_accepts() -> None:
    service = unit_settings(UNIT)["Service"]
    commands = [service["ExecStart"][0], *service["ExecReload"][:-1]]
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "/usr/bin/popproxy"
        args = cli._parser().parse_args(argv[1:])
        assert args.config == "/etc/popproxy/popproxy.yaml"


def test_the_unit_is_sandboxed() -> None:
    service = unit_settings(UNIT)["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
    }
    assert {key: service.get(key, ["(missing)"])[0] for key in expected} == expected
    assert service["SystemCallFilter"][0] == "@system-service"


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    tool = systemd_analyze()
    assert SYSTEM_UNITS.is_dir(), (
        f"no {SYSTEM_UNITS} to verify the unit's dependencies against (Debian's systemd"
        " package has it; scripts/test installs it)"
    )
    root = _analyze_root(tmp_path)
    installed = root / "etc" / "systemd" / "system" / UNIT.name
    shutil.copyfile(UNIT, installed)
    proc = subprocess.run(
        [tool, "verify", f"--root={root}", str(installed)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_SECONDS,
        check=False,
    )
    # verify exits 0 on an unknown key and only says so on stderr: both must be clean.
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_systemd_analyze_security_rates_the_sandbox_ok() -> None:
    tool = systemd_analyze()
    proc = subprocess.run(
        [tool, "security", "--offline=yes", f"--threshold={MAX_EXPOSURE_TENTHS}", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Overall exposure level for popproxy.service" in proc.stdout


TEMPLATE = REPO / "contrib" / "systemd" / "popproxy@.service"
TARGET = REPO / "contrib" / "systemd" / "popproxy.target"
INSTANCE = "popproxy@9111.service"


def test_the_template_runs_one_instance_per_metrics_port_as_one_user() -> None:
    """popproxy@PORT: the same config, /metrics on PORT; one user for all instances
    (SO_REUSEPORT shares a port only between sockets of one user); the rest as the
    single unit."""
    template = unit_settings(TEMPLATE)
    single = unit_settings(UNIT)
    service = template["Service"]
    assert service["ExecStart"] == [single["Service"]["ExecStart"][0] + " --metrics-port %i"]
    argv = shlex.split(service["ExecStart"][0].replace("%i", "9111"))
    args = cli._parser().parse_args(argv[1:])
    assert (args.config, args.metrics_port) == ("/etc/popproxy/popproxy.yaml", 9111)
    assert (service["DynamicUser"], service["User"]) == (["yes"], ["popproxy"])
    assert template["Unit"]["PartOf"] == ["popproxy.target"]
    shared = {k: v for k, v in single["Service"].items() if k != "ExecStart"}
    assert {k: service[k] for k in shared} == shared


def test_systemd_analyze_verifies_an_instance_and_the_target(tmp_path: Path) -> None:
    tool = systemd_analyze()
    assert SYSTEM_UNITS.is_dir(), f"no {SYSTEM_UNITS} (scripts/test installs systemd)"
    root = _analyze_root(tmp_path)
    units = root / "etc" / "systemd" / "system"
    for source in (TEMPLATE, TARGET):
        shutil.copyfile(source, units / source.name)
    (units / INSTANCE).symlink_to(TEMPLATE.name)
    proc = subprocess.run(
        [tool, "verify", f"--root={root}", str(units / INSTANCE), str(units / TARGET.name)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_SECONDS,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = subprocess.run(
        [
            tool,
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE_TENTHS}",
            str(units / INSTANCE),
        ],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Overall exposure level for {INSTANCE}" in proc.stdout


def _analyze_root(tmp_path: Path) -> Path:
    """A throwaway root with the host's units and stand-ins for the executables."""
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for name in ("popproxy", "kill"):  # verify checks that each Exec command exists
        stand_in = root / "usr" / "bin" / name
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    return root
