"""The agent as a subprocess: its config, starting it, reading its outbox, the cloud's view."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.cloud.config import load_cloud_config
from agent.cloud.watch import CloudWatcher
from support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo.yaml"
AGENT = [sys.executable, "-m", "agent"]


def write_agent_config(directory: Path, pki: Path, port: int, *, capture: Path | None = None,
                       can: str | None = None, vid: str = "VIN1", cert: Path | None = None,
                       key: Path | None = None, ca: Path | None = None,
                       signing_key: Path | None = None, realtime: bool = False,
                       policy: str = "", extra: str = "", store: Path | None = None,
                       dbc: Path | None = None, mapping: Path | None = None,
                       name: str = "agent.yaml", credentials: Path | None = None,
                       drop: str | None = None) -> Path:
    """An agent config for the demo vehicle (or ``dbc``/``mapping``) on ``pki`` and a broker
    on ``port``.

    The source is ``capture`` (a capture file) unless ``can`` gives the ``can:`` mapping
    verbatim; ``policy`` and ``extra`` are appended as YAML lines. The outbox is
    ``directory/outbox.db`` unless ``store`` says otherwise. ``credentials``: another folder
    holding the client certificate and key (``{vid}.crt``/``.key``). ``drop``: leave out one
    section (``can``, ``signing``, ``mqtt`` or ``store``).
    """
    if credentials is not None:
        cert, key = cert or credentials / f"{vid}.crt", key or credentials / f"{vid}.key"
    if signing_key is None:
        signing_key = pki / f"{vid}.signing.key"
        if not signing_key.exists():
            signing_key = pki / "VIN1.signing.key"
    source = can if can is not None else \
        f"{{capture: {capture}, realtime: {str(realtime).lower()}}}"
    sections = {
        "can": f"can: {source}\n",
        "signing": f"signing: {{key: {signing_key}}}\n",
        "mqtt": (f"mqtt: {{host: 127.0.0.1, port: {port}, ca: {ca or pki / 'ca.crt'}, "
                 f"cert: {cert or pki / f'{vid}.crt'},\n"
                 f"        key: {key or pki / f'{vid}.key'}, reconnect_min_s: 0.2, "
                 "reconnect_max_s: 1}\n"),
        "store": f"store: {{path: {store or directory / 'outbox.db'}}}\n",
    }
    path = directory / name
    path.write_text(f"vehicle_id: {vid}\n"
                    f"dbc: [{dbc or ROOT / 'dbc' / 'demo_vehicle.dbc'}]\n"
                    f"mapping: {mapping or ROOT / 'config' / 'mapping' / 'demo_vehicle.yaml'}\n"
                    + "".join(text for section, text in sections.items() if section != drop)
                    + f"{policy}\n{extra}\n")
    return path


def simulated_drive(directory: Path, seconds: float, seed: int) -> Path:
    """A candump capture of the demo vehicle's simulated drive."""
    from agent.dev.simulate import write_capture
    from agent.signals.vehicle import load_vehicle

    path = directory / "drive.log"
    write_capture(load_vehicle(DEMO), path, seconds, seed=seed)
    return path


def run_agent(config: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(AGENT + ["run", "--config", str(config), *args],
                          capture_output=True, text=True, errors="replace", timeout=timeout,
                          cwd=ROOT)


def start_agent(config: Path, *args: str) -> subprocess.Popen:
    """``car-agent run`` in the background, its stderr on a text pipe."""
    return subprocess.Popen(AGENT + ["run", "--config", str(config), *args],
                            stderr=subprocess.PIPE, text=True, errors="replace", cwd=ROOT)


def queued_seqs(outbox: Path) -> list[int]:
    """The seqs an outbox holds, read with plain sqlite (opening an Outbox would count a boot)."""
    conn = sqlite3.connect(outbox, timeout=10)
    try:
        return [seq for (seq,) in conn.execute("SELECT seq FROM entries ORDER BY seq")]
    finally:
        conn.close()


def failures(outbox: Path) -> dict[int, tuple[int, str | None]]:
    """{seq: (times refused, the last refusal's reason)} of the entries an outbox holds."""
    conn = sqlite3.connect(outbox, timeout=10)
    try:
        return {seq: (count, reason) for seq, count, reason in conn.execute(
            "SELECT seq, failures, last_error FROM entries ORDER BY seq")}
    finally:
        conn.close()


class Collector:
    """A CloudWatcher collecting every record it produces (and the raw payloads)."""

    def __init__(self, cloud_yaml: Path) -> None:
        self.records: list[dict] = []
        self.problems: list[str] = []
        self.raw: list[tuple[str, bytes]] = []
        self.watcher = CloudWatcher(load_cloud_config(cloud_yaml), self.records.append,
                                    on_problem=self.problems.append)
        check = self.watcher.checker.check

        def keep_raw(topic, payload, retained=False):
            self.raw.append((topic, payload))
            return check(topic, payload, retained)

        self.watcher.checker.check = keep_raw

    def __enter__(self) -> "Collector":
        self.watcher.start()
        assert self.watcher.connected.wait(20), self.problems
        return self

    def __exit__(self, *exc) -> None:
        self.watcher.stop()

    def start(self) -> "Collector":
        return self.__enter__()

    def verified(self, kind: str | None = None) -> list[dict]:
        return [r for r in self.records if r.get("verified")
                and (kind is None or r.get("kind") == kind)]

    def statuses(self) -> list[str]:
        return [r["status"] for r in self.records if "status" in r]

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        return wait_for(predicate, timeout, interval=0.05)

    def barrier(self, client, vid: str = "VIN2") -> None:
        """Publish a marker with ``client`` (a conftest VehicleClient for ``vid``) and wait for
        it: whatever the broker received before it has reached this collector too (mosquitto
        forwards in order). The marker is then removed from :attr:`records`."""
        token = f"barrier-{time.monotonic_ns()}"
        client.publish(f"vehicles/{vid}/status", token)
        assert self.wait_for(lambda: any(r.get("status") == token for r in self.records)), \
            "the barrier message did not arrive"
        self.records[:] = [r for r in self.records if r.get("status") != token]

    def wait_offline(self, since: int = 0, timeout: float = 15.0) -> bool:
        """Until an ``offline`` status (the agent's last publish) is among the records from
        index ``since`` on."""
        return self.wait_for(lambda: any(r.get("status") == "offline"
                                         for r in self.records[since:]), timeout)
