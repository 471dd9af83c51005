"""The real agent pipeline (Agent.run) in a thread on a python-can virtual bus, connected to a
real broker: for tests that talk to a running car (snapshot requests, status, serve)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import can

from coredata import DEMO_DBC, DEMO_MAPPING


def agent_yaml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"vehicle_id: VIN1\ndbc: [{DEMO_DBC}]\nmapping: {DEMO_MAPPING}\n{extra}")
    return path


class RunningAgent:
    """The real pipeline (Agent.run) in a thread, reading a python-can virtual bus."""

    def __init__(self, tmp_path: Path, pki: Path, port: int, extra: str = "") -> None:
        from agent.service.daemon import Agent

        channel = f"h3-{uuid.uuid4().hex[:8]}"
        config = agent_yaml(tmp_path, f"""\
can: {{interface: virtual, channel: {channel}}}
signing: {{key: {pki / 'VIN1.signing.key'}}}
mqtt: {{host: 127.0.0.1, port: {port}, ca: {pki / 'ca.crt'}, cert: {pki / 'VIN1.crt'},
        key: {pki / 'VIN1.key'}, reconnect_min_s: 0.1, reconnect_max_s: 0.5}}
store: {{path: {tmp_path / 'outbox.db'}}}
policy: {{snapshot_min_interval_s: 3600, heartbeat_s: 3600}}
logging: {{stats_interval_s: 1}}
{extra}
""")
        for key in ("VIN1.signing.key", "VIN1.key"):
            (pki / key).chmod(0o600)
        self.agent = Agent(config)
        self.bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._sending = threading.Event()
        self._sender: threading.Thread | None = None

    def _run(self) -> None:
        self.result = self.agent.run()

    def __enter__(self) -> "RunningAgent":
        self.thread.start()
        assert self.agent.uplink.connected.wait(15), self.agent.uplink.last_error
        return self

    def keep_sending(self, frames: dict[int, bytes], period: float = 0.05) -> None:
        """Send these frames every ``period`` s, as ECUs do (signals go stale otherwise)."""
        def send() -> None:
            while not self._sending.wait(period):
                for can_id, data in frames.items():
                    self.bus.send(can.Message(arbitration_id=can_id, data=data,
                                              is_extended_id=False))
        self._sender = threading.Thread(target=send, daemon=True)
        self._sender.start()

    def __exit__(self, *exc) -> None:
        self._sending.set()
        if self._sender is not None:
            self._sender.join(5)
        self.agent.request_stop()
        self.thread.join(30)
        self.bus.shutdown()
        assert not self.thread.is_alive()
