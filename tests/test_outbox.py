"""Tests for agent.outbox: seq allocation, durability, bounds, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.errors import ConfigError
from agent.uplink.outbox import Entry, Outbox

REPO_ROOT = Path(__file__).resolve().parent.parent


def payload_for(seq: int, pad: int = 0) -> bytes:
    return b'{"seq":%d}' % seq + b"x" * pad


def seqs(ob: Outbox) -> list[int]:
    return [e.seq for e in ob.pending(10**6)]


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- seq and boot --------------------------------------------------------------------------


def test_seq_starts_at_one_and_increments_by_one(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        entries = [ob.add("car/1/ev", "event", payload_for) for _ in range(5)]
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
        assert [e.payload for e in entries] == [payload_for(s) for s in (1, 2, 3, 4, 5)]
        assert ob.stats().next_seq == 6
        assert len(ob) == 5


def test_add_returns_entry_as_stored(tmp_path):
    clock = FakeClock(1234.5)
    with Outbox(tmp_path / "o.db", clock=clock) as ob:
        e = ob.add("car/1/state", "state", lambda s: b"snap%d" % s, retain=True)
        assert e == Entry(1, "car/1/state", "state", b"snap1", True, 1234.5)
        assert ob.pending(10) == [e]


def test_boot_increments_per_open(tmp_path):
    path = tmp_path / "o.db"
    boots = []
    for _ in range(3):
        with Outbox(path) as ob:
            boots.append(ob.boot)
            assert ob.stats().boot == ob.boot
    assert boots == [1, 2, 3]


def test_reopen_keeps_pending_in_order_and_continues_seq(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        for kind in ("event", "state", "event"):
            ob.add("t", kind, payload_for)
        ob.delete(2)
    with Outbox(path) as ob:
        pend = ob.pending(10)
        assert [(e.seq, e.kind, e.payload) for e in pend] == [
            (1, "event", payload_for(1)),
            (3, "event", payload_for(3)),
        ]
        assert ob.add("t", "event", payload_for).seq == 4
    with Outbox(path) as ob:
        assert seqs(ob) == [1, 3, 4]
        assert ob.add("t", "event", payload_for).seq == 5


def test_make_payload_raising_stores_nothing_and_keeps_seq(tmp_path):
    path = tmp_path / "o.db"

    def boom(seq: int) -> bytes:
        raise RuntimeError(f"signing failed for {seq}")

    with Outbox(path) as ob:
        assert ob.add("t", "event", payload_for).seq == 1
        with pytest.raises(RuntimeError, match="signing failed for 2"):
            ob.add("t", "event", boom)
        assert len(ob) == 1
        assert ob.stats().next_seq == 2
        assert ob.stats().queued_bytes == len(payload_for(1)) + 1
        assert ob.add("t", "event", payload_for).seq == 2
    with Outbox(path) as ob:
        assert seqs(ob) == [1, 2]
        assert ob.stats().next_seq == 3


def test_make_payload_returning_non_bytes_is_rejected_and_rolled_back(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        with pytest.raises(TypeError, match="must return bytes"):
            ob.add("t", "event", lambda s: f"seq {s}")  # type: ignore[arg-type,return-value]
        assert len(ob) == 0
        assert ob.add("t", "event", payload_for).seq == 1


@pytest.mark.parametrize("topic", ["", "car/+/ev", "car/#", "a\0b"])
def test_add_rejects_unpublishable_topic(tmp_path, topic):
    with Outbox(tmp_path / "o.db") as ob:
        with pytest.raises(ValueError, match="topic"):
            ob.add(topic, "event", payload_for)
        assert ob.add("ok", "event", payload_for).seq == 1


def test_make_payload_may_read_stats_but_not_write(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        ob.add("t", "event", payload_for)
        seen = []

        def status_payload(seq: int) -> bytes:
            seen.append((len(ob), ob.stats().queued))
            return b"status %d" % seq

        assert ob.add("t", "status", status_payload).seq == 2
        assert seen == [(1, 1)]

        def nested(seq: int) -> bytes:
            ob.delete(1)
            return b"never"

        with pytest.raises(RuntimeError, match="inside make_payload"):
            ob.add("t", "event", nested)
        # the outer add was rolled back, entry 1 was not deleted, seq 3 not consumed
        assert seqs(ob) == [1, 2]
        assert ob.add("t", "event", payload_for).seq == 3


# -- delete / record_failure / counters ------------------------------------------------------


def test_delete_and_record_failure_counters_persist(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        for _ in range(4):
            ob.add("t", "event", payload_for)
        ob.delete(1)
        ob.delete(3)
        ob.record_failure(2, "0x97 quota exceeded")
        ob.record_failure(2, "0x87 not authorized")
        ob.record_failure(4, "0x80 unspecified")
        assert seqs(ob) == [2, 4]
        st1 = ob.stats()
        assert (st1.delivered, st1.failed, st1.queued) == (2, 3, 2)
        assert st1.queued_bytes == len(payload_for(2)) + len(payload_for(4)) + 2
    raw = sqlite3.connect(path)
    rows = raw.execute("SELECT seq, failures, last_error FROM entries ORDER BY seq").fetchall()
    raw.close()
    assert rows == [(2, 2, "0x87 not authorized"), (4, 1, "0x80 unspecified")]
    with Outbox(path) as ob:
        st2 = ob.stats()
        assert (st2.delivered, st2.failed, st2.queued, st2.queued_bytes) == (
            2, 3, 2, st1.queued_bytes)
        ob.delete(2)
        assert ob.stats().delivered == 3


def test_delete_of_unknown_seq_is_ignored(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        ob.add("t", "event", payload_for)
        ob.delete(1)
        ob.delete(1)  # duplicate PUBACK
        ob.delete(99)
        assert ob.stats().delivered == 1
        assert len(ob) == 0
        assert ob.stats().queued_bytes == 0


def test_closed_outbox_raises(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    ob.close()
    ob.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ob.add("t", "event", payload_for)
    with pytest.raises(RuntimeError, match="closed"):
        ob.pending(1)


# -- bounds -------------------------------------------------------------------------------


def test_bounds_drop_non_events_oldest_first_before_any_event(tmp_path):
    # every entry is 100 bytes (topic "t" + 99-byte payload); room for 5
    kinds = {
        1: "event", 2: "state", 3: "event", 4: "status", 5: "state",
        6: "event", 7: "state", 8: "event", 9: "event", 10: "event",
        11: "state", 12: "event",
    }
    with Outbox(tmp_path / "o.db", max_bytes=500) as ob:
        after = {}
        for seq, kind in kinds.items():
            e = ob.add("t", kind, lambda s: b"%03d" % s + b"." * 96)
            assert e.seq == seq
            after[seq] = seqs(ob)
            assert seq in after[seq], "the newest entry is always kept"
            assert ob.stats().queued_bytes <= 500
        assert after[5] == [1, 2, 3, 4, 5]  # exactly full, nothing dropped
        assert after[6] == [1, 3, 4, 5, 6]  # state 2 dropped, not event 1
        assert after[7] == [1, 3, 5, 6, 7]  # status 4 dropped
        assert after[8] == [1, 3, 6, 7, 8]  # state 5
        assert after[9] == [1, 3, 6, 8, 9]  # state 7
        assert after[10] == [3, 6, 8, 9, 10]  # no non-event left: oldest event 1
        assert after[11] == [6, 8, 9, 10, 11]  # only non-event is the new one: event 3
        assert after[12] == [6, 8, 9, 10, 12]  # state 11 before any event
        st1 = ob.stats()
        assert (st1.queued, st1.queued_bytes, st1.dropped_full) == (5, 500, 7)
        assert st1.next_seq == 13


def test_bounds_oversized_entry_is_kept_alone(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path, max_bytes=300) as ob:
        for kind in ("event", "state", "event"):
            ob.add("t", kind, lambda s: b"." * 99)
        big = ob.add("t", "event", lambda s: b"B" * 1000)
        assert seqs(ob) == [big.seq] == [4]
        assert ob.stats().queued_bytes == 1001
        assert ob.stats().dropped_full == 3
        ob.add("t", "state", lambda s: b"." * 99)
        assert seqs(ob) == [5]
        assert ob.stats().dropped_full == 4
    with Outbox(path, max_bytes=300) as ob:
        assert ob.stats().dropped_full == 4
        assert ob.stats().queued_bytes == 100


def test_bounds_count_topic_bytes(tmp_path):
    topic = "car/ü"  # 6 bytes in UTF-8
    with Outbox(tmp_path / "o.db", max_bytes=20) as ob:
        ob.add(topic, "event", lambda s: b"1234567890")
        assert ob.stats().queued_bytes == 16
        ob.add(topic, "event", lambda s: b"1234567890")
        assert seqs(ob) == [2]
        assert ob.stats().queued_bytes == 16


# -- expiry -------------------------------------------------------------------------------


def test_expire_with_injected_clock(tmp_path):
    path = tmp_path / "o.db"
    clock = FakeClock(1000.0)
    with Outbox(path, max_age_s=100, clock=clock) as ob:
        ob.add("t", "event", payload_for)  # created 1000
        clock.now = 1050.0
        ob.add("t", "state", payload_for)  # created 1050
        clock.now = 1100.0
        assert ob.expire() == 0  # age exactly max_age_s is kept
        assert ob.stats().oldest_age_s == 100.0
        clock.now = 1100.5
        assert ob.expire() == 1
        assert seqs(ob) == [2]
        st1 = ob.stats()
        assert (st1.dropped_age, st1.queued, st1.queued_bytes) == (1, 1, len(payload_for(2)) + 1)
        assert st1.oldest_age_s == 50.5
        assert ob.expire() == 0
    clock.now = 1200.0
    with Outbox(path, max_age_s=100, clock=clock) as ob:  # expires at open
        assert len(ob) == 0
        assert ob.stats().dropped_age == 2
        assert ob.stats().oldest_age_s is None
        assert ob.add("t", "event", payload_for).seq == 3


# -- pending ------------------------------------------------------------------------------


def test_pending_limit_and_exclude(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        for _ in range(8):
            ob.add("t", "event", payload_for)
        ob.delete(2)
        assert [e.seq for e in ob.pending(3)] == [1, 3, 4]
        assert [e.seq for e in ob.pending(3, exclude={1, 3})] == [4, 5, 6]
        assert [e.seq for e in ob.pending(3, exclude=[1, 4, 5, 99])] == [3, 6, 7]
        assert [e.seq for e in ob.pending(100, exclude=(1, 3, 8))] == [4, 5, 6, 7]
        assert ob.pending(0) == []
        assert ob.pending(5, exclude=range(1, 9)) == []
        assert [e.payload for e in ob.pending(2, exclude={1})] == [payload_for(3), payload_for(4)]


# -- crash safety -------------------------------------------------------------------------

CHILD = r"""
import sys
from agent.uplink.outbox import Outbox
ob = Outbox(sys.argv[1])
print("boot", ob.boot, flush=True)
while True:
    e = ob.add("car/1/events", "event" if ob.stats().next_seq % 3 else "state",
               lambda s: b'{"seq":%d}' % s + b"x" * 300)
    print("add", e.seq, flush=True)
    if e.seq % 5 == 0:
        ob.delete(e.seq)
        print("del", e.seq, flush=True)
