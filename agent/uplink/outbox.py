"""Durable outbox: the queue between signing a message and the broker's PUBACK.

Every message is committed to an SQLite database before it is published and is deleted only
when the broker acknowledges it, so messages survive outages, broker restarts, ``kill -9`` and
power loss.

The message sequence number ``seq`` is allocated from the database in the same transaction
that stores the entry, and the payload (which embeds ``seq``) is built inside that transaction
by a caller-supplied ``make_payload(seq)``. With ``synchronous=FULL`` a committed entry (and so
its seq) is on stable storage before :meth:`Outbox.add` returns, so a seq that may have been
published is never rolled back and handed out again; if ``make_payload`` fails the transaction
is rolled back and the seq is not consumed. Seqs therefore go up by exactly one per stored
message across restarts and crashes.

Size bound: after each add, while the queued bytes (payload + topic) exceed ``max_bytes`` the
oldest non-``"event"`` entry is dropped (snapshots are superseded by newer ones), then the oldest
event; the entry just added is never dropped. Age bound: :meth:`Outbox.expire` drops entries
older than ``max_age_s``. Both are counted in persisted counters.

Thread safety: one connection shared by the daemon thread (add) and the MQTT network thread
(delete / record_failure), serialised by a lock. ``make_payload`` runs with the lock held and
inside the write transaction, so it must be quick; it may call the read-only methods
(:meth:`stats`, ``len()``, :meth:`pending`) but not the writing ones (that raises RuntimeError).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

SCHEMA_VERSION = 1
EVENT = "event"
BUSY_TIMEOUT_S = 5.0
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # truncate the -wal file back to this after checkpoints
MAX_REASON_CHARS = 500

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    # Small columns first, payload last: scans of created/size never touch overflow pages.
    "CREATE TABLE IF NOT EXISTS entries ("
    " seq INTEGER PRIMARY KEY,"
    " created REAL NOT NULL,"
    " size INTEGER NOT NULL,"
    " kind TEXT NOT NULL,"
    " retain INTEGER NOT NULL,"
    " failures INTEGER NOT NULL DEFAULT 0,"
    " last_error TEXT,"
    " topic TEXT NOT NULL,"
    " payload BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_created ON entries (created)",
    # Partial index: finds the oldest non-event in O(log n) however many events are queued.
    "CREATE INDEX IF NOT EXISTS entries_not_event ON entries (seq) WHERE kind != 'event'",
)

# Meta keys and their initial values.
_META_DEFAULTS = (
    ("schema", SCHEMA_VERSION),
    ("next_seq", 1),
    ("boot", 0),
    ("delivered", 0),
    ("failed", 0),
    ("dropped_full", 0),
    ("dropped_age", 0),
)

_SQL_BEGIN = "BEGIN IMMEDIATE"
_SQL_COMMIT = "COMMIT"
_SQL_ROLLBACK = "ROLLBACK"
_SQL_META_INIT = "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)"
_SQL_META_ALL = "SELECT key, value FROM meta"
_SQL_META_GET = "SELECT value FROM meta WHERE key = ?"
_SQL_META_SET = "UPDATE meta SET value = ? WHERE key = ?"
_SQL_META_BUMP = "UPDATE meta SET value = value + ? WHERE key = ?"
_SQL_INSERT = (
    "INSERT INTO entries (seq, created, size, kind, retain, topic, payload, correlation)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_OLDEST_NOT_EVENT = (
    "SELECT seq, size FROM entries WHERE kind != 'event' AND seq < ? ORDER BY seq LIMIT 1"
)
_SQL_OLDEST_ANY = "SELECT seq, size FROM entries WHERE seq < ? ORDER BY seq LIMIT 1"
_SQL_SIZE = "SELECT size FROM entries WHERE seq = ?"
_SQL_DELETE = "DELETE FROM entries WHERE seq = ?"
_SQL_FAIL = "UPDATE entries SET failures = failures + 1, last_error = ? WHERE seq = ?"
_SQL_PENDING = (
    "SELECT seq, topic, kind, payload, retain, created, correlation FROM entries"
    " ORDER BY seq LIMIT ?"
)
_SQL_TOTALS = "SELECT count(*), total(size) FROM entries"
_SQL_EXPIRED_TOTALS = "SELECT count(*), total(size) FROM entries WHERE created < ?"
_SQL_EXPIRE = "DELETE FROM entries WHERE created < ?"
_SQL_OLDEST_CREATED = "SELECT min(created) FROM entries"


def _corrupt(reason: str) -> str:
    return (
        f"database is corrupt ({reason}); the file was left untouched,"
        " move it aside to start an empty outbox"
    )


@dataclass(frozen=True)
class Entry:
    """One queued message."""

    seq: int
    topic: str
    kind: str  # "event", "state" (full snapshot), "status", ...
    payload: bytes
    retain: bool
    created: float  # unix seconds
    correlation: bytes | None = None  # MQTT 5 Correlation Data to publish with (a response)


@dataclass(frozen=True)
class OutboxStats:
    """Queue depth and lifetime counters (counters persist across restarts)."""

    queued: int
    queued_bytes: int
    oldest_age_s: float | None
    dropped_full: int
    dropped_age: int
    failed: int
    delivered: int
    next_seq: int
    boot: int


class Outbox:
    """Durable, bounded FIFO of signed messages awaiting broker acknowledgement."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"outbox max_bytes must be positive, got {max_bytes}")
        if max_age_s <= 0:
            raise ValueError(f"outbox max_age_s must be positive, got {max_age_s}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if not self.path.parent.is_dir():
            raise ConfigError(
                f"{self.path}: cannot open outbox: directory {self.path.parent} does not exist"
            )
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open outbox: {exc}") from exc
        try:
            self._open(conn)
        except sqlite3.DatabaseError as exc:
            self._conn = None
            conn.close()
            reason = str(exc)
            if not isinstance(exc, sqlite3.OperationalError) or "malformed" in reason:
                # "file is not a database", "database disk image is malformed", ...
                reason = _corrupt(reason)
            raise ConfigError(f"{self.path}: cannot open outbox: {reason}") from exc
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _open(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}").fetchone()
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}").fetchone()
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            detail = "; ".join(" ".join(str(p).split()) for p in problems[:3])
            raise ConfigError(
                f"{self.path}: cannot open outbox: {_corrupt('integrity check failed: ' + detail)}"
            )
        conn.execute(_SQL_BEGIN)
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            _add_correlation_column(conn)
            conn.executemany(_SQL_META_INIT, _META_DEFAULTS)
            meta = dict(conn.execute(_SQL_META_ALL).fetchall())
            if meta["schema"] != SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path}: cannot open outbox: schema version {meta['schema']},"
                    f" this agent understands {SCHEMA_VERSION}"
                )
            boot = int(meta["boot"]) + 1
            conn.execute(_SQL_META_SET, (boot, "boot"))
            count, total = conn.execute(_SQL_TOTALS).fetchone()
            conn.execute(_SQL_COMMIT)
        except BaseException:
            _rollback_quietly(conn)
            raise
        self._conn = conn
        self.boot = boot
        self._next_seq = int(meta["next_seq"])
        self._delivered = int(meta["delivered"])
        self._failed = int(meta["failed"])
        self._dropped_full = int(meta["dropped_full"])
        self._dropped_age = int(meta["dropped_age"])
        self._count = int(count)
        self._bytes = int(total)
        self.expire()

    # -- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"{self.path}: outbox is closed")
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception. Caller holds the lock."""
        conn = self._connection()
        if conn.in_transaction:
            raise RuntimeError("outbox: write called from inside make_payload")
        conn.execute(_SQL_BEGIN)
        try:
            yield conn
            conn.execute(_SQL_COMMIT)
        except BaseException:
            _rollback_quietly(conn)
            raise

    # -- API --------------------------------------------------------------------------------

    def add(
        self,
        topic: str,
        kind: str,
        make_payload: Callable[[int], bytes],
        *,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> Entry:
        """Allocate the next seq, build the payload with it and store both in one transaction.

        If ``make_payload`` raises, nothing is stored and the seq is not consumed. Then drop
        old entries until the queue fits ``max_bytes`` (never the one just added).
        """
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise ValueError(f"outbox: invalid MQTT topic to publish to: {topic!r}")
        if not kind:
            raise ValueError("outbox: entry kind must not be empty")
        topic_len = len(topic.encode("utf-8"))
        with self._lock:
            with self._transaction() as conn:
                seq = int(conn.execute(_SQL_META_GET, ("next_seq",)).fetchone()[0])
                payload = make_payload(seq)
                if not isinstance(payload, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"outbox: make_payload must return bytes, got {type(payload).__name__}"
                    )
                payload = bytes(payload)
                size = len(payload) + topic_len + len(correlation or b"")
                created = float(self._clock())
                conn.execute(_SQL_INSERT, (seq, created, size, kind, int(retain), topic, payload,
                                           correlation))
                conn.execute(_SQL_META_SET, (seq + 1, "next_seq"))
                count = self._count + 1
                total = self._bytes + size
                dropped = 0
                while total > self.max_bytes:
                    row = conn.execute(_SQL_OLDEST_NOT_EVENT, (seq,)).fetchone()
                    if row is None:
                        row = conn.execute(_SQL_OLDEST_ANY, (seq,)).fetchone()
                        if row is None:
                            break  # only the new entry is left: keep it even if oversized
                    conn.execute(_SQL_DELETE, (row[0],))
                    total -= row[1]
                    count -= 1
                    dropped += 1
                if dropped:
                    conn.execute(_SQL_META_BUMP, (dropped, "dropped_full"))
            # Committed: now mirror it in memory.
            self._next_seq = seq + 1
            self._count = count
            self._bytes = total
            self._dropped_full += dropped
            return Entry(seq, topic, kind, payload, bool(retain), created, correlation)

    def pending(self, limit: int, exclude: Collection[int] = ()) -> list[Entry]:
        """Up to ``limit`` entries, lowest seq first, skipping seqs in ``exclude`` (in flight)."""
        if limit <= 0:
            return []
        skip = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        with self._lock:
            rows = self._connection().execute(_SQL_PENDING, (limit + len(skip),)).fetchall()
        out = []
        for seq, topic, kind, payload, retain, created, correlation in rows:
            if seq in skip:
                continue
            out.append(Entry(seq, topic, kind, bytes(payload), bool(retain), created,
                             None if correlation is None else bytes(correlation)))
            if len(out) == limit:
                break
        return out

    def delete(self, seq: int) -> None:
        """The broker acknowledged ``seq``: remove it and count it delivered.

        A seq that is no longer queued (already deleted, or dropped by a bound while in flight)
        is ignored and not counted.
        """
        with self._lock:
            with self._transaction() as conn:
                row = conn.execute(_SQL_SIZE, (seq,)).fetchone()
                if row is not None:
                    conn.execute(_SQL_DELETE, (seq,))
                    conn.execute(_SQL_META_BUMP, (1, "delivered"))
            if row is not None:
                self._count -= 1
                self._bytes -= row[0]
                self._delivered += 1

    def record_failure(self, seq: int, reason: str) -> None:
        """The broker refused ``seq``: keep the entry, store ``reason`` on it, count a failure.

        The failure is counted even if ``seq`` is no longer queued.
        """
        reason = str(reason)[:MAX_REASON_CHARS]
        with self._lock:
            with self._transaction() as conn:
                conn.execute(_SQL_FAIL, (reason, seq))
                conn.execute(_SQL_META_BUMP, (1, "failed"))
            self._failed += 1

    def expire(self) -> int:
        """Drop entries created more than ``max_age_s`` ago; return how many were dropped."""
        with self._lock:
            cutoff = float(self._clock()) - self.max_age_s
            with self._transaction() as conn:
                count, total = conn.execute(_SQL_EXPIRED_TOTALS, (cutoff,)).fetchone()
                if count:
                    conn.execute(_SQL_EXPIRE, (cutoff,))
                    conn.execute(_SQL_META_BUMP, (count, "dropped_age"))
            self._count -= count
            self._bytes -= int(total)
            self._dropped_age += count
            return count

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = self._connection().execute(_SQL_OLDEST_CREATED).fetchone()[0]
            age = None if oldest is None else max(0.0, float(self._clock()) - oldest)
            return OutboxStats(
                queued=self._count,
                queued_bytes=self._bytes,
                oldest_age_s=age,
                dropped_full=self._dropped_full,
                dropped_age=self._dropped_age,
                failed=self._failed,
                delivered=self._delivered,
                next_seq=self._next_seq,
                boot=self.boot,
            )

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Close the database (idempotent). Later calls other than close() raise RuntimeError."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    """Undo an open transaction; a failing rollback must not hide the error being raised."""
    if conn.in_transaction:
        try:
            conn.execute(_SQL_ROLLBACK)
        except sqlite3.Error:
            pass


def _add_correlation_column(conn: sqlite3.Connection) -> None:
    """Outboxes written before snapshot requests lack the column; an older agent ignores it."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    if "correlation" not in columns:
        conn.execute("ALTER TABLE entries ADD COLUMN correlation BLOB")
