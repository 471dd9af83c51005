"""Revocation: trust a vehicle's signing key only through a valid, unrevoked certificate.

With ``crl`` in the cloud config, a signing key is trusted only through its certificate (the
JWK's ``x5c``): issued by the CA in ``mqtt.ca`` (assumption: the one CA that issues the
broker's, the vehicles' TLS and the vehicles' signing certificates and signs the CRL, as the
development PKI does), valid now, CN equal to the ``vid`` claim, and not revoked.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError, KeyFileError
from agent.uplink.keyfiles import read_key_material
from agent.uplink.signing import DOCUMENT_SIGNING

log = logging.getLogger("car_agent.cloud")
_SHA256 = hashes.SHA256()


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


