"""The shipped systemd units: hardening measured by systemd-analyze, and the settings the agent
relies on (notify + watchdog, restart, CAN sockets allowed, no capabilities)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "car-agent.service"
VCAN_UNIT = REPO / "systemd" / "vcan@.service"
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing in CI (Debian package systemd)")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return exe


def _settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """{(section, key): [values in order]} of a unit file (continuation lines joined)."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {raw!r}"
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def _effective_list(values: list[str]) -> list[str]:
    """systemd list semantics: an empty assignment resets the list."""
    items: list[str] = []
    for value in values:
        items = [] if value == "" else items + value.split()
    return items


def test_exposure_is_at_most_2(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    result = subprocess.run([exe, "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""})
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for car-agent\.service:\s*([0-9]+(?:\.[0-9]+)?)",
                      output)
    assert match, f"no overall exposure in the output of systemd-analyze:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_verify_complains_only_about_the_missing_binary() -> None:
    exe = _systemd_analyze()
    result = subprocess.run([exe, "verify", str(UNIT)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SYSTEMD_COLORS": "0"})
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "is not executable" not in line]
    assert complaints == []


def test_vcan_template_verifies_and_names_the_interface(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    shutil.copy(VCAN_UNIT, tmp_path / VCAN_UNIT.name)
    result = subprocess.run([exe, "verify", str(tmp_path / "vcan@0.service")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_COLORS": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    vcan = _settings(VCAN_UNIT)
    assert vcan[("Service", "Type")] == ["oneshot"]
    assert vcan[("Service", "RemainAfterExit")] == ["yes"]
    assert vcan[("Service", "ExecStart")] == ["/sbin/ip link add dev vcan%i type vcan"]
    assert vcan[("Service", "ExecStop")] == ["/sbin/ip link delete vcan%i"]


def test_unit_settings_the_agent_relies_on() -> None:
    unit = _settings(UNIT)

    def last(key: str) -> str:
        assert ("Service", key) in unit, f"{UNIT.name}: [Service] {key}= missing"
        return unit[("Service", key)][-1]

    assert last("Type") == "notify"
    assert last("NotifyAccess") == "main"
    assert re.fullmatch(r"[1-9][0-9]*s?", last("WatchdogSec"))
    assert last("Restart") == "on-failure"
    # A configuration mistake exits 2 and must fail the unit visibly, not restart in a loop.
    assert "2" in _effective_list(unit[("Service", "RestartPreventExitStatus")])
    assert last("ExecStart").split()[1:] == ["run", "--config", "/etc/car-agent/config.yaml"]
    families = _effective_list(unit[("Service", "RestrictAddressFamilies")])
    assert "AF_CAN" in families
    assert not [f for f in families if f.startswith("~")]         # an allow list
    assert _effective_list(unit[("Service", "CapabilityBoundingSet")]) == []
    assert _effective_list(unit[("Service", "AmbientCapabilities")]) == []
    assert "PrivateNetwork" not in {key for _, key in unit}          # CAN needs the host's net
    assert last("StateDirectory") == "car-agent"
    assert re.fullmatch(r"[1-9][0-9]*[KMG]", last("MemoryMax"))    # bounded, not "infinity"


def test_readme_documents_the_drop_in_for_device_node_adapters() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("/etc/systemd/system/car-agent.service.d/devices.conf")
    drop_in = readme[start:readme.index("```", start)]
    for setting in ("PrivateDevices=no", "DeviceAllow=/dev/ttyACM0 rw", "PrivateUsers=no",
                    "SupplementaryGroups=dialout"):
        assert setting in drop_in, setting


def test_credentials_are_loaded_from_root_only_files() -> None:
    unit = _settings(UNIT)
    creds = dict(value.split(":", 1) for value in unit[("Service", "LoadCredential")])
    assert set(creds) >= {"signing.key", "mqtt.key"}
    assert all(path.startswith("/etc/car-agent/keys/") for path in creds.values())
