"""The embedded store: one SQLite file (WAL), for one ``serve`` instance (the default).

One connection shared by the ingest thread and the HTTP workers behind a lock; writes take the
database's write lock at once (``BEGIN IMMEDIATE``), so a load-merge-save is never interleaved.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from agent.cloud.store import SqlStore, StoreError, migrate

MIGRATIONS = [
    """
    CREATE TABLE vehicles (vid TEXT PRIMARY KEY, online INTEGER, seq INTEGER, boot INTEGER,
                           kid TEXT, stream TEXT, ts REAL);
    CREATE TABLE readings (vid TEXT NOT NULL, path TEXT NOT NULL, quality TEXT NOT NULL,
                           as_of REAL NOT NULL, value TEXT NOT NULL, valid_as_of REAL,
                           PRIMARY KEY (vid, path));
    CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, vid TEXT NOT NULL,
                           stream TEXT NOT NULL, seq INTEGER NOT NULL, boot INTEGER NOT NULL,
                           kind TEXT NOT NULL, ts REAL NOT NULL, kid TEXT NOT NULL,
                           signals TEXT NOT NULL, quality TEXT NOT NULL, age TEXT NOT NULL,
                           received REAL NOT NULL, UNIQUE (vid, stream, seq));
    CREATE INDEX messages_by_vid ON messages (vid, id)
    """,
]


class SqliteStore(SqlStore):
    def __init__(self, path: Path, history: int = 1000) -> None:
        self.path = path
        self.history = history
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                       timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self.transaction() as cur:
                migrate(cur, MIGRATIONS)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store {path}: cannot open: {exc}") from None

    @contextmanager
    def transaction(self, vid: str | None = None) -> Iterator[Any]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE" if vid is not None else "BEGIN")
            try:
                if vid is not None:
                    cur.execute("INSERT INTO vehicles (vid) VALUES (?) ON CONFLICT DO NOTHING",
                                (vid,))
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
