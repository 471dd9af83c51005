"""The cloud side: watch what vehicles publish and verify it (``car-agent watch``).

A watcher connects to the broker over mutual TLS as the ``cloud`` client, subscribes to
``<prefix>/+/#`` and turns every message into one plain dict:

* ``<prefix>/<vid>/events`` and ``<prefix>/<vid>/state``: a JWS token. It is verified against
  the vehicles' JWK Set (``trust``), its claims are type-checked, the ``vid`` claim must
  match the topic and the signing key's ``vid``, and a sequence number seen before is a
  replay. Verified: ``{"vid", "topic", "kind", "seq", "boot", "ts", "signals", "quality",
  "age"?, "kid", "alg", "verified": true, "retained"}``. Rejected: ``{"topic", "rejected":
  reason, "verified": false, "seq"?}``.
* ``<prefix>/<vid>/status``: unsigned ``online``/``offline`` (or a JSON object):
  ``{"vid", "topic", "kind": "status", "status", "verified": false, "retained"}``.

Nothing a vehicle (or anyone else) sends can crash the watcher: every message becomes a
record. Connection problems are reported as one line each and retried with backoff.

Config (YAML; relative paths are relative to the config file)::

    mqtt:
      host: localhost
      port: 8883
      ca: pki/ca.crt          # CA that issued the broker's certificate
      cert: pki/cloud.crt     # this watcher's client certificate ...
      key: pki/cloud.key      # ... and its key
      topic_prefix: vehicles  # optional, default "vehicles"
    trust: pki/jwks.json      # JWK Set of the vehicles' signing keys
    crl: pki/crl.pem          # optional: CRL of the CA in mqtt.ca (see CrlTrust)

With ``crl``, a signing key is trusted only through its certificate (the JWK's ``x5c``):
issued by the CA in ``mqtt.ca`` (assumption: the one CA that issues the broker's, the
vehicles' TLS and the vehicles' signing certificates and signs the CRL, as the development
PKI does), valid now, CN equal to the ``vid`` claim, and not revoked.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import secrets
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import VEHICLE_ID_PATTERN
from .errors import ConfigError, KeyFileError, UserError
from .keyfiles import read_key_material
from .schema import Section, load_yaml
from .tlsdiag import (
    ClosingSSLSocket,
    _short,
    describe_connect_error,
    describe_tls_alert,
    probe_tls12,
)
from .signing import DOCUMENT_SIGNING, VerificationError, Verifier

__all__ = [
    "CloudConfig",
    "CloudWatcher",
    "CrlTrust",
    "MAX_PAYLOAD_BYTES",
    "MessageChecker",
    "SeqTracker",
    "describe_connect_error",
    "describe_tls_alert",
    "format_human",
    "load_cloud_config",
    "make_ssl_context",
    "watch_main",
]

log = logging.getLogger("car_agent.cloud")

#: Larger payloads are rejected unread (a state message is a few KiB).
MAX_PAYLOAD_BYTES = 256 * 1024
#: Highest accepted ``seq`` (a signed 64-bit counter on the vehicle).
MAX_SEQ = 2**63 - 1
#: How long the broker keeps our subscription across a short outage of this watcher.
SESSION_EXPIRY_S = 300

_KINDS = {"events": "event", "state": "state"}
_SHA256 = hashes.SHA256()


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CloudConfig:
    """A validated cloud (watcher) config."""

    file: Path
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    trust: Path
    topic_prefix: str = "vehicles"
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    crl: Path | None = None


def load_cloud_config(path: str | Path) -> CloudConfig:
    """Load and validate a cloud config; errors are one-line ConfigErrors naming file and key."""
    file = Path(path)
    top = Section(load_yaml(file, "cloud config"), file)
    top.reject_unknown(("mqtt", "trust", "crl"))
    m = top.section("mqtt", required=True)
    assert m is not None
    m.reject_unknown(("host", "port", "ca", "cert", "key", "topic_prefix", "keepalive_s",
                      "reconnect_min_s", "reconnect_max_s"))
    prefix = m.text("topic_prefix", "vehicles")
    assert prefix is not None
    if any(c in prefix for c in "+#\x00") or prefix.startswith("/") or prefix.endswith("/"):
        raise m.error("topic_prefix", f"{prefix!r} must not contain + # or NUL, "
                                      "nor start or end with /")
    reconnect_min = m.number("reconnect_min_s", 0.5, minimum=0.05)
    reconnect_max = m.number("reconnect_max_s", 30.0, minimum=reconnect_min)
    return CloudConfig(
        file=file,
        host=m.text("host", required=True),
        port=m.integer("port", 8883, minimum=1, maximum=65535),
        ca=m.path_value("ca", required=True),
        cert=m.path_value("cert", required=True),
        key=m.path_value("key", required=True),
        trust=top.path_value("trust", required=True),
        topic_prefix=prefix,
        keepalive_s=m.integer("keepalive_s", 30, minimum=5, maximum=3600),
        reconnect_min_s=float(reconnect_min),
        reconnect_max_s=float(reconnect_max),
        crl=top.path_value("crl"),
    )


def make_ssl_context(config: CloudConfig) -> ssl.SSLContext:
    """Client TLS context: verify the broker against ``ca``, present ``cert``/``key``.

    :raises KeyFileError: a file is missing, unreadable or not what it should be.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = ClosingSSLSocket
    where = f"{config.file}: mqtt"
    try:
        ctx.load_verify_locations(cafile=str(config.ca))
    except FileNotFoundError:
        raise KeyFileError(f"{where}.ca: {config.ca}: file not found") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise KeyFileError(f"{where}.ca: {config.ca}: not a PEM CA certificate "
                           f"({_short(exc)})") from None
    for name, path in (("cert", config.cert), ("key", config.key)):
        if not path.is_file():
            raise KeyFileError(f"{where}.{name}: {path}: file not found")
    try:
        ctx.load_cert_chain(certfile=str(config.cert), keyfile=str(config.key))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise KeyFileError(f"{where}.cert/key: {config.cert}, {config.key}: cannot load the "
                           f"client certificate and key, or they do not match ({_short(exc)})"
                           ) from None
    return ctx


