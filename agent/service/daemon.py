"""``car-agent run``: source -> decode -> state -> policy -> signed envelope -> outbox -> MQTT.

The main loop is single-threaded and plain: receive a frame (or time out), turn it into
changes, let the policy decide what to sign, commit signed envelopes to the outbox. The uplink
thread drains the outbox. SIGTERM/SIGINT stop reading, flush what the policy holds, wait for
the outbox to drain (bounded), publish ``offline`` and exit 0.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass

from agent.service import logsetup
from agent.uplink.envelope import Envelopes
from agent.uplink.keyfiles import certificate_expiry_warning, check_private_key_file
from agent.uplink.outbox import Outbox
from agent.signals.policy import Outgoing, PublishPolicy
from agent.service.sdnotify import Notifier
from agent.uplink.signing import Signer
from agent.can.source import FrameSource, open_source
from agent.signals.state import SignalPipeline
from agent.uplink.mqtt import Uplink, certificate_expiry
from agent.signals.vehicle import load_vehicle

log = logging.getLogger("car_agent.daemon")

RECV_TIMEOUT_S = 0.05
SHUTDOWN_DRAIN_S = 5.0


@dataclass
class RunResult:
    exit_code: int
    queued: int
    message: str


class Agent:
    """The running pipeline; built from a config file, driven by :meth:`run`."""

    def __init__(self, config_path, drain_timeout: float = 30.0) -> None:
        vehicle = load_vehicle(config_path)
        config = vehicle.config
        config.require("can", "signing", "mqtt", "store")
        self.vehicle = vehicle
        self.config = config
        self.drain_timeout = drain_timeout
        # Refuse careless key files before using them (mode, owner): one line saying which.
        check_private_key_file(config.signing.key, "signing.key")
        check_private_key_file(config.mqtt.key, "mqtt.key")
        self.signer = Signer.from_file(config.signing.key)
        self.decoder = vehicle.decoder()
        self.pipeline = SignalPipeline(self.decoder)
        self.policy = PublishPolicy(self.decoder.paths, config.policy)
        self.outbox = Outbox(config.store.path, max_bytes=config.store.max_bytes,
                             max_age_s=config.store.max_age_s)
        self.envelopes = Envelopes(self.signer, config.vehicle_id, self.outbox.boot)
        self.uplink = Uplink(config.mqtt, config.vehicle_id, self.outbox)
        self.stop_requested = threading.Event()
        self.source: FrameSource | None = None
        self.notifier = Notifier.from_environ()
        self._next_cert_check = 0.0
        self.cert_warning: str | None = None
        self._last_health: tuple[float, int] | None = None   # (monotonic time, frames)
        self.store_errors = 0

    def request_stop(self, *_: object) -> None:
        self.stop_requested.set()

    def _commit(self, outgoing: list[Outgoing], now: float) -> None:
        topics = self.uplink.topics
        for item in outgoing:
            try:
                if item.kind == "event":
                    self.outbox.add(topics["events"], "event", self.envelopes.event(item.changes))
                else:
                    self.outbox.add(topics["state"], "state",
                                    self.envelopes.state(self.pipeline.state, now), retain=True)
            except sqlite3.Error as exc:
                # Disk full or an I/O error: this message is lost (the next snapshot carries
                # its values) but the daemon and everything already queued are not.
                self.store_errors += 1
                log.error("outbox: cannot store a %s message (%d so far): %s", item.kind,
                          self.store_errors, exc)
        if outgoing:
            self.uplink.wake()

    def run(self) -> RunResult:
        config = self.config
        log.info("car-agent: vehicle %s, boot %d, %d signals from %d frame id(s), outbox %s "
                 "(%d queued)", config.vehicle_id, self.outbox.boot, len(self.decoder.paths),
                 len(self.decoder.frame_keys), config.store.path, len(self.outbox))
        self.source = source = open_source(config.can, self.decoder.can_filters())
        self.uplink.start()
        self._check_certificate()
        # Ready once the bus is open and the uplink runs; not waiting for the broker: a car
        # without coverage has still started.
        self.notifier.ready(f"vehicle {config.vehicle_id}: {len(self.decoder.paths)} signals, "
                            f"{len(self.outbox)} queued")
        notifier = self.notifier
        pipeline, policy = self.pipeline, self.policy
        interval = config.logging.stats_interval_s
        next_stats = time.monotonic() + interval
        try:
            while not self.stop_requested.is_set():
                notifier.watchdog()
                msg = source.recv(RECV_TIMEOUT_S)
                if msg is not None:
                    changes = pipeline.feed(msg)
                else:
                    if source.finished:
                        break
                    changes = pipeline.tick(source.now())
                if changes:
                    policy.observe(changes)
                now = source.now()
                outgoing = policy.due(now)
                if outgoing:
                    self._commit(outgoing, now)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + interval
                    self._report_health()
            # Capture finished or stop requested: what the policy holds goes out now.
            notifier.stopping("flushing and draining the outbox")
            self._commit(policy.flush(source.now()), source.now())
            capture = config.can.capture is not None
            timeout = self.drain_timeout if capture and not self.stop_requested.is_set() \
                else SHUTDOWN_DRAIN_S
            drained = self.uplink.wait_drained(timeout)
            queued = len(self.outbox)
            summary = source.summary()
            if summary:
                log.info("%s", summary)
            log.info("stats: %s; uplink %s", self._stats_line(), self.uplink.status_line())
            if capture and not drained and not self.stop_requested.is_set():
                reason = f" (last error: {self.uplink.last_error})" if self.uplink.last_error else ""
                return RunResult(1, queued, f"could not deliver within {timeout:g} s: "
                                            f"{queued} message(s) stay queued in "
                                            f"{config.store.path} and are sent on the next "
                                            f"start{reason}")
            if queued:
                return RunResult(0, queued, f"stopped with {queued} message(s) queued in "
                                            f"{config.store.path}; they are sent on the next start")
            return RunResult(0, 0, "stopped; outbox empty")
        finally:
            self.uplink.stop()
            source.close()
            self.outbox.close()
            self.notifier.close()

    def _report_health(self) -> None:
        """Log a stats line and publish the metrics topic (bus health, queue, uplink)."""
        now = time.monotonic()
        counters = self.decoder.counters
        last = self._last_health
        rate = 0.0
        if last is not None and now > last[0]:
            rate = (counters.frames - last[1]) / (now - last[0])
        self._last_health = (now, counters.frames)
        log.info("stats: %.0f frames/s; %s; uplink %s", rate, self._stats_line(),
                 self.uplink.status_line())
        outbox = self.outbox.stats()
        metrics = {
            "ts": int(time.time() * 1000), "frames_per_s": round(rate, 1),
            "source": self.source.health() if self.source else {},
            "decode": counters.as_dict(),
            "outbox": {"queued": outbox.queued, "bytes": outbox.queued_bytes,
                       "dropped_full": outbox.dropped_full, "dropped_age": outbox.dropped_age,
                       "refused": outbox.failed, "store_errors": self.store_errors},
        }
        expiry = certificate_expiry(self.config.mqtt.cert)
        metrics["certificate"] = {
            "expires": None if expiry is None else expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "warning": self.cert_warning}
        metrics["log_lines_suppressed"] = logsetup.rate_limit.suppressed \
            if logsetup.rate_limit else 0
        self.uplink.publish_metrics(json.dumps(metrics, separators=(",", ":")).encode())
        self.notifier.status(f"{rate:.0f} frames/s, {outbox.queued} queued, uplink "
                             f"{'connected' if self.uplink.connected.is_set() else 'disconnected'}")
        if now >= self._next_cert_check:
            self._check_certificate()

    def _check_certificate(self) -> None:
        """Warn ahead of the client certificate's expiry (checked at start and daily)."""
        self._next_cert_check = time.monotonic() + 86400.0
        warning = certificate_expiry_warning(self.config.mqtt.cert,
                                             self.config.security.cert_warn_days)
        self.cert_warning = warning
        if warning:
            log.warning("%s", warning)

    def _stats_line(self) -> str:
        c = self.decoder.counters
        p = self.policy.counters
        o = self.outbox.stats()
        return (f"{c.summary()}; {p.events} events, {p.snapshots} snapshots "
                f"signed; outbox {o.queued} queued ({o.queued_bytes} B), {o.dropped_full} "
                f"dropped (full), {o.dropped_age} dropped (age)")


def run(config_path, drain_timeout: float = 30.0, debug: bool = False) -> RunResult:
    agent = Agent(config_path, drain_timeout)
    logging_config = agent.config.logging
    logsetup.configure(logging_config.level, debug, agent.config.vehicle_id,
                       logging_config.mask_vin, logging_config.rate_limit_burst,
                       logging_config.rate_limit_window_s)
    previous = {sig: signal.signal(sig, agent.request_stop)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
