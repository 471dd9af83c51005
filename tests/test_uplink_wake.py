"""Uplink.wake: an entry added to the outbox is published when it is added, not when the
uplink thread's wait on its socket ends. The wait is made a minute long here, so without the
wake-up the entry would sit there well past the test's (generous) wait for its PUBACK."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.config import load_config
from agent.uplink.mqtt import Uplink
from agent.uplink.outbox import Outbox
from coredata import DEMO_DBC, DEMO_MAPPING


def test_wake_publishes_without_waiting_for_the_socket_timeout(tmp_path: Path, pki: Path,
                                                                broker) -> None:
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        f"vehicle_id: VIN1\ndbc: [{DEMO_DBC}]\nmapping: {DEMO_MAPPING}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, ca: {pki / 'ca.crt'}, "
        f"cert: {pki / 'VIN1.crt'}, key: {pki / 'VIN1.key'}}}\n")
    config = load_config(config_path)
    with Outbox(tmp_path / "outbox.db") as outbox:
        uplink = Uplink(config.mqtt, "VIN1", outbox)
        client = uplink.client
        loop = client.loop
        online_acked, long_wait = threading.Event(), threading.Event()

        def slow_loop(timeout: float = 1.0):
            if not online_acked.is_set():
                return loop(timeout)
            long_wait.set()
            return loop(timeout=60.0)       # once connected, nothing else ends the wait

        client.loop = slow_loop
        on_publish = client.on_publish

        def published(*args) -> None:
            on_publish(*args)
            online_acked.set()              # the retained "online" status went out

        client.on_publish = published
        acked = threading.Event()
        delete = outbox.delete

        def deleted(seq: int) -> None:
            delete(seq)
            acked.set()

        outbox.delete = deleted
        uplink.start()
        try:
            assert uplink.connected.wait(20) and online_acked.wait(20)
            # Set only by a loop call after the ack: the thread is in (or entering) its long
            # wait. (Clearing it here raced with a thread already inside that wait.)
            assert long_wait.wait(20)       # the uplink thread waits on its socket
            entry = outbox.add(uplink.topics["events"], "event", lambda seq: b'{"seq":%d}' % seq)
            uplink.wake()
            assert acked.wait(30), "the entry was not published until the socket wait ended"
            assert len(outbox) == 0 and entry.seq >= 1
        finally:
            client.loop = loop
            uplink.wake()                   # out of the long wait, to stop
            uplink.stop(offline_timeout=1)