# --------------------------------------------------------------------------- replay detection


class SeqTracker:
    """Remembers which sequence numbers each vehicle has had accepted.

    Per vehicle: a watermark ``N`` ("every seq <= N has been seen") plus the set of seqs
    above it. Arrivals in any order are accepted once each. If gaps never fill (messages
    lost for good), the set is capped at ``window`` entries: the oldest gaps are then given
    up, and a seq below the new watermark is refused as too old.
    """

    def __init__(self, window: int = 4096) -> None:
        if window < 2:
            raise ValueError("window must be at least 2")
        self.window = window
        self._floor: dict[str, int] = {}
        self._given_up: dict[str, int] = {}  # every seq <= this unseen one was abandoned
        self._above: dict[str, set[int]] = {}

    def watermark(self, vid: str) -> int:
        """Every seq <= this has been accepted (or given up); 0 for a vehicle not seen yet."""
        return self._floor.get(vid, 0)

    def seen(self, vid: str, seq: int) -> bool:
        """Would ``seq`` be refused now? (Does not record anything.)"""
        return seq <= self._floor.get(vid, 0) or seq in self._above.get(vid, ())

    def accept(self, vid: str, seq: int) -> bool:
        """Record ``seq``; True if it is new, False if it was seen before (or is too old)."""
        floor = self._floor.get(vid, 0)
        if seq <= floor:
            return False
        above = self._above.get(vid)
        if above is None:
            above = self._above[vid] = set()
        elif seq in above:
            return False
        if seq == floor + 1:
            floor = seq
            while floor + 1 in above:
                floor += 1
                above.discard(floor)
            self._floor[vid] = floor
        else:
            above.add(seq)
            if len(above) > self.window:
                self._give_up_oldest(vid, above)
        return True

    def why_rejected(self, vid: str, seq: int) -> str:
        """Reason text for a seq that :meth:`accept` refused."""
        if seq <= self._given_up.get(vid, 0):
            return (f"duplicate or too old seq {seq} (older than the replay window of "
                    f"{self.window} out-of-order messages)")
        return f"duplicate seq {seq}"

    def _give_up_oldest(self, vid: str, above: set[int]) -> None:
        ordered = sorted(above)
        keep = self.window // 2
        cut = ordered[-keep - 1]  # highest seq that stops being remembered individually
        remaining = set(ordered[-keep:])
        floor = cut
        while floor + 1 in remaining:
            floor += 1
            remaining.discard(floor)
        self._given_up[vid] = cut
        self._floor[vid] = floor
        self._above[vid] = remaining


# --------------------------------------------------------------------------- revocation

#: A CRL file larger than this is refused unread.
MAX_CRL_BYTES = 64 * 1024 * 1024


