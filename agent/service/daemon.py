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
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

from agent.service import logsetup
from agent.uplink.envelope import Envelopes
from agent.errors import KeyFileError
from agent.uplink.keyfiles import FileWatcher, certificate_expiry_warning, check_private_key_file
from agent.uplink.outbox import open_outbox
from agent.signals.policy import Outgoing, PublishPolicy
from agent.service.sdnotify import Notifier
from agent.uplink.jws import Signer
from agent.can.source import FrameSource, open_source
from agent.signals.state import SignalPipeline
from agent.uplink.mqtt import Uplink, certificate_expiry
from agent.signals.vehicle import compile_decoder

log = logging.getLogger("car_agent.daemon")

RECV_TIMEOUT_S = 0.05
SHUTDOWN_DRAIN_S = 5.0
#: How often the main loop checks that the uplink's network thread is still there.
UPLINK_CHECK_S = 1.0
#: An outbox locked by another process is tried again this often (each try waits for the
#: outbox's busy timeout); at most MAX_UNSTORED messages wait meanwhile.
LOCKED_RETRY_S = 1.0
MAX_UNSTORED = 1000
#: How often the signing key file is checked for a rotation.
SIGNING_KEY_CHECK_S = 5.0


class Unstored(NamedTuple):
    """A message signed for the outbox and not stored yet (see Agent._store_unstored)."""

    topic: str
    kind: str
    make_payload: Callable[[int], bytes]
    retain: bool = False
    correlation: bytes | None = None        # a snapshot response's Correlation Data
    on_stored: Callable[[], None] | None = None


@dataclass
class RunResult:
    exit_code: int
    queued: int
    message: str


