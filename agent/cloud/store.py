"""``serve``'s store: the last verified state of each vehicle and a bounded history.

It persists exactly what a :class:`~agent.cloud.view.VehicleView` holds (per vehicle: each
signal's quality, as-of, last valid value and its as-of; the newest source; online) so that
:func:`agent.cloud.answer.answer` works on a view loaded from it. Writes follow
:func:`agent.cloud.view.merge`: load, merge, save, in one transaction that holds the vehicle's
row (SQLite: the database's write lock; PostgreSQL: ``SELECT ... FOR UPDATE``), so two
``serve`` instances writing for one vehicle cannot lose each other's readings.

Idempotent: a message is stored once per (vid, stream, seq); a delivery seen before is
recognised and changes nothing. The messages table is the vehicle's history: the newest
``history`` messages per vehicle are kept.

One small interface, :class:`Store`; backends in their own modules
(:mod:`agent.cloud.store_sqlite`, :mod:`agent.cloud.store_postgres`), chosen by URL in
:func:`open_store`. The schema is created and migrated when a store opens (table
``schema_version``).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator

from agent.cloud.view import Reading, Source, VehicleView, merge, source_of
from agent.errors import ConfigError, UserError


class StoreError(UserError):
    """The store cannot be opened or used (one line)."""


class Store(ABC):
    """Where verified state lives. Thread-safe."""

    history: int = 1000

    @abstractmethod
    def apply(self, record: dict[str, Any]) -> bool:
        """Fold one verified record in; False if this (vid, stream, seq) was stored before."""

    @abstractmethod
    def set_online(self, vid: str, online: bool | None) -> None:
        """Record the vehicle's (unsigned) online status."""

    @abstractmethod
    def view(self, vid: str) -> VehicleView | None:
        """The vehicle's view, or None if nothing was ever stored for it."""

    @abstractmethod
    def last_id(self, vid: str) -> int:
        """Id of the newest stored message of ``vid`` (grows with every new one; 0: none)."""

    @abstractmethod
    def messages(self, vid: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest stored messages of ``vid``, newest first."""

    @abstractmethod
    def count(self) -> int:
        """Stored messages, all vehicles."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store cannot answer now (health checks)."""

    @abstractmethod
    def close(self) -> None: ...


class SqlStore(Store):
    """The SQL both backends share. Subclasses give a transaction and lock the vehicle row.

    SQL is written with ``?`` placeholders; a backend rewrites them if its driver differs.
    """

    placeholder = "?"

    @contextmanager
    @abstractmethod
    def transaction(self, vid: str | None = None) -> Iterator[Any]:
        """A cursor in one transaction; with ``vid``: holding that vehicle's row for writing."""

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _run(self, cur: Any, text: str, args: tuple = ()) -> Any:
        cur.execute(self._sql(text), args)
        return cur

    # ------------------------------------------------------------------ writes

    def apply(self, record: dict[str, Any]) -> bool:
        vid = record["vid"]
        source = source_of(record)
        with self.transaction(vid) as cur:
            self._run(cur, "INSERT INTO messages (vid, stream, seq, boot, kind, ts, kid, "
                           "signals, quality, age, received) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                           "ON CONFLICT (vid, stream, seq) DO NOTHING",
                      (vid, source.stream, source.seq, source.boot, record["kind"], source.ts,
                       source.kid, _dump(record.get("signals") or {}),
                       _dump(record.get("quality") or {}), _dump(record.get("age")),
                       time.time()))
            if cur.rowcount == 0:
                return False
            before = self._load(cur, vid)
            after = merge(before, record)
            self._save(cur, before, after)
            self._run(cur, "DELETE FROM messages WHERE vid = ? AND id <= (SELECT id FROM messages "
                           "WHERE vid = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                      (vid, vid, self.history))
        return True

    def set_online(self, vid: str, online: bool | None) -> None:
        with self.transaction(vid) as cur:
            self._run(cur, "UPDATE vehicles SET online = ? WHERE vid = ?", (online, vid))

    def _save(self, cur: Any, before: VehicleView, after: VehicleView) -> None:
        for path, reading in after.readings.items():
            if before.readings.get(path) == reading:
                continue
            self._run(cur, "INSERT INTO readings (vid, path, quality, as_of, value, valid_as_of) "
                           "VALUES (?,?,?,?,?,?) ON CONFLICT (vid, path) DO UPDATE SET "
                           "quality = excluded.quality, as_of = excluded.as_of, "
                           "value = excluded.value, valid_as_of = excluded.valid_as_of",
                      (after.vid, path, reading.quality, reading.as_of, _dump(reading.value),
                       reading.valid_as_of))
        s = after.source
        if s is not None and s != before.source:
            self._run(cur, "UPDATE vehicles SET seq = ?, boot = ?, kid = ?, stream = ?, ts = ? "
                           "WHERE vid = ?", (s.seq, s.boot, s.kid, s.stream, s.ts, after.vid))

    # ------------------------------------------------------------------ reads

    def view(self, vid: str) -> VehicleView | None:
        with self.transaction() as cur:
            row = self._run(cur, "SELECT 1 FROM vehicles WHERE vid = ?", (vid,)).fetchone()
            return None if row is None else self._load(cur, vid)

    def _load(self, cur: Any, vid: str) -> VehicleView:
        row = self._run(cur, "SELECT seq, boot, kid, stream, ts, online FROM vehicles "
                             "WHERE vid = ?", (vid,)).fetchone()
        if row is None:
            return VehicleView(vid=vid)
        seq, boot, kid, stream, ts, online = row
        source = None if seq is None else Source(seq=seq, boot=boot, kid=kid, stream=stream,
                                                 ts=ts)
        readings = {path: Reading(quality=q, as_of=as_of, value=json.loads(value),
                                  valid_as_of=valid_as_of)
                    for path, q, as_of, value, valid_as_of in self._run(
                        cur, "SELECT path, quality, as_of, value, valid_as_of FROM readings "
                             "WHERE vid = ?", (vid,)).fetchall()}
        return VehicleView(vid=vid, readings=MappingProxyType(readings), source=source,
                           online=None if online is None else bool(online))

    def last_id(self, vid: str) -> int:
        with self.transaction() as cur:
            row = self._run(cur, "SELECT max(id) FROM messages WHERE vid = ?", (vid,)).fetchone()
            return int(row[0] or 0)

    def messages(self, vid: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.transaction() as cur:
            rows = self._run(cur, "SELECT kind, stream, seq, boot, ts, kid, signals, quality, age "
                                  "FROM messages WHERE vid = ? ORDER BY id DESC LIMIT ?",
                             (vid, limit)).fetchall()
        return [{"kind": kind, "stream": stream, "seq": seq, "boot": boot, "ts": ts, "kid": kid,
                 "signals": json.loads(signals), "quality": json.loads(quality),
                 "age": json.loads(age)}
                for kind, stream, seq, boot, ts, kid, signals, quality, age in rows]

    def count(self) -> int:
        with self.transaction() as cur:
            return int(self._run(cur, "SELECT count(*) FROM messages").fetchone()[0])

    def ping(self) -> None:
        with self.transaction() as cur:
            self._run(cur, "SELECT 1").fetchone()


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def migrate(cur: Any, migrations: list[str], placeholder: str = "?") -> int:
    """Bring the schema up to date inside the caller's (locked) transaction; its version."""
    cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    cur.execute("SELECT max(version) FROM schema_version")
    version = cur.fetchone()[0] or 0
    if version > len(migrations):
        raise StoreError(f"the store's schema is version {version}, newer than this car-agent "
                         f"knows ({len(migrations)}): upgrade car-agent")
    for number, script in enumerate(migrations[version:], start=version + 1):
        for statement in filter(None, (s.strip() for s in script.split(";"))):
            cur.execute(statement)
        cur.execute(f"INSERT INTO schema_version (version) VALUES ({placeholder})", (number,))
    return len(migrations)


def open_store(url: str, base: Path, history: int = 1000) -> Store:
    """The store at ``url``: ``sqlite:///PATH`` (relative to ``base``, the config's folder;
    ``sqlite:////abs`` absolute) or ``postgresql://...``.

    :raises StoreError: it cannot be opened (one line).
    """
    if url.startswith("sqlite:///"):
        from agent.cloud.store_sqlite import SqliteStore

        rest = url[len("sqlite:///"):]
        if not rest:
            raise ConfigError(f"store.url {url!r}: no path after sqlite:///")
        path = Path(rest) if rest.startswith("/") else base / rest
        return SqliteStore(path, history=history)
    if url.startswith(("postgresql://", "postgres://")):
        from agent.cloud.store_postgres import PostgresStore

        return PostgresStore(url, history=history)
    raise ConfigError(f"store.url {url[:60]!r}: expected sqlite:///PATH or postgresql://...")