class _CrlError(Exception):
    """Internal: why the CRL file cannot be used (the caller adds where)."""


@dataclass(frozen=True)
class _LoadedCrl:
    ca: x509.Certificate            # the CA (from mqtt.ca) that signed it
    ca_fingerprint: bytes
    revoked: frozenset[int]         # serial numbers
    next_update: dt.datetime
    number: int | None


@dataclass(frozen=True)
class _CertFacts:
    problem: str | None             # time-independent reason to refuse (issuer, usage)
    cn: str | None
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _serial_text(serial: int) -> str:
    return f"0x{serial:X}"


def _load_ca_bundle(path: Path, where: str) -> list[x509.Certificate]:
    data = read_key_material(path, "a PEM CA certificate", where)
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError:
        cas = []
    if not cas:
        raise KeyFileError(f"{where}: {path}: not a PEM CA certificate")
    return cas


class CrlTrust:
    """Trust decisions on signing keys from a CRL of the CA in ``mqtt.ca`` (config ``crl``).

    Assumption (true of the development PKI, :mod:`agent.pki`): one CA issues the vehicles'
    certificates, TLS and signing, and signs the CRL; it is in the ``mqtt.ca`` bundle.
    A CRL can only speak for certificates of its own issuer, so a signing certificate from
    any other CA is rejected rather than taken as "not revoked".

    :meth:`check` decides for one signed message. Before each decision the file is
    ``stat``-ed (about a microsecond); when its inode, size, mtime or ctime changed it is
    read again, so a revocation applies to the next message without a restart. Write the
    file atomically (temp file + rename, as :func:`agent.pki.revoke` does): a half-written
    CRL is unusable and, like a missing or expired one, makes every signed message fail.

    ``on_problem`` hears once about a CRL-wide problem (expired, unreadable, not signed by
    the CA), the way mosquitto, whose expired CRL locks every client out, would only show
    it as refused connections. Not thread-safe: call from one thread.
    """

    def __init__(
        self,
        crl: Path | str,
        ca: Path | str,
        *,
        where: str = "crl",
        ca_where: str = "mqtt.ca",
        on_problem: Callable[[str], None] | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        """Load the CA bundle and the CRL.

        :param where: names the config key in errors, e.g. ``"cloud.yaml: crl"``.
        :raises ConfigError: the CRL is missing, unreadable, not a CRL, not signed by a
            CA in ``ca``, or has no next update (an expired CRL is not an error here:
            :meth:`check` rejects while it is expired, so a renewed file needs no restart).
        :raises KeyFileError: ``ca`` is missing or not PEM certificates.
        """
        self.path = Path(crl)
        self.ca_path = Path(ca)
        self.where = where
        self.on_problem = on_problem
        self._clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._cas = _load_ca_bundle(self.ca_path, ca_where)
        self._sig = self._stat()
        try:
            self._crl: _LoadedCrl | None = self._read()
        except _CrlError as exc:
            raise ConfigError(f"{where}: {self.path}: {exc}") from None
        self._unusable: str | None = None
        self._reported: str | None = None
        self._facts: dict[tuple[str, bytes], _CertFacts] = {}  # by (kid, CA fingerprint)

    # ------------------------------------------------------------------ state

    @property
    def revoked(self) -> frozenset[int]:
        """Serial numbers in the CRL last loaded (empty while it is unusable)."""
        return self._crl.revoked if self._crl is not None else frozenset()

    @property
    def next_update(self) -> dt.datetime | None:
        return self._crl.next_update if self._crl is not None else None

    def problem(self) -> str | None:
        """The CRL-wide reason every signed message is rejected now, or None.

        Re-reads the file if it changed; reports a new problem to ``on_problem`` once.
        """
        self._refresh()
        if self._unusable is not None:
            reason = f"CRL unusable ({self._unusable})"
            remedy = "until the file is fixed"
        else:
            assert self._crl is not None
            if self._clock() < self._crl.next_update:
                if self._reported is not None:
                    log.info("%s: CRL usable again (next update %s)", self.path,
                             _utc_text(self._crl.next_update))
                    self._reported = None
                return None
            reason = f"CRL expired (next update {_utc_text(self._crl.next_update)})"
            remedy = "until it is renewed"
        if reason != self._reported:
            self._reported = reason
            if self.on_problem is not None:
                try:
                    self.on_problem(f"{self.path}: {reason}: every signed message is rejected "
                                    f"{remedy}")
                except Exception:  # noqa: BLE001
                    log.exception("on_problem callback failed")
        return reason

    # ------------------------------------------------------------------ decisions

    def check(self, kid: str | None, cert: x509.Certificate | None, vid: str) -> str | None:
        """Why a message signed by key ``kid`` (certificate ``cert``, the JWK's ``x5c``)
        claiming vehicle ``vid`` must be rejected, or None if the key is trusted."""
        problem = self.problem()
        if problem is not None:
            return problem
        if cert is None or kid is None:
            # Fail closed. The operator configured a CRL, i.e. asked that revocation govern
            # trust; a key without a certificate has no serial the CRL could list, so it
            # could never be revoked. Accepting it would let a revoked vehicle's key (or any
            # key added to the JWK Set without x5c) keep signing, and undo revocation.
            return "signing key has no certificate to check against the CRL"
        crl = self._crl
        assert crl is not None
        facts = self._facts_for(kid, cert, crl)
        if facts.problem is not None:
            return facts.problem
        now = self._clock()
        if now < facts.not_before:
            return f"signing certificate not valid yet (not before {_utc_text(facts.not_before)})"
        if now > facts.not_after:
            return f"signing certificate expired (not after {_utc_text(facts.not_after)})"
        if facts.cn != vid:
            shown = "no single CN" if facts.cn is None else f"CN {facts.cn[:64]!r}"
            return f"signing certificate has {shown}, not the vid claim {vid!r}"
        if facts.serial in crl.revoked:
            return f"signing key revoked (certificate serial {_serial_text(facts.serial)})"
        return None

    def _facts_for(self, kid: str, cert: x509.Certificate, crl: _LoadedCrl) -> _CertFacts:
        """What the checks need from ``cert``, worked out once per key and CA (the CA's
        signature is checked here, not per message)."""
        key = (kid, crl.ca_fingerprint)
        facts = self._facts.get(key)
        if facts is None:
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cn = names[0].value if len(names) == 1 else None
            facts = self._facts[key] = _CertFacts(
                problem=_certificate_problem(cert, crl.ca),
                cn=cn if isinstance(cn, str) else None,
                serial=cert.serial_number,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
            )
        return facts

    # ------------------------------------------------------------------ the file

    def _stat(self) -> tuple[Any, ...]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return ("error", exc.errno)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _refresh(self) -> None:
        sig = self._stat()
        if sig == self._sig:
            return
        # Taken before reading: if the file changes while it is read, the next stat differs
        # and it is read again.
        self._sig = sig
        try:
            loaded = self._read()
        except _CrlError as exc:
            self._crl, self._unusable = None, str(exc)
            log.warning("%s: CRL unusable: %s", self.path, exc)
            return
        self._crl, self._unusable = loaded, None
        log.info("%s: CRL loaded: %d revoked, next update %s", self.path, len(loaded.revoked),
                 _utc_text(loaded.next_update))

    def _read(self) -> _LoadedCrl:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_CRL_BYTES + 1)
        except FileNotFoundError:
            raise _CrlError("file not found") from None
        except OSError as exc:
            raise _CrlError(f"cannot read: {exc.strerror or exc}") from None
        if len(data) > MAX_CRL_BYTES:
            raise _CrlError(f"larger than {MAX_CRL_BYTES} bytes")
        try:
            if b"-----BEGIN" in data:
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
        except ValueError:
            raise _CrlError("not a CRL (PEM or DER)") from None
        ca = self._signer_of(crl)
        if ca is None:
            raise _CrlError(f"not signed by the CA in mqtt.ca ({self.ca_path})")
        next_update = crl.next_update_utc
        if next_update is None:
            raise _CrlError("has no next update, so it could never be known to be out of date")
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except (x509.ExtensionNotFound, ValueError):
            number = None
        return _LoadedCrl(ca, ca.fingerprint(_SHA256),
                          frozenset(entry.serial_number for entry in crl), next_update, number)

    def _signer_of(self, crl: x509.CertificateRevocationList) -> x509.Certificate | None:
        for ca in self._cas:
            if ca.subject != crl.issuer:
                continue
            try:
                if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                    return ca
            except (TypeError, ValueError, UnsupportedAlgorithm):
                continue
        return None


