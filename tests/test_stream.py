"""Streams: every outbox signs its own random ``stream`` id, and the cloud tracks replays per
``(vid, stream, seq)``, so a recreated or quarantined outbox (seq back at 1) is not a replay.

End to end with a real mosquitto, the agent as a subprocess and ``CloudWatcher``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from agent.cloud.checks import MessageChecker, SeqTracker
from agent.cloud.config import load_cloud_config
from agent.cloud.watch import CloudWatcher, format_human
from agent.uplink.outbox import Outbox, OutboxCorrupt, open_outbox
from agent.uplink.signing import Signer, Verifier
from support.agent_run import run_agent, simulated_drive, write_agent_config

DOOR = "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"
NOW = 1_790_000_000.0   # 2026-09: "now" for the checker's clock


def claims(seq: int, *, stream: str | None = None, ts: int | None = None) -> dict:
    out = {"vid": "VIN1", "seq": seq, "boot": 1, "kind": "event",
           "ts": int(NOW * 1000) - 60_000 + seq if ts is None else ts,
           "signals": {DOOR: True}, "quality": {}}
    if stream is not None:
        out["stream"] = stream
    return out


@pytest.fixture(scope="module")
def signer(pki: Path) -> Signer:
    return Signer.from_file(pki / "VIN1.signing.key")


@pytest.fixture
def checker(pki: Path) -> MessageChecker:
    return MessageChecker(Verifier.from_jwks_file(pki / "jwks.json"), clock=lambda: NOW)


def check(checker: MessageChecker, signer: Signer, **kw) -> dict:
    seq = kw.pop("seq")
    return checker.check("vehicles/VIN1/events", signer.sign(claims(seq, **kw)).encode())


# --------------------------------------------------------------------------- the outbox


def test_outbox_keeps_its_stream_and_a_new_outbox_gets_another(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        first = ob.stream
        ob.add("t", "event", lambda seq: b"x")
    assert len(first) == 20 and int(first, 16) >= 0
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.stream == first                       # stored with the outbox
    (tmp_path / "o.db").unlink()
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.stream != first and ob.add("t", "event", lambda seq: b"x").seq == 1


def test_corrupt_outbox_is_quarantined_and_a_new_stream_starts(tmp_path, caplog):
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        old = ob.stream
    path.write_bytes(b"this is not an SQLite database, it was damaged by a power loss" * 100)
    with pytest.raises(OutboxCorrupt):
        Outbox(path)                                    # the class itself never renames
    with caplog.at_level(logging.ERROR, logger="car_agent.outbox"):
        with open_outbox(path) as ob:
            assert ob.stream != old
            assert ob.stats().quarantined == 1
            assert ob.add("t", "event", lambda seq: b"x").seq == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("outbox.db.corrupt-")]
    assert [p.read_bytes()[:11] for p in aside if not p.name.endswith(("-wal", "-shm"))] == [
        b"this is not"]
    [record] = [r for r in caplog.records if r.name == "car_agent.outbox"]
    assert record.levelno == logging.ERROR and "quarantined as" in record.getMessage()
    assert str(aside[0].name)[:30] in record.getMessage()
    with open_outbox(path) as ob:                      # a good outbox is opened as it is
        assert ob.stats().quarantined == 1


# --------------------------------------------------------------------------- the cloud side


def test_tracker_counts_seq_per_stream():
    tracker = SeqTracker()
    assert [tracker.accept("V", s, "a") for s in (1, 2, 3)] == [True, True, True]
    assert tracker.accept("V", 1, "b")                 # a new stream's seq 1 is no replay
    assert not tracker.accept("V", 2, "a")
    assert tracker.accept("V", 4)                      # "" (no claim) is a stream of its own
    assert (tracker.watermark("V", "a"), tracker.watermark("V", "b"),
            tracker.watermark("V")) == (3, 1, 0)


def test_the_stream_with_the_later_first_message_is_newest():
    tracker = SeqTracker()
    assert tracker.note_stream("V", "old", 1000)
    assert tracker.note_stream("V", "new", 5000)
    assert not tracker.note_stream("V", "old", 1500)   # old stream's late messages: older
    assert tracker.newest("V") == "new"
    assert not tracker.note_stream("V", "", 900)       # an agent from before streams
    assert tracker.newest("V") == "new" and tracker.newest("W") is None


def test_new_stream_accepted_and_older_stream_marked_superseded(checker, signer):
    a = [check(checker, signer, seq=s, stream="aaaa1111") for s in (1, 2)]
    assert [r.get("verified") for r in a] == [True, True]
    assert [r["stream"] for r in a] == ["aaaa1111"] * 2 and "superseded" not in a[1]
    assert check(checker, signer, seq=2, stream="aaaa1111")["rejected"] == "duplicate seq 2"
    b = check(checker, signer, seq=1, stream="bbbb2222", ts=int(NOW * 1000))
    assert b["verified"] and b["seq"] == 1 and "superseded" not in b
    late = check(checker, signer, seq=3, stream="aaaa1111")   # the old outbox, delivered late
    assert late["verified"] and late["superseded"] is True
    assert "(from an older stream)" in format_human(late)
    legacy = check(checker, signer, seq=1)                    # no claim: stream ""
    assert legacy["verified"] and legacy["stream"] == "" and legacy["superseded"] is True


@pytest.mark.parametrize("stream", ["", "a" * 65, "a b", 7, None, "ä"])
def test_bad_stream_claim_is_rejected(checker, signer, stream):
    token = signer.sign({**claims(1), "stream": stream}).encode()
    record = checker.check("vehicles/VIN1/events", token)
    assert record["rejected"].startswith("bad claims: 'stream' is not a string of 1-64")


@pytest.mark.parametrize("ts, why", [
    (946_684_800_000, "implausible ts 2000-01-01T00:00:00.000Z: before 2020-01-01"),
    (int(NOW * 1000) + 7_200_000, "implausible ts 2026-09-21T16:13:20.000Z: 7200 s ahead"),
])
def test_implausible_ts_is_rejected(checker, signer, ts, why):
    record = check(checker, signer, seq=1, stream="s1", ts=ts)
    assert record["rejected"].startswith(why) and record["seq"] == 1
    # Not recorded: the same seq with a plausible ts is accepted.
    assert check(checker, signer, seq=1, stream="s1")["verified"]


def test_ts_within_an_hour_ahead_is_accepted(checker, signer):
    assert check(checker, signer, seq=1, stream="s1", ts=int(NOW * 1000) + 3_000_000)["verified"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    return simulated_drive(tmp_path_factory.mktemp("drive"), 12.0, seed=5)


class Watch:
    """One CloudWatcher for the whole test: its tracker remembers every stream."""

    def __init__(self, cloud_yaml: Path) -> None:
        self.records: list[dict] = []
        self.cond = threading.Condition()
        self.watcher = CloudWatcher(load_cloud_config(cloud_yaml), self._add)

    def _add(self, record: dict) -> None:
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()

    def wait_offline(self, count: int) -> None:
        """Until the agent's ``offline`` status arrived ``count`` times (it follows its data)."""
        def offline() -> int:
            return sum(r.get("status") == "offline" and not r.get("retained")
                       for r in self.records)
        with self.cond:
            assert self.cond.wait_for(lambda: offline() >= count, 30), self.records[-5:]


