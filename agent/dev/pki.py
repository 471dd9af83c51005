"""Development PKI: a throw-away CA plus broker, vehicle and cloud certificates.

DEVELOPMENT ONLY. Private keys are written unencrypted next to the CA key, which a
production PKI must never do; this exists so the agent, a local MQTT broker and the tests
can run mutual TLS and JWS signing end to end without external tooling.

Layout of the directory (created with mode 0700)::

    ca.crt ca.key                 ECDSA P-256 CA
    broker.crt broker.key         TLS server: localhost, 127.0.0.1, ::1
    cloud.crt cloud.key           TLS client "cloud"
    <VIN>.crt <VIN>.key           TLS client per vehicle
    <VIN>.signing.key             per-vehicle JWS signing key (separate from the TLS key)
    <VIN>.signing.crt             its certificate (CN VIN, digitalSignature, EKU documentSigning)
    jwks.json                     public signing keys of all vehicles, each with "vid" and
                                  "x5c" (the signing certificate)
    crl.pem                       CRL of the CA (only after init_crl() or revoke())

Private keys are PKCS#8 PEM, created with mode 0600 from the start (never chmod-ed
after the secret is on disk); certificates are 0644. Running again keeps every existing
file and only adds what is missing.

Revocation (:func:`revoke`) lists a vehicle's TLS *and* signing certificates in ``crl.pem``:
mosquitto refuses the TLS certificate (``crlfile``, re-read on SIGHUP) and the cloud
verifier (``crl:`` in its config) refuses messages signed with the key.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import vehicle_id_problem
from agent.errors import KeyFileError, UserError
from agent.uplink.keyfiles import read_key_material
from agent.uplink.signing import (
    DOCUMENT_SIGNING,
    load_private_key,
    public_jwk,
    replace_public_file,
    write_jwks,
)

__all__ = [
    "CRL_DAYS",
    "DOCUMENT_SIGNING",
    "REVOCATION_REASONS",
    "init_ca",
    "init_crl",
    "init_pki",
    "issue_client_cert",
    "revoke",
]

DEFAULT_CA_NAME = "car-agent dev CA"
CA_DAYS = 3650
# Back-date notBefore a little: a peer whose clock lags ours must still accept the cert.
_CLOCK_SKEW = dt.timedelta(minutes=5)
# Names become file names, so keep them to a safe alphabet.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_RESERVED = frozenset({"ca", "broker", "cloud", "jwks"})
_SIGNING_SUFFIX = ".signing.key"
_SIGNING_CERT_SUFFIX = ".signing.crt"
CRL_FILE = "crl.pem"
#: Default validity of a CRL (its next update). Once past it, mosquitto refuses every
#: client and the cloud verifier every signed message: re-run revoke()/init_crl() in time.
CRL_DAYS = 30
# id-kp-documentSigning (RFC 9336) is the EKU of the vehicles' signing certificates: an EKU
# that is present but names neither clientAuth, serverAuth nor anyExtendedKeyUsage makes
# OpenSSL (so mosquitto) refuse the certificate for TLS. With no EKU at all it would be
# accepted as a TLS client certificate (measured, see notes/mqtt-mtls.md), so a leaked
# signing key plus its public certificate could log in to the broker as the vehicle.
# (The OID itself lives in agent.signing, which the verifier shares.)


# --------------------------------------------------------------------------- helpers


def _utc(value: dt.datetime | None) -> dt.datetime:
    """Timezone-aware UTC; naive datetimes are taken to be UTC already."""
    if value is None:
        return dt.datetime.now(dt.timezone.utc)
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UserError(
            f"{what} {name!r}: use 1-64 letters, digits, '-' or '_' (it becomes a file name)"
        )


def _check_vehicle(vin: object) -> None:
    problem = vehicle_id_problem(vin)
    if problem:
        raise UserError(f"--vehicle: {problem}")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte; refuse to overwrite.

    ``O_EXCL`` means a key is never replaced behind the user's back, and creating the
    file with its final mode means a secret is never readable by others, not even
    briefly.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UserError(f"{path}: already exists; not overwriting") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot create: {exc.strerror or exc}") from None
    try:
        if mode & 0o044:
            # Public files: make the mode exact regardless of the umask.
            os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_key(path: Path, key: Any) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_new(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_cert(path: Path) -> x509.Certificate:
    data = read_key_material(path, "a PEM certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM certificate") from None


def _ensure_dir(directory: Path) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a directory")
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o700)  # empty dir, so no race; undoes an odd umask
    return directory


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------- CA


class _CA:
    """A loaded CA: certificate and key, ready to issue."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key


