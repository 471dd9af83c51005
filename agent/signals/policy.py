"""When to sign and send: events for changes that matter, snapshots of everything, a rate cap.

- Signals matching ``immediate`` (doors, locks, lids, windows by default) go out as events at once.
- Numeric signals go out when they moved at least their deadband from the last value sent, and
  at most once per ``min_interval_s`` each (the latest value is held until then).
- Quality changes (valid/invalid/stale) always go out.
- A full snapshot (``state``) follows significant changes at most every
  ``snapshot_min_interval_s``, and goes out every ``heartbeat_s`` regardless.
- At most ``max_messages_per_s`` signed messages in any one second (a sliding window, so a
  door event is not held back behind a snapshot that has just gone; below one per second, one
  message per ``1 / max_messages_per_s`` seconds). Changes arriving while the window is full
  are batched into one event message — a signal changing twice starts a new batch, so no
  intermediate state is dropped. Beyond ``max_pending_batches`` the newest
  batch absorbs further changes (counted in ``coalesced``), which bounds memory under a flood.

Time is the source's clock (a replayed capture behaves like the drive it recorded).
"""

from __future__ import annotations

import fnmatch
from collections import deque
from dataclasses import dataclass, field

from agent.config import PolicyConfig
from agent.signals.model import VALID, Change


@dataclass(frozen=True)
class Outgoing:
    """A message the policy wants signed: an event batch, or a full-state snapshot."""

    kind: str                                   # "event" or "state"
    changes: tuple[Change, ...] = ()            # for events


@dataclass
class PolicyCounters:
    events: int = 0
    snapshots: int = 0
    coalesced: int = 0
    held: int = field(default=0)


class PublishPolicy:
    def __init__(self, paths: tuple[str, ...], config: PolicyConfig) -> None:
        self.config = config
        self.index = {path: i for i, path in enumerate(paths)}
        self.immediate = [any(fnmatch.fnmatchcase(p, pat) for pat in config.immediate)
                          for p in paths]
        self.deadband = [next((band for pat, band in config.deadband
                               if fnmatch.fnmatchcase(p, pat)), 0.0) for p in paths]
        n = len(paths)
        self.sent_value: list = [None] * n
        self.sent_quality: list[str | None] = [None] * n
        self.sent_t: list[float] = [float("-inf")] * n
        self.held: dict[int, Change] = {}
        self.batches: deque[dict[int, Change]] = deque()
        self.significant = False
        self.last_snapshot: float | None = None
        # The rate cap: the send times of the last ``window_size`` messages.
        rate = config.max_messages_per_s
        self.window_size = max(1, int(rate))
        self.window_s = 1.0 if rate >= 1.0 else 1.0 / rate
        self.sent_times: deque[float] = deque(maxlen=self.window_size)
        self.started = False
        self.counters = PolicyCounters()

    # -- input ------------------------------------------------------------------------------
    def observe(self, changes: list[Change]) -> None:
        for change in changes:
            i = self.index[change.path]
            quality = change.quality
            if quality != VALID or self.sent_quality[i] != VALID or self.immediate[i] \
                    or not _is_number(change.value) or not _is_number(self.sent_value[i]):
                if change.value == self.sent_value[i] and quality == self.sent_quality[i] \
                        and type(change.value) is type(self.sent_value[i]):
                    self.held.pop(i, None)
                    continue
                self._enqueue(i, change)
                continue
            moved = abs(change.value - self.sent_value[i])
            band = self.deadband[i]
            # Tolerance: 0.4 -> 1.4 is 0.9999999999999999 in binary floating point.
            if (band > 0 and moved >= band * (1 - 1e-9)) or (band <= 0 and moved > 0):
                if change.t - self.sent_t[i] >= self.config.min_interval_s:
                    self._enqueue(i, change)
                else:
                    self.held[i] = change
                    self.counters.held += 1
            else:
                self.held.pop(i, None)   # back within the deadband of what was sent

    def _enqueue(self, i: int, change: Change) -> None:
        batches = self.batches
        last = batches[-1] if batches else None
        if last is None or i in last:
            if last is not None and len(batches) >= self.config.max_pending_batches:
                last[i] = change
                self.counters.coalesced += 1
            else:
                batches.append({i: change})
        else:
            last[i] = change
        self.sent_value[i] = change.value
        self.sent_quality[i] = change.quality
        self.sent_t[i] = change.t
        self.held.pop(i, None)
        self.significant = True

    # -- output -----------------------------------------------------------------------------
    def due(self, now: float) -> list[Outgoing]:
        """What to sign now; call regularly (every loop iteration)."""
        config = self.config
        if self.held:
            for i, change in list(self.held.items()):
                if now - self.sent_t[i] >= config.min_interval_s:
                    self._enqueue(i, change)
                    self.sent_t[i] = now    # the interval runs from when it was sent
        if not self.started:
            self.started = True
            self.last_snapshot = now   # first snapshot once the state has filled
        out: list[Outgoing] = []
        since = now - self.last_snapshot
        if since >= config.heartbeat_s and self._may_send(now):
            # The heartbeat goes first: a backlog of events must not starve it.
            out.append(self._snapshot(now))
            since = 0.0
        while self.batches and self._may_send(now):
            out.append(self._event(self.batches.popleft()))
        if self.significant and since >= config.snapshot_min_interval_s and self._may_send(now):
            out.append(self._snapshot(now))
        return out

    def _may_send(self, now: float) -> bool:
        """Whether one more message keeps the cap; if so, it is counted as sent at ``now``."""
        sent = self.sent_times
        if len(sent) == self.window_size and now - sent[0] < self.window_s:
            return False
        sent.append(now)
        return True

    def flush(self, now: float) -> list[Outgoing]:
        """Everything still pending, ignoring the rate cap, and a final snapshot (shutdown)."""
        for i, change in list(self.held.items()):
            self._enqueue(i, change)
        out = [self._event(batch) for batch in self.batches]
        self.batches.clear()
        out.append(self._snapshot(now))
        return out

    def _event(self, batch: dict[int, Change]) -> Outgoing:
        self.counters.events += 1
        return Outgoing("event", tuple(batch.values()))

    def _snapshot(self, now: float) -> Outgoing:
        self.counters.snapshots += 1
        self.last_snapshot = now
        self.significant = False
        return Outgoing("state")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
