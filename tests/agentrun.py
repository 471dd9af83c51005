"""Shared helpers for tests that run the agent against the test broker: its config file, and
the agent as a subprocess (test_stream.py, test_faults.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_agent_config(directory: Path, pki: Path, port: int, capture: Path, *,
                       realtime: bool = False, credentials: Path | None = None,
                       extra: str = "") -> Path:
    """``directory/agent.yaml`` for VIN1 on ``capture``, outbox ``directory/outbox.db``.

    ``credentials``: another folder holding the client certificate and key (VIN1.crt/.key).
    """
    path = directory / "agent.yaml"
    credentials = credentials or pki
    path.write_text(f"""\
vehicle_id: VIN1
can: {{capture: {capture}, realtime: {str(realtime).lower()}}}
dbc: [{REPO / 'dbc' / 'demo_vehicle.dbc'}]
mapping: {REPO / 'config' / 'mapping' / 'demo_vehicle.yaml'}
signing: {{key: {pki / 'VIN1.signing.key'}}}
mqtt: {{host: 127.0.0.1, port: {port}, ca: {pki / 'ca.crt'}, cert: {credentials / 'VIN1.crt'},
        key: {credentials / 'VIN1.key'}, reconnect_min_s: 0.2, reconnect_max_s: 1}}
store: {{path: {directory / 'outbox.db'}}}
{extra}""")
    return path


def run_agent(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``car-agent run`` to its end."""
    return subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def simulated_drive(directory: Path, seconds: float, seed: int) -> Path:
    """A candump capture of the demo vehicle's simulated drive."""
    from agent.dev.simulate import write_capture
    from agent.signals.vehicle import load_vehicle

    path = directory / "drive.log"
    write_capture(load_vehicle(REPO / "config" / "demo.yaml"), path, seconds, seed=seed)
    return path