"""


def test_kill9_loses_nothing_committed(tmp_path):
    path = tmp_path / "o.db"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    last_seen = 0
    for round_no, kill_after in enumerate((17, 63, 141)):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        lines = []
        deadline = time.monotonic() + 20
        try:
            while sum(1 for ln in lines if ln.startswith("add")) < kill_after:
                line = proc.stdout.readline()
                assert line, f"child exited early: {proc.stderr.read()}"
                lines.append(line.strip())
                assert time.monotonic() < deadline, "child too slow"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        lines += [ln for ln in rest.splitlines() if ln.strip()]
        added = [int(ln.split()[1]) for ln in lines if ln.startswith("add ")]
        deleted = {int(ln.split()[1]) for ln in lines if ln.startswith("del ")}
        assert lines[0] == f"boot {2 * round_no + 1}"
        assert added == list(range(last_seen + 1, last_seen + 1 + len(added)))

        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        raw.close()

        with Outbox(path) as ob:
            assert ob.boot == 2 * round_no + 2
            present = set(seqs(ob))
            stats = ob.stats()
            # The child may be killed between deleting the last entry and printing "del".
            unprinted = {added[-1]} if added[-1] % 5 == 0 else set()
            assert set(added) - deleted - unprinted <= present, "a committed entry was lost"
            assert not deleted & present
            assert stats.next_seq > max(added)
            # no seq skipped: every allocated seq is either queued or was delivered (seq % 5 == 0)
            missing = set(range(1, stats.next_seq)) - present
            assert all(s % 5 == 0 for s in missing)
            assert stats.delivered == len(missing)
            assert deleted <= missing
            assert stats.queued == len(present)
            new = ob.add("t", "event", payload_for)
            assert new.seq == stats.next_seq  # no reuse
            last_seen = new.seq


# -- open errors --------------------------------------------------------------------------


def test_not_a_database_raises_config_error_and_keeps_file(tmp_path):
    path = tmp_path / "queue.db"
    junk = b"this is definitely not an sqlite file\n" * 200
    path.write_bytes(junk)
    with pytest.raises(ConfigError) as info:
        Outbox(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: cannot open outbox: ")
    assert "corrupt" in msg
    assert "\n" not in msg
    assert path.read_bytes() == junk


def _corrupt_pages(path: Path, first_page: int, n_pages: int) -> bytes:
    """Overwrite whole pages (1-based numbers) with garbage; return the new file content."""
    raw = sqlite3.connect(path)
    page = raw.execute("PRAGMA page_size").fetchone()[0]
    raw.close()
    data = bytearray(path.read_bytes())
    start = (first_page - 1) * page
    assert len(data) >= start + n_pages * page
    data[start:start + n_pages * page] = b"\xa5" * (n_pages * page)
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("where", ["table pages", "index only used by bounds"])
def test_corrupt_database_raises_config_error_and_keeps_file(tmp_path, where):
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        for i in range(200):
            ob.add("t", "state" if i % 3 == 0 else "event", lambda s: b"%d" % s + b"p" * 1000)
    if where == "table pages":
        data = _corrupt_pages(path, 11, 20)
    else:
        raw = sqlite3.connect(path)
        (root,) = raw.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'entries_not_event'").fetchone()
        raw.close()
        data = _corrupt_pages(path, root, 1)
    with pytest.raises(ConfigError) as info:
        Outbox(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: cannot open outbox: database is corrupt")
    assert "left untouched" in msg
    assert "\n" not in msg
    assert path.read_bytes() == data


def test_missing_directory_raises_config_error(tmp_path):
    path = tmp_path / "no-such-dir" / "o.db"
    with pytest.raises(ConfigError, match="cannot open outbox") as info:
        Outbox(path)
    assert str(info.value) == (
        f"{path}: cannot open outbox: directory {path.parent} does not exist")
    assert not path.parent.exists()


def test_database_is_wal_with_full_sync(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        ob.add("t", "event", payload_for)
        assert ob._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()


def test_seq_is_allocated_from_the_database_not_a_cached_counter(tmp_path):
    # Two handles on one file (not a supported setup, but it proves where seq comes from):
    # interleaved adds still get distinct, consecutive seqs.
    path = tmp_path / "o.db"
    with Outbox(path) as a, Outbox(path) as b:
        got = [ob.add("t", "event", payload_for).seq for ob in (a, b, a, a, b)]
        assert got == [1, 2, 3, 4, 5]
    with Outbox(path) as ob:
        assert seqs(ob) == [1, 2, 3, 4, 5]


def test_path_that_is_a_directory_raises_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        Outbox(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot open outbox: ")


# -- threads ------------------------------------------------------------------------------


def test_concurrent_add_and_delete_from_two_threads(tmp_path):
    total = 300
    with Outbox(tmp_path / "o.db") as ob:
        errors: list[BaseException] = []
        done_adding = threading.Event()

        def producer() -> None:
            try:
                for _ in range(total):
                    ob.add("t", "event", payload_for)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                done_adding.set()

        def acker() -> None:
            try:
                acked = 0
                while acked < total:
                    batch = ob.pending(7)
                    if not batch and done_adding.is_set() and len(ob) == 0:
                        break
                    for e in batch:
                        if acked % 4 == 0:
                            ob.record_failure(e.seq, "0x80")
                        ob.delete(e.seq)
                        acked += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=producer), threading.Thread(target=acker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        st1 = ob.stats()
        assert (st1.queued, st1.queued_bytes, st1.delivered, st1.next_seq) == (0, 0, total, total + 1)
        assert st1.failed == (total + 3) // 4


# -- property test ------------------------------------------------------------------------

MAX_BYTES = 600
MAX_AGE = 100.0


class OutboxMachine(RuleBasedStateMachine):
    """Random add/delete/record_failure/expire/reopen against a plain-Python model."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="outbox-hyp-")
        self.path = os.path.join(self.dir, "o.db")
        self.clock = FakeClock(10_000.0)
        self.ob = self._open()
        self.boot = 1
        self.model: dict[int, tuple[str, int, float]] = {}  # seq -> (kind, size, created)
        self.next_seq = 1
        self.last_seq = 0
        self.delivered = self.failed = self.dropped_full = self.dropped_age = 0

    def _open(self) -> Outbox:
        return Outbox(self.path, max_bytes=MAX_BYTES, max_age_s=MAX_AGE, clock=self.clock)

    def _model_expire(self) -> None:
        cutoff = self.clock.now - MAX_AGE
        for seq in [s for s, (_, _, c) in self.model.items() if c < cutoff]:
            del self.model[seq]
            self.dropped_age += 1

    @rule(
        kind=st.sampled_from(["event", "state", "status"]),
        pad=st.integers(0, 250),
        topic=st.sampled_from(["t", "car/1/ev", "car/ü"]),
        retain=st.booleans(),
    )
    def add(self, kind, pad, topic, retain):
        self._model_expire()  # every add applies the age bound too
        e = self.ob.add(topic, kind, lambda s: payload_for(s, pad), retain=retain)
        assert e.seq == self.next_seq
        assert e.seq > self.last_seq
        assert e.payload == payload_for(e.seq, pad)
        self.last_seq = e.seq
        self.next_seq += 1
        self.model[e.seq] = (kind, len(e.payload) + len(topic.encode()), self.clock.now)
        while sum(size for _, size, _ in self.model.values()) > MAX_BYTES:
            older = [s for s in self.model if s != e.seq]
            non_events = [s for s in older if self.model[s][0] != "event"]
            victims = non_events or older
            if not victims:
                break
            del self.model[min(victims)]
            self.dropped_full += 1

    @rule()
    def add_failing(self):
        def boom(seq):
            raise ValueError("no key")

        with pytest.raises(ValueError):
            self.ob.add("t", "event", boom)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.ob.delete(seq)
        del self.model[seq]
        self.delivered += 1

    @rule(offset=st.integers(0, 3))
    def delete_unknown(self, offset):
        self.ob.delete(self.next_seq + offset)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def record_failure(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.ob.record_failure(seq, "0x87")
        self.failed += 1

    @rule(dt=st.integers(0, 80))
    def tick(self, dt):
        self.clock.now += dt

    @rule()
    def expire(self):
        before = self.dropped_age
        self._model_expire()
        assert self.ob.expire() == self.dropped_age - before

    @rule()
    def reopen(self):
        self.ob.close()
        self.ob = self._open()
        self.boot += 1
        self._model_expire()  # the outbox expires at open

    @invariant()
    def matches_model(self):
        assert len(self.ob) == len(self.model)
        assert seqs(self.ob) == sorted(self.model)
        s = self.ob.stats()
        assert s.queued == len(self.model)
        assert s.queued_bytes == sum(size for _, size, _ in self.model.values())
        assert (s.next_seq, s.boot) == (self.next_seq, self.boot)
        assert (s.delivered, s.failed, s.dropped_full, s.dropped_age) == (
            self.delivered, self.failed, self.dropped_full, self.dropped_age)

    def teardown(self):
        import shutil

        self.ob.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxStateMachine = OutboxMachine.TestCase
TestOutboxStateMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