class Agent:
    """The running pipeline; built from a config file, driven by :meth:`run`."""

    def __init__(self, config_path, drain_timeout: float = 30.0, *,
                 debug: bool | None = None) -> None:
        config, decoder = compile_decoder(config_path)
        config.require("can", "signing", "mqtt", "store")
        if debug is not None:
            # Before the outbox opens: quarantining a corrupt one is logged.
            logging_config = config.logging
            logsetup.configure(logging_config.level, debug, config.vehicle_id,
                               logging_config.mask_vin, logging_config.rate_limit_burst,
                               logging_config.rate_limit_window_s)
        self.config = config
        self.drain_timeout = drain_timeout
        # Refuse careless key files before using them (mode, owner): one line saying which.
        check_private_key_file(config.signing.key, "signing.key")
        check_private_key_file(config.mqtt.key, "mqtt.key")
        self.signer = Signer.from_file(config.signing.key)
        self._signing_key_file = FileWatcher([config.signing.key])
        self._next_key_check = 0.0
        self.decoder = decoder
        self.pipeline = SignalPipeline(self.decoder)
        self.policy = PublishPolicy(self.decoder.paths, config.policy)
        # The boot is counted in run(), once the bus is open: a failed start spends none.
        self.outbox = open_outbox(config.store.path, max_bytes=config.store.max_bytes,
                                  max_age_s=config.store.max_age_s, count_boot=False,
                                  lock=True)
        self.envelopes = Envelopes(self.signer, config.vehicle_id, self.outbox.boot,
                                   stream=self.outbox.stream)
        try:
            self.uplink = Uplink(config.mqtt, config.vehicle_id, self.outbox, config.cmd)
        except BaseException:
            self.outbox.close()
            raise
        self.stop_requested = threading.Event()
        self.source: FrameSource | None = None
        self.notifier = Notifier.from_environ()
        self._next_cert_check = 0.0
        self.cert_warning: str | None = None
        self._last_health: tuple[float, int] | None = None   # (monotonic time, frames)
        self.store_errors = 0
        # Signed, not yet stored (outbox locked by another process): (topic, kind, payload
        # factory, retain), oldest first.
        self._unstored: deque[Unstored] = deque()
        self._locked_until = 0.0

    def request_stop(self, *_: object) -> None:
        self.stop_requested.set()

    def _commit(self, outgoing: list[Outgoing], now: float) -> None:
        topics = self.uplink.topics
        for item in outgoing:
            if item.kind == "event":
                self._unstored.append(Unstored(topics["events"], "event",
                                               self.envelopes.event(item.changes)))
            else:
                self._unstored.append(Unstored(topics["state"], "state",
                                               self.envelopes.state(self.pipeline.state, now),
                                               retain=True))
        while len(self._unstored) > MAX_UNSTORED:   # locked for long: the oldest give way
            self._store_failed(self._unstored.popleft().kind, "outbox locked; pending limit")
        if self._unstored:
            self._store_unstored()

    def _store_unstored(self) -> None:
        """Store the messages signed but not yet stored, in order.

        The outbox locked by another process (busy for longer than its timeout) keeps them
        pending, retried at most every :data:`LOCKED_RETRY_S`: the policy counted them as sent.
        Disk full or an I/O error costs the message (the next snapshot carries its values) but
        not the daemon nor anything already queued.
        """
        pending = self._unstored
        if self._locked_until > time.monotonic():
            return
        stored = False
        while pending:
            item = pending[0]
            kind = item.kind
            try:
                self.outbox.add(item.topic, kind, item.make_payload, retain=item.retain,
                                correlation=item.correlation)
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    self._locked_until = time.monotonic() + LOCKED_RETRY_S
                    log.error("outbox: locked by another process (%s); %d message(s) kept "
                              "pending and retried", exc, len(pending))
                    break
                self._store_failed(kind, exc)
            except sqlite3.Error as exc:
                self._store_failed(kind, exc)
            else:
                stored = True
                if item.on_stored is not None:
                    item.on_stored()
            pending.popleft()
        if stored:
            self.uplink.wake()

    def _answer_requests(self, now: float) -> None:
        """Snapshot requests queued by the uplink: a signed snapshot each, through the outbox
        (so it has a seq and survives an outage), to the request's response topic."""
        requests = self.uplink.requests
        for request in requests.take():
            # The same path as events and state: kept pending (not lost, the loop not held)
            # while another process locks the outbox.
            self._unstored.append(Unstored(request.response_topic, "snapshot",
                                           self.envelopes.snapshot(self.pipeline.state, now),
                                           correlation=request.correlation,
                                           on_stored=requests.answered))
        self._commit([], now)

    def _store_failed(self, kind: str, exc: Exception | str) -> None:
        self.store_errors += 1
        log.error("outbox: cannot store a %s message (%d so far): %s", kind, self.store_errors,
                  exc)

    def run(self) -> RunResult:
        config = self.config
        try:
            self.source = source = open_source(config.can, self.decoder.can_filters())
        except BaseException:
            self.outbox.close()
            raise
        self.envelopes.boot = self.outbox.count_boot()
        log.info("car-agent: vehicle %s, boot %d, %d signals from %d frame id(s), outbox %s "
                 "(%d queued), signing %s kid %s (%s)", config.vehicle_id, self.outbox.boot,
                 len(self.decoder.paths), len(self.decoder.frame_keys), config.store.path,
                 len(self.outbox), self.signer.alg, self.signer.kid, self.signer.backend)
        self.uplink.start()
        self._check_certificate()
        # Ready once the bus is open and the uplink runs; not waiting for the broker: a car
        # without coverage has still started.
        self.notifier.ready(f"vehicle {config.vehicle_id}: {len(self.decoder.paths)} signals, "
                            f"{len(self.outbox)} queued")
        notifier = self.notifier
        pipeline, policy = self.pipeline, self.policy
        requests = self.uplink.requests
        interval = config.logging.stats_interval_s
        next_stats = time.monotonic() + interval
        next_check = time.monotonic() + min(UPLINK_CHECK_S, interval)
        uplink = self.uplink
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
                if outgoing or self._unstored:
                    self._commit(outgoing, now)
                if requests is not None and requests.waiting:
                    self._answer_requests(now)
                if time.monotonic() >= next_check:
                    mono = time.monotonic()
                    next_check = mono + min(UPLINK_CHECK_S, interval)
                    if not uplink.alive():
                        # Never pretend: no more watchdog pings; exit 1 so that the service
                        # manager restarts the agent (the outbox keeps everything).
                        log.error("uplink: the network thread ended; stopping so that the "
                                  "service manager restarts the agent")
                        return RunResult(1, len(self.outbox), "uplink network thread ended; "
                                         f"{len(self.outbox)} message(s) stay queued")
                    if mono >= self._next_key_check:
                        self._reload_signing_key()
                    if mono >= next_stats:
                        next_stats = mono + interval
                        self._report_health()
            # Capture finished or stop requested: what the policy holds goes out now.
            notifier.stopping("flushing and draining the outbox")
            self._locked_until = 0.0    # one more try for anything still pending
            self._commit(policy.flush(source.now()), source.now())
            capture = config.can.capture is not None
            stopping = self.stop_requested.is_set()
            timeout = self.drain_timeout if capture and not stopping else SHUTDOWN_DRAIN_S
            if stopping and not self.uplink.is_connected():
                # An outbox that cannot drain is not waited for: it is on disk.
                log.info("stopping: uplink not connected, not waiting for the outbox to drain")
                drained = False
            else:
                drained = self.uplink.wait_drained(timeout, while_connected=stopping)
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

    def _reload_signing_key(self) -> None:
        """A rotated signing key (the file changed) signs from the next message on.

        An unusable new file (half written, wrong mode, not a key) keeps the current key; the
        next change of the file is tried again.
        """
        self._next_key_check = time.monotonic() + SIGNING_KEY_CHECK_S
        if not self._signing_key_file.changed():
            return
        path = self.config.signing.key
        try:
            check_private_key_file(path, "signing.key")
            signer = Signer.from_file(path)
        except KeyFileError as exc:
            log.warning("signing: the key file changed but is not usable (%s); keeping the "
                        "current key (kid %s)", exc, self.signer.kid)
            return
        self.signer = self.envelopes.signer = signer
        log.info("signing: key file changed; signing with kid %s from now on", signer.kid)

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
                       "refused": outbox.failed, "store_errors": self.store_errors,
                       "quarantined": outbox.quarantined,
                       "dropped_oversize": outbox.dropped_oversize, "stream": self.outbox.stream},
        }
        uplink = self.uplink.counters
        metrics["uplink"] = {"connected": self.uplink.is_connected(),
                             "delivered": uplink.acknowledged, "store_errors": uplink.store_errors,
                             "restarts": uplink.restarts}
        expiry = certificate_expiry(self.config.mqtt.cert)
        metrics["certificate"] = {
            "expires": None if expiry is None else expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "warning": self.cert_warning}
        metrics["log_lines_suppressed"] = logsetup.rate_limit.suppressed \
            if logsetup.rate_limit else 0
        if self.uplink.requests is not None:
            metrics["snapshot_requests"] = self.uplink.requests.counters.as_dict()
        self.uplink.publish_metrics(json.dumps(metrics, separators=(",", ":")).encode())
        self.notifier.status(f"{rate:.0f} frames/s, {outbox.queued} queued, uplink "
                             f"{'connected' if self.uplink.is_connected() else 'disconnected'}")
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
    agent = Agent(config_path, drain_timeout, debug=debug)
    previous = {sig: signal.signal(sig, agent.request_stop)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