def _certificate_problem(cert: x509.Certificate, ca: x509.Certificate) -> str | None:
    """Why ``cert`` cannot vouch for a signing key (time aside), or None."""
    try:
        # Issuer name, then the CA's public key verifies the certificate's signature.
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return (f"signing certificate not issued by the CRL's CA "
                f"({ca.subject.rfc4514_string()[:100]})")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "signing certificate is a CA certificate"
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return "signing certificate has malformed extensions"
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            return "signing certificate's key usage does not include digitalSignature"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        # Keys stay separate: a certificate made for TLS (clientAuth) must not vouch for a
        # message signing key.
        if DOCUMENT_SIGNING not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
            return "signing certificate's extended key usage does not include documentSigning"
    return None


# --------------------------------------------------------------------------- message checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MessageChecker:
    """Turns one MQTT message (topic, payload) into a record dict. Never raises.

    Pure apart from the :class:`SeqTracker` (and the CRL file a :class:`CrlTrust` reads):
    no network, so it can be tested alone. With ``revocation``, every signed message must
    also pass :meth:`CrlTrust.check` (certificate of the key, CRL); without it nothing
    about certificates is checked.
    """

    def __init__(self, verifier: Verifier, topic_prefix: str = "vehicles",
                 tracker: SeqTracker | None = None, *,
                 revocation: CrlTrust | None = None) -> None:
        self.verifier = verifier
        self.prefix_parts = topic_prefix.split("/")
        self.tracker = tracker if tracker is not None else SeqTracker()
        self.revocation = revocation

    def check(self, topic: str, payload: bytes, retained: bool = False) -> dict[str, Any]:
        try:
            return self._check(topic, bytes(payload), retained)
        except Exception as exc:  # noqa: BLE001 - a message must never crash the watcher
            log.exception("unexpected error checking a message on %r", topic)
            return _rejected(topic, f"internal error: {type(exc).__name__}")

    def _check(self, topic: str, payload: bytes, retained: bool) -> dict[str, Any]:
        parts = topic.split("/")
        n = len(self.prefix_parts)
        if len(parts) != n + 2 or parts[:n] != self.prefix_parts:
            return _rejected(topic, "unexpected topic (expected "
                                    f"{'/'.join(self.prefix_parts)}/<vid>/events|state|status)")
        vid, leaf = parts[n], parts[n + 1]
        if not VEHICLE_ID_PATTERN.fullmatch(vid):
            return _rejected(topic, "unexpected topic: not a valid vehicle id")
        if leaf not in ("events", "state", "status", "metrics"):
            return _rejected(topic, f"unexpected topic: unknown leaf {leaf[:40]!r} "
                                    "(expected events, state, status or metrics)")
        if len(payload) > MAX_PAYLOAD_BYTES:
            return _rejected(topic, f"payload too large ({len(payload)} bytes, "
                                    f"limit {MAX_PAYLOAD_BYTES})")
        if leaf == "status":
            return self._status(topic, vid, payload, retained)
        if leaf == "metrics":
            return self._metrics(topic, vid, payload)
        if not payload:
            return _rejected(topic, "empty payload")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _rejected(topic, f"malformed: payload is not UTF-8 (byte {exc.start})")

        try:
            header, claims = self.verifier.verify(text.strip())
        except VerificationError as exc:
            return _rejected(topic, str(exc))

        problem = _claims_problem(claims)
        if problem:
            return _rejected(topic, f"bad claims: {problem}")
        seq = claims["seq"]
        claim_vid = claims["vid"]
        if claim_vid != vid:
            return _rejected(topic, f"vid claim {claim_vid[:64]!r} does not match the topic's "
                                    f"vehicle {vid!r}", seq)
        kid = header.get("kid")
        jwk = self.verifier.jwk(kid) if isinstance(kid, str) else None
        key_vid = jwk.get("vid") if jwk else None
        if key_vid is not None and key_vid != claim_vid:
            return _rejected(topic, f"signing key {kid} belongs to vehicle {str(key_vid)[:64]!r}, "
                                    f"not {claim_vid!r}", seq)
        if self.revocation is not None:
            cert = self.verifier.certificate(kid) if isinstance(kid, str) else None
            why = self.revocation.check(kid if isinstance(kid, str) else None, cert, claim_vid)
            if why is not None:
                return _rejected(topic, why, seq)
        kind = claims.get("kind", _KINDS[leaf])
        if kind != _KINDS[leaf]:
            return _rejected(topic, f"kind claim {str(kind)[:32]!r} does not match topic "
                                    f"{leaf!r}", seq)
        if not self.tracker.accept(vid, seq):
            return _rejected(topic, self.tracker.why_rejected(vid, seq), seq)

        record: dict[str, Any] = {
            "vid": vid,
            "topic": topic,
            "kind": kind,
            "seq": seq,
            "boot": claims["boot"],
            "ts": claims["ts"],
            "signals": claims["signals"],
            "quality": claims.get("quality") or {},
        }
        if "age" in claims:
            record["age"] = claims["age"]
        record.update(kid=kid, alg=header.get("alg"), verified=True, retained=retained)
        return record

    @staticmethod
    def _metrics(topic: str, vid: str, payload: bytes) -> dict[str, Any]:
        return _metrics_record(topic, vid, payload)

    @staticmethod
    def _status(topic: str, vid: str, payload: bytes, retained: bool) -> dict[str, Any]:
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return _rejected(topic, f"malformed: status is not UTF-8 (byte {exc.start})")
        # Status is not signed (it is also the broker-published last will): never verified.
        record: dict[str, Any] = {"vid": vid, "topic": topic, "kind": "status",
                                  "status": text, "verified": False, "retained": retained}
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                state = obj.get("status", obj.get("state"))
                record["status"] = state if isinstance(state, str) else json.dumps(
                    obj, sort_keys=True, separators=(",", ":"))
                record["detail"] = obj
        return record