@pytest.mark.mqtt
def test_recreated_and_corrupt_outbox_are_accepted_by_watch(tmp_path, pki, broker, cloud_config,
                                                            drive):
    config = write_agent_config(tmp_path, pki, broker.port, capture=drive)
    outbox = tmp_path / "outbox.db"
    watch = Watch(cloud_config())
    watch.watcher.start()
    try:
        assert watch.watcher.connected.wait(10)
        streams = []
        for run, damage in enumerate([None, "delete", "corrupt"], start=1):
            if damage == "delete":
                for leftover in tmp_path.glob("outbox.db*"):
                    leftover.unlink()
            elif damage == "corrupt":
                outbox.write_bytes(b"\0garbage after a power loss\0" * 512)
            result = run_agent(config)
            assert result.returncode == 0, result.stderr
            assert "outbox empty" in result.stderr
            watch.wait_offline(run)
            with watch.cond:
                mine = [r for r in watch.records if r.get("verified")
                        and r["stream"] not in streams]
                rejected = [r for r in watch.records if "rejected" in r]
            assert rejected == []
            [stream] = {r["stream"] for r in mine}
            streams.append(stream)
            seqs = sorted(r["seq"] for r in mine)
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 5
            assert {r["boot"] for r in mine} == {1}
            assert not any(r.get("superseded") for r in mine)
            if damage == "corrupt":
                assert "is corrupt" in result.stderr and "quarantined as" in result.stderr
                assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) >= 1
        assert len(set(streams)) == 3 and all(len(s) == 20 for s in streams)
    finally:
        watch.watcher.stop()