def _load_ca(directory: Path) -> _CA:
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    key = load_private_key(key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{key_path}: CA key must be EC P-256")
    cert = _load_cert(cert_path)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise KeyFileError(f"{cert_path}: does not match the key in {key_path}")
    return _CA(cert, key)


def init_ca(
    directory: Path | str,
    name: str = DEFAULT_CA_NAME,
    *,
    days: int = CA_DAYS,
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Create a self-signed P-256 CA in ``directory`` unless one is already there.

    DEVELOPMENT ONLY. An existing ``ca.crt``/``ca.key`` pair is kept (re-issuing the CA
    would invalidate every certificate already handed out). Tests use this to make a
    second, foreign CA.

    :returns: ``(ca.crt path, ca.key path)``.
    :raises UserError: if only one of the two files exists, or they do not match.
    """
    directory = _ensure_dir(Path(directory))
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        _load_ca(directory)  # validates the pair
        return cert_path, key_path
    if have_cert != have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise UserError(f"{present}: exists but {missing.name} is missing; restore it or remove both")
    start = _utc(now)
    key = _new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


# --------------------------------------------------------------------------- leaves


def _issue(
    ca: _CA,
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
    signing: bool = False,
) -> x509.Certificate:
    """A leaf certificate: TLS server, TLS client, or (``signing``) JWS signing."""
    if signing:
        eku = DOCUMENT_SIGNING  # not usable for TLS: see DOCUMENT_SIGNING
    else:
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(cn),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(ca.key, hashes.SHA256())


def _validity(
    ca: _CA,
    days: int,
    now: dt.datetime | None,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> tuple[dt.datetime, dt.datetime]:
    """Resolve the validity window; an explicit bound wins, ``days`` fills the other."""
    span = dt.timedelta(days=days)
    if not_before is None and not_after is None:
        start = _utc(now) - _CLOCK_SKEW
        # By default never outlive the CA: such a cert would stop working early anyway.
        return start, min(start + _CLOCK_SKEW + span, ca.cert.not_valid_after_utc)
    if not_before is None:
        end = _utc(not_after)
        return end - span, end
    start = _utc(not_before)
    end = _utc(not_after) if not_after is not None else start + span
    if end <= start:
        raise UserError(f"not_after ({end.isoformat()}) must be after not_before ({start.isoformat()})")
    return start, end


def _ensure_leaf(
    directory: Path,
    ca: _CA,
    stem: str,
    cn: str,
    *,
    server: bool,
    days: int,
    now: dt.datetime | None,
    created: list[Path],
) -> None:
    """Make ``<stem>.crt``/``<stem>.key`` (subject CN ``cn``) exist; keep what is there.

    If only the key exists (e.g. an earlier run was interrupted) the certificate is
    issued for that key. A certificate without its key cannot be repaired: error.
    """
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        return
    if have_cert:
        raise UserError(f"{cert_path}: exists but {key_path.name} is missing; remove the certificate")
    if have_key:
        key = load_private_key(key_path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyFileError(f"{key_path}: expected an EC P-256 key")
    else:
        key = _new_key()
        _write_key(key_path, key)
        created.append(key_path)
    start, end = _validity(ca, days, now, None, None)
    _write_cert(cert_path, _issue(ca, cn, key, server=server, not_before=start, not_after=end))
    created.append(cert_path)


def issue_client_cert(
    directory: Path | str,
    cn: str,
    *,
    ca_dir: Path | str | None = None,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a TLS client certificate ``<cn>.crt`` with a new key ``<cn>.key``.

    DEVELOPMENT ONLY. The CA is read from ``ca_dir`` (default: ``directory``). Explicit
    ``not_before``/``not_after`` are honoured as given, even in the past, so tests can
    produce an expired certificate. Existing files are never overwritten.

    :returns: ``(cert path, key path)``.
    """
    _check_name(cn, "client name")
    directory = _ensure_dir(Path(directory))
    ca = _load_ca(Path(ca_dir) if ca_dir is not None else directory)
    cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise UserError(f"{path}: already exists; not overwriting")
    start, end = _validity(ca, days, now, not_before, not_after)
    key = _new_key()
    cert = _issue(ca, cn, key, server=False, not_before=start, not_after=end)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


# --------------------------------------------------------------------------- whole PKI


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _ensure_signing_cert(
    directory: Path,
    ca: _CA,
    vin: str,
    *,
    days: int,
    now: dt.datetime | None,
    created: list[Path],
) -> None:
    """Issue ``<VIN>.signing.crt`` for an existing ``<VIN>.signing.key`` if it is missing."""
    cert_path = directory / f"{vin}{_SIGNING_CERT_SUFFIX}"
    if cert_path.exists():
        return
    key_path = directory / f"{vin}{_SIGNING_SUFFIX}"
    key = load_private_key(key_path)  # P-256 or Ed25519: both can be certified
    start, end = _validity(ca, days, now, None, None)
    cert = _issue(ca, vin, key, server=False, signing=True,  # type: ignore[arg-type]
                  not_before=start, not_after=end)
    _write_cert(cert_path, cert)
    created.append(cert_path)


def _write_vehicle_jwks(directory: Path) -> list[str]:
    """(Re)write jwks.json from every ``<VIN>.signing.key`` present in ``directory``.

    Each key carries ``vid`` and, when ``<VIN>.signing.crt`` exists, ``x5c`` (RFC 7517
    section 4.7: standard base64 of the DER certificate), which lets a verifier check the
    key against the CA and its CRL.
    """
    keys: list[dict[str, Any]] = []
    vins: list[str] = []
    for path in sorted(directory.glob(f"*{_SIGNING_SUFFIX}")):
        vin = path.name[: -len(_SIGNING_SUFFIX)]
        public_key = load_private_key(path).public_key()
        jwk: dict[str, Any] = public_jwk(public_key)
        jwk["vid"] = vin
        cert_path = directory / f"{vin}{_SIGNING_CERT_SUFFIX}"
        if cert_path.exists():
            cert = _load_cert(cert_path)
            if _spki(cert.public_key()) != _spki(public_key):
                raise KeyFileError(f"{cert_path}: does not match the key in {path.name}; "
                                   "remove the certificate and run again")
            der = cert.public_bytes(serialization.Encoding.DER)
            jwk["x5c"] = [base64.b64encode(der).decode("ascii")]
        keys.append(jwk)
        vins.append(vin)
    write_jwks(directory / "jwks.json", keys)
    return vins


def init_pki(
    directory: Path | str,
    vehicles: list[str],
    days: int = 365,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Create (or complete) the development PKI in ``directory``.

    DEVELOPMENT ONLY. Idempotent: an existing CA and existing files are kept, so adding
    a vehicle does not invalidate the others. Every signing key in the directory that has
    no ``<VIN>.signing.crt`` yet gets one (``vehicles_added`` does not count that).
    ``jwks.json`` is always rewritten to list every vehicle whose signing key is in the
    directory, with ``x5c`` where its certificate exists.

    :returns: ``{"directory": Path, "ca_created": bool, "created": [Path, ...],
        "vehicles_added": [VIN, ...], "jwks": Path, "jwks_vehicles": [VIN, ...]}``.
    :raises UserError: bad vehicle id, half-present key/cert pairs, unreadable files.
    """
    vins = list(dict.fromkeys(vehicles))  # de-duplicate, keep order
    for vin in vins:
        _check_vehicle(vin)
        if vin.lower() in _RESERVED:
            raise UserError(f"vehicle id {vin!r}: reserved name")
    directory = _ensure_dir(Path(directory))
    created: list[Path] = []

    ca_existed = (directory / "ca.key").exists() and (directory / "ca.crt").exists()
    cert_path, key_path = init_ca(directory, now=now)
    if not ca_existed:
        created += [key_path, cert_path]
    ca = _load_ca(directory)

    common: dict[str, Any] = {"days": days, "now": now, "created": created}
    _ensure_leaf(directory, ca, "broker", "localhost", server=True, **common)
    _ensure_leaf(directory, ca, "cloud", "cloud", server=False, **common)

    added: list[str] = []
    for vin in vins:
        before = len(created)
        _ensure_leaf(directory, ca, vin, vin, server=False, **common)
        signing_path = directory / f"{vin}{_SIGNING_SUFFIX}"
        if not signing_path.exists():
            _write_key(signing_path, _new_key())
            created.append(signing_path)
        if len(created) > before:
            added.append(vin)

    # Every signing key in the directory gets its certificate, also those of vehicles not
    # named in this run and of PKIs made before signing certificates existed.
    for path in sorted(directory.glob(f"*{_SIGNING_SUFFIX}")):
        _ensure_signing_cert(directory, ca, path.name[: -len(_SIGNING_SUFFIX)], **common)

    jwks_path = directory / "jwks.json"
    jwks_existed = jwks_path.exists()
    jwks_vins = _write_vehicle_jwks(directory)
    if not jwks_existed:
        created.append(jwks_path)
    return {
        "directory": directory,
        "ca_created": not ca_existed,
        "created": created,
        "vehicles_added": added,
        "jwks": jwks_path,
        "jwks_vehicles": jwks_vins,
    }


# --------------------------------------------------------------------------- revocation

#: Reasons ``revoke`` accepts (RFC 5280 CRLReason, kebab-case); ``remove-from-crl`` is
#: left out: it only exists in delta CRLs.
REVOCATION_REASONS = tuple(
    flag.name.replace("_", "-") for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
)


def _reason_flag(reason: x509.ReasonFlags | str) -> x509.ReasonFlags:
    if isinstance(reason, x509.ReasonFlags):
        flag = reason
    else:
        wanted = str(reason).replace("-", "_").lower()
        matches = [f for f in x509.ReasonFlags if wanted in (f.name, f.value.lower())]
        if not matches:
            raise UserError(f"revocation reason {reason!r}: expected one of "
                            f"{', '.join(REVOCATION_REASONS)}")
        flag = matches[0]
    if flag is x509.ReasonFlags.remove_from_crl:
        raise UserError("revocation reason remove-from-crl is only for delta CRLs")
    return flag


def _read_crl(directory: Path, ca: _CA) -> tuple[list[x509.RevokedCertificate], int]:
    """The entries and CRL number of ``crl.pem`` (none and 0 if there is no such file)."""
    path = directory / CRL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data
               else x509.load_der_x509_crl(data))
    except ValueError:
        raise UserError(f"{path}: not a CRL (PEM or DER); move it away to start a new one") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
        raise UserError(f"{path}: not signed by the CA in {directory / 'ca.crt'}; "
                        "move it away to start a new one")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return list(crl), number


def _write_crl(
    directory: Path,
    ca: _CA,
    entries: list[x509.RevokedCertificate],
    number: int,
    *,
    days: int,
    now: dt.datetime | None,
) -> Path:
    if days < 1:
        raise UserError(f"CRL validity must be at least 1 day, got {days}")
    start = _utc(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        # Back-dated like the certificates: a peer whose clock lags ours would otherwise
        # take the CRL as "not yet valid".
        .last_update(start - _CLOCK_SKEW)
        .next_update(start + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    path = directory / CRL_FILE
    replace_public_file(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def init_crl(
    directory: Path | str,
    *,
    days: int = CRL_DAYS,
    now: dt.datetime | None = None,
) -> Path:
    """Write ``crl.pem``: an empty CRL of the dev CA, or renew the existing one.

    DEVELOPMENT ONLY. mosquitto refuses to start when ``crlfile`` names a missing file,
    so a broker configured for revocation needs this before anything is revoked. An
    existing ``crl.pem`` keeps every entry; it is re-signed with a new CRL number and a
    next update ``days`` from ``now`` (use this to renew a CRL before it expires: an
    expired CRL locks every client out of the broker).

    :returns: the path of ``crl.pem``.
    :raises UserError: no CA in ``directory``, or a ``crl.pem`` that is not the CA's.
    """
    directory = Path(directory)
    ca = _load_ca(directory)
    entries, number = _read_crl(directory, ca)
    return _write_crl(directory, ca, entries, number + 1, days=days, now=now)


def revoke(
    directory: Path | str,
    vehicle: str,
    reason: x509.ReasonFlags | str = x509.ReasonFlags.unspecified,
    *,
    days: int = CRL_DAYS,
    now: dt.datetime | None = None,
) -> Path:
    """Revoke a vehicle: add its TLS and signing certificates to ``crl.pem``.

    DEVELOPMENT ONLY. ``crl.pem`` is created if missing; entries already there are kept
    (revoking again changes nothing but the CRL's number and next update). The CRL is
    signed by the dev CA, next update ``days`` from ``now``. mosquitto picks it up on
    SIGHUP (``crlfile``), the cloud verifier (``crl:``) when the file changes.

    :param reason: an :class:`x509.ReasonFlags` or its name (``key-compromise``, ...);
        ``unspecified`` writes no reason code (RFC 5280 section 5.3.1).
    :returns: the path of ``crl.pem``.
    :raises UserError: unknown vehicle, a certificate missing or not from this CA.
    """
    _check_vehicle(vehicle)
    flag = _reason_flag(reason)
    directory = Path(directory)
    ca = _load_ca(directory)
    tls_path = directory / f"{vehicle}.crt"
    signing_path = directory / f"{vehicle}{_SIGNING_CERT_SUFFIX}"
    if not tls_path.exists():
        raise UserError(f"{tls_path}: not found; no vehicle {vehicle!r} in {directory}")
    if not signing_path.exists():
        raise UserError(f"{signing_path}: not found; run `car-agent pki init {directory}` "
                        "(it issues missing signing certificates), then revoke again")
    certs = [_load_cert(tls_path), _load_cert(signing_path)]
    for path, cert in zip((tls_path, signing_path), certs):
        try:
            cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise UserError(f"{path}: not issued by the CA in {directory / 'ca.crt'}") from None
    entries, number = _read_crl(directory, ca)
    listed = {entry.serial_number for entry in entries}
    when = _utc(now)
    for cert in certs:
        if cert.serial_number in listed:
            continue
        entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(when)
        if flag is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        entries.append(entry.build())
        listed.add(cert.serial_number)
    return _write_crl(directory, ca, entries, number + 1, days=days, now=now)