def _metrics_record(topic: str, vid: str, payload: bytes) -> dict[str, Any]:
    """Health metrics (unsigned JSON): shown, never verified, never trusted for state."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _rejected(topic, "malformed: metrics are not a JSON object")
    if not isinstance(obj, dict):
        return _rejected(topic, "malformed: metrics are not a JSON object")
    return {"vid": vid, "topic": topic, "kind": "metrics", "metrics": obj, "verified": False}


def _claims_problem(claims: dict[str, Any]) -> str | None:
    """What is wrong with the claims' shape, or None."""
    vid = claims.get("vid")
    if not isinstance(vid, str):
        return "'vid' missing or not a string"
    seq = claims.get("seq")
    if not _is_int(seq) or not 1 <= seq <= MAX_SEQ:
        return "'seq' missing or not an integer >= 1"
    for name in ("boot", "ts"):
        value = claims.get(name)
        if not _is_int(value) or value < 0:
            return f"{name!r} missing or not a non-negative integer"
    if not isinstance(claims.get("signals"), dict):
        return "'signals' missing or not an object"
    for name in ("quality", "age"):
        if name in claims and not isinstance(claims[name], dict):
            return f"{name!r} is not an object"
    if "kind" in claims and not isinstance(claims["kind"], str):
        return "'kind' is not a string"
    return None


