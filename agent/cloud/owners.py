"""Owners and their tokens: who may ask about which vehicle.

The owners file (YAML, written by ``car-agent owner add``) holds only each token's SHA-256,
never a token::

    owners:
      - token_sha256: 9f86d081...      # 64 hex digits
        vehicles: [VIN1, VIN2]

A request's token is hashed and compared with every entry in constant time
(:func:`hmac.compare_digest`), so neither a token nor its hash leaks through timing. The file is
re-read when it changes, so an owner added while ``serve`` runs can ask at once.
Per token a token bucket limits the request rate (:class:`RateLimiter`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.config import VEHICLE_ID_PATTERN, vehicle_id_problem
from agent.errors import ConfigError, UserError
from agent.schema import Section, load_yaml

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Owner:
    token_sha256: bytes
    vehicles: frozenset[str]


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def load_owners(path: Path) -> tuple[Owner, ...]:
    """The owners in ``path`` (none if it does not exist); one-line ConfigError if it is bad."""
    if not path.exists():
        return ()
    data = load_yaml(path, "owners")
    top = Section({} if data is None else data, path)
    top.reject_unknown(("owners",))
    entries = top.get("owners", list, [])
    owners = []
    for i, entry in enumerate(entries):
        s = Section(entry, path, f"owners[{i}]")
        s.reject_unknown(("token_sha256", "vehicles"))
        digest = s.text("token_sha256", required=True)
        assert digest is not None
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise s.error("token_sha256", "expected 64 lowercase hex digits")
        vehicles = s.get("vehicles", list, required=True)
        for vid in vehicles:
            if not isinstance(vid, str) or not VEHICLE_ID_PATTERN.fullmatch(vid):
                raise s.error("vehicles", f"{str(vid)[:70]!r} is not a vehicle id")
        owners.append(Owner(bytes.fromhex(digest), frozenset(vehicles)))
    return tuple(owners)


def add_owner(path: Path, vehicles: list[str]) -> str:
    """Add an owner of ``vehicles`` to the owners file (created 0600 if missing) and return
    the new token; only its SHA-256 is written."""
    for vid in vehicles:
        problem = vehicle_id_problem(vid)
        if problem:
            raise UserError(f"--vehicle: {problem}")
    existing = load_owners(path)
    token = secrets.token_urlsafe(32)
    entries = [{"token_sha256": o.token_sha256.hex(), "vehicles": sorted(o.vehicles)}
               for o in existing]
    entries.append({"token_sha256": token_hash(token).hex(),
                    "vehicles": list(dict.fromkeys(vehicles))})
    text = ("# car-agent owners: SHA-256 of each owner's token and the vehicles it may read.\n"
            "# Written by `car-agent owner add`; tokens themselves are never stored.\n"
            + yaml.safe_dump({"owners": entries}, sort_keys=False))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write the owners file: {exc.strerror}") from None
    return token


class OwnerDirectory:
    """The owners file, re-read when it changes (checked at most once a second)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._owners: tuple[Owner, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.problem: str | None = None
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp and not force:
            return
        try:
            self._owners = load_owners(self.path)
            self.problem = None
        except ConfigError as exc:
            if force:
                raise
            self.problem = str(exc)   # keep the owners we had; serve logs this
        self._stamp = stamp

    def vehicles(self, token: str) -> frozenset[str] | None:
        """The vehicles of the token's owner, or None for an unknown token."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= 1.0:
                self._checked = now
                self._reload()
            owners = self._owners
        digest = token_hash(token)
        found: frozenset[str] | None = None
        for owner in owners:   # every entry compared: the time does not depend on which matched
            if hmac.compare_digest(owner.token_sha256, digest):
                found = owner.vehicles
        return found


class RateLimiter:
    """A token bucket per key: ``rate`` per second sustained, ``burst`` at once."""

    MAX_KEYS = 100_000

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, key: bytes) -> bool:
        now = self.clock()
        with self._lock:
            level, then = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - then) * self.rate)
            if len(self._buckets) >= self.MAX_KEYS and key not in self._buckets:
                self._buckets.clear()   # bounded memory; only known tokens get here
            if level < 1.0:
                self._buckets[key] = (level, now)
                return False
            self._buckets[key] = (level - 1.0, now)
            return True
