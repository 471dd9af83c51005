"""The shared store: PostgreSQL (psycopg 3 with a connection pool), for several ``serve``
instances behind one load balancer.

A write locks the vehicle's row (``SELECT ... FOR UPDATE``) before its load-merge-save, so two
instances merging messages of one vehicle take turns; a message delivered to both (the retained
state each reads at start) is stored once (``ON CONFLICT DO NOTHING`` on (vid, stream, seq)).
Migrations run under an advisory lock, so instances starting together migrate once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from agent.cloud.store import SqlStore, StoreError, migrate

MIGRATIONS = [
    """
    CREATE TABLE vehicles (vid TEXT PRIMARY KEY, online BOOLEAN, seq BIGINT, boot BIGINT,
                           kid TEXT, stream TEXT, ts DOUBLE PRECISION);
    CREATE TABLE readings (vid TEXT NOT NULL, path TEXT NOT NULL, quality TEXT NOT NULL,
                           as_of DOUBLE PRECISION NOT NULL, value TEXT NOT NULL,
                           valid_as_of DOUBLE PRECISION, PRIMARY KEY (vid, path));
    CREATE TABLE messages (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                           vid TEXT NOT NULL, stream TEXT NOT NULL, seq BIGINT NOT NULL,
                           boot BIGINT NOT NULL, kind TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
                           kid TEXT NOT NULL, signals TEXT NOT NULL, quality TEXT NOT NULL,
                           age TEXT NOT NULL, received DOUBLE PRECISION NOT NULL,
                           UNIQUE (vid, stream, seq));
    CREATE INDEX messages_by_vid ON messages (vid, id)
    """,
]
#: Any fixed number: the advisory lock that serialises migrations between instances.
_MIGRATION_LOCK = 0x6361722D


class PostgresStore(SqlStore):
    placeholder = "%s"

    def __init__(self, url: str, history: int = 1000, pool_size: int = 4) -> None:
        self.history = history
        self._where = _redacted(url)
        try:
            # check: a connection cut by a database restart is replaced before use, not
            # handed to a request that would fail on it.
            self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                                        timeout=5.0, check=ConnectionPool.check_connection)
            self._pool.open(wait=True, timeout=10.0)
            with self.transaction() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                migrate(cur, MIGRATIONS, "%s")
        except (psycopg.Error, PoolTimeout) as exc:
            self.close()
            raise StoreError(f"store {self._where}: cannot open: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                             ) from None

    @contextmanager
    def transaction(self, vid: str | None = None) -> Iterator[Any]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            if vid is not None:
                cur.execute("INSERT INTO vehicles (vid) VALUES (%s) ON CONFLICT DO NOTHING",
                            (vid,))
                cur.execute("SELECT 1 FROM vehicles WHERE vid = %s FOR UPDATE", (vid,))
            yield cur

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close()


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