def _rejected(topic: str, reason: str, seq: int | None = None) -> dict[str, Any]:
    # Reasons can quote attacker-controlled text (a header's alg): keep them one line.
    reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason[:500])
    record: dict[str, Any] = {"topic": topic, "rejected": reason, "verified": False}
    if seq is not None:
        record["seq"] = seq
    return record


# --------------------------------------------------------------------------- connection errors

# --------------------------------------------------------------------------- the watcher


class CloudWatcher:
    """Subscribes to every vehicle's topics and hands each checked message to ``on_message``.

    Runs paho's network loop in its own thread (:meth:`start`, :meth:`stop`); callbacks are
    called from that thread. ``connected`` is set while connected *and subscribed*, so a
    test can publish once it is set. Connection problems go to ``on_problem`` (one line
    each; a problem identical to the previous one is not repeated), successful
    (re)connections to ``on_connect``.
    """

    def __init__(
        self,
        config: CloudConfig,
        on_message: Callable[[dict[str, Any]], None],
        *,
        on_problem: Callable[[str], None] | None = None,
        on_connect: Callable[[str], None] | None = None,
        client_id: str | None = None,
        tracker: SeqTracker | None = None,
    ) -> None:
        self.config = config
        self.on_message = on_message
        self.on_problem = on_problem or (lambda text: log.warning("%s", text))
        self.on_connect = on_connect or (lambda text: log.info("%s", text))
        self.client_id = client_id or f"cloud-watch-{secrets.token_hex(6)}"
        revocation = None
        if config.crl is not None:
            revocation = CrlTrust(config.crl, config.ca, where=f"{config.file}: crl",
                                  ca_where=f"{config.file}: mqtt.ca",
                                  on_problem=self._crl_problem)
        self.checker = MessageChecker(Verifier.from_jwks_file(config.trust),
                                      config.topic_prefix, tracker, revocation=revocation)
        if revocation is not None:
            revocation.problem()  # an expired CRL is reported at start, not at the first message
        self.ssl_context = make_ssl_context(config)
        self.topic_filter = f"{config.topic_prefix}/+/#"
        self.connected = threading.Event()
        self.ever_connected = threading.Event()
        self.last_problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        # Per connection attempt, touched only by the network thread:
        self._log_errors: list[str] = []
        self._connack: str | None = None  # None: none yet; "" success; else refusal reason
        self._disconnect_reason: str | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> "CloudWatcher":
        if self._thread is not None:
            raise RuntimeError("CloudWatcher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cloud-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and end the network thread. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> "CloudWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ network thread

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(self.ssl_context)
        client.connect_timeout = 5.0
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(self.config.host, self.config.port, self.config.keepalive_s,
                             clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
        return client

    def _run(self) -> None:
        try:
            client = self._client = self._new_client()
            try:
                self._session(client)
            finally:
                self._close(client)
        except Exception as exc:  # noqa: BLE001 - report, never die silently
            log.exception("cloud watcher failed")
            self._problem(f"watcher stopped: {type(exc).__name__}: {_short(exc)}")
        finally:
            self.connected.clear()

    def _session(self, client: mqtt.Client) -> None:
        cfg = self.config
        delay = cfg.reconnect_min_s
        while not self._stop.is_set():
            self._log_errors.clear()
            self._connack = None
            self._disconnect_reason = None
            try:
                client.reconnect()
            except (OSError, ssl.CertificateError, ValueError) as exc:
                self._problem(describe_connect_error(exc, cfg.host, cfg.port))
            else:
                while not self._stop.is_set():
                    rc = client.loop(0.1)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                if self._stop.is_set():
                    return
                self._problem(self._diagnose())
                if self._connack == "":
                    delay = cfg.reconnect_min_s  # was connected: retry soon
            # Backoff with jitter; a stop request ends the wait at once.
            self._stop.wait(random.uniform(delay / 2, delay))
            delay = min(cfg.reconnect_max_s, delay * 2)

    def _diagnose(self) -> str:
        """One line for why the last connection ended."""
        where = f"{self.config.host}:{self.config.port}"
        errors = " | ".join(e for e in self._log_errors if not e.startswith("Client is not connected"))
        if self._connack:
            return f"broker {where} refused the connection: {self._connack}"
        alert = describe_tls_alert(errors)
        if alert:
            return alert
        detail = f" ({errors})" if errors else ""
        if self._connack is None:
            # With TLS 1.3 the broker checks our certificate after the handshake; its alert
            # is often lost because it closes the socket while our CONNECT is under way.
            # A handshake capped at TLS 1.2 makes the broker say why, during the handshake.
            probed = self._probe_tls12()
            if probed:
                return probed
            return f"connection to {where} closed before the broker accepted it{detail}"
        reason = self._disconnect_reason or "connection lost"
        return f"connection to {where} lost: {reason}{detail}; reconnecting"

    def _probe_tls12(self) -> str | None:
        try:
            return probe_tls12(make_ssl_context(self.config), self.config.host, self.config.port)
        except KeyFileError:
            return None

    def _close(self, client: mqtt.Client) -> None:
        if client.is_connected():
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0  # we are leaving for good: drop our session
            client.disconnect(properties=props)
            deadline = time.monotonic() + 2.0
            while client.is_connected() and time.monotonic() < deadline:
                if client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        reset = getattr(client, "_reset_sockets", None)  # close the socket pair loop() made
        if callable(reset):
            reset()

    def _crl_problem(self, text: str) -> None:
        # Not through _problem(): a CRL problem is no connection problem (last_problem).
        try:
            self.on_problem(text)
        except Exception:  # noqa: BLE001
            log.exception("on_problem callback failed")

    def _problem(self, text: str) -> None:
        if text != self.last_problem:
            self.last_problem = text
            try:
                self.on_problem(text)
            except Exception:  # noqa: BLE001
                log.exception("on_problem callback failed")

    # ------------------------------------------------------------------ paho callbacks

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and len(self._log_errors) < 10:
            self._log_errors.append(text)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._connack = str(reason)
            return
        self._connack = ""
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe(self.topic_filter, options=options)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list,
                      properties: Any) -> None:
        failures = [str(code) for code in reason_codes if code.is_failure]
        if failures:
            self._problem(f"broker refused the subscription to {self.topic_filter}: "
                          f"{', '.join(failures)}")
            return
        self.last_problem = None
        self.connected.set()
        self.ever_connected.set()
        try:
            self.on_connect(f"connected to {self.config.host}:{self.config.port}, "
                            f"subscribed to {self.topic_filter}")
        except Exception:  # noqa: BLE001
            log.exception("on_connect callback failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()
        self._disconnect_reason = str(reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            record = _rejected(repr(bytes(msg._topic))[2:-1], "topic is not UTF-8")
        else:
            record = self.checker.check(topic, msg.payload, bool(msg.retain))
        try:
            self.on_message(record)
        except Exception:  # noqa: BLE001 - a broken consumer must not kill the network loop
            log.exception("on_message callback failed")


# --------------------------------------------------------------------------- output


def _printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a terminal: control characters escaped, length capped."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return json.dumps(value)


def _ts_text(ts: int) -> str:
    try:
        moment = dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"ts={ts}"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_human(record: dict[str, Any]) -> str:
    """One readable line for a record (rejections start with ``rejected``)."""
    if not record.get("verified"):
        if "rejected" in record:
            seq = f" (seq {record['seq']})" if "seq" in record else ""
            return _printable(f"rejected {record['topic']}: {record['rejected']}{seq}", 400)
        if record.get("kind") == "metrics":
            m = record["metrics"]
            source = m.get("source") if isinstance(m.get("source"), dict) else {}
            outbox = m.get("outbox") if isinstance(m.get("outbox"), dict) else {}
            return _printable(f"{record['vid']} metrics {m.get('frames_per_s')} frames/s, bus "
                              f"{source.get('state', '?')}, {outbox.get('queued', '?')} queued",
                              300)
        retained = " (retained)" if record.get("retained") else ""
        return f"{record['vid']} status {_printable(str(record['status']), 100)}{retained}"
    quality = record.get("quality") or {}
    shown = [f"{path}={_value_text(value) if path not in quality else quality[path]}"
             for path, value in record["signals"].items()]
    parts = [
        f"{record['vid']} {record['kind']} seq={record['seq']} boot={record['boot']} "
        f"{_ts_text(record['ts'])}",
    ]
    parts.append(" ".join(shown) if shown else "(no signals)")
    if record.get("retained"):
        parts.append("(retained)")
    return _printable("  ".join(parts), 4000)


def watch_main(
    config_path: str | Path,
    json_lines: bool = False,
    count: int | None = None,
    duration: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``car-agent watch``: print every message vehicles publish, verified.

    Verified messages and status go to ``out`` (JSON lines with ``json_lines``); in human
    mode rejections go to ``err``. Connection problems are one line each on ``err``.
    Ends after ``count`` verified messages, after ``duration`` seconds, or on
    SIGINT/SIGTERM. Returns 0, or 1 if no connection was ever made.

    :raises UserError: bad config, key set or certificate files (one line).
    """
    if count is not None and count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if duration is not None and not duration > 0:
        raise UserError(f"--duration must be a positive number of seconds, got {duration}")
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    config = load_cloud_config(config_path)
    done = threading.Event()
    lock = threading.Lock()
    verified = 0

    def emit(stream: TextIO, line: str) -> None:
        with lock:
            if done.is_set() and stream is out:
                return
            try:
                try:
                    stream.write(line + "\n")
                except UnicodeEncodeError:  # e.g. an ASCII-only terminal
                    stream.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError):  # reader went away / stream closed
                done.set()

    def on_message(record: dict[str, Any]) -> None:
        nonlocal verified
        if done.is_set():
            return
        if json_lines:
            emit(out, json.dumps(record, separators=(",", ":")))
        elif "rejected" in record:
            emit(err, format_human(record))
        else:
            emit(out, format_human(record))
        if record.get("verified"):
            with lock:
                verified += 1
                if count is not None and verified >= count:
                    done.set()

    watcher = CloudWatcher(
        config,
        on_message,
        on_problem=lambda text: emit(err, f"car-agent watch: {text}"),
        on_connect=lambda text: emit(err, f"car-agent watch: {text}"),
    )

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: done.set())
    try:
        watcher.start()
        deadline = None if duration is None else time.monotonic() + duration
        while not done.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            # Short waits so signals are handled promptly on every platform.
            done.wait(0.2 if remaining is None else min(0.2, remaining))
    finally:
        watcher.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not watcher.ever_connected.is_set():
        if watcher.last_problem is None:
            emit(err, f"car-agent watch: no connection to {config.host}:{config.port}"
                      + (f" within {duration:g} s" if duration is not None else ""))
        return 1
    return 0
