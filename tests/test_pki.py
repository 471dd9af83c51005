"""Tests for agent.pki, the development PKI.

The openssl CLI is used as an independent judge of the certificates (purpose checks,
expiry, foreign CA), skipped only where openssl is missing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import KeyFileError, UserError
from agent.dev.pki import init_ca, init_pki, issue_client_cert
from agent.uplink.signing import Signer, Verifier, load_private_key

VINS = ["VIN1", "WVWZZZ1JZ3W386752"]
KEY_FILES = ["ca.key", "broker.key", "cloud.key"] + [f"{v}.key" for v in VINS] + [f"{v}.signing.key" for v in VINS]
CERT_FILES = ["ca.crt", "broker.crt", "cloud.crt"] + [f"{v}.crt" for v in VINS] + [f"{v}.signing.crt" for v in VINS]
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PKI shared by the read-only tests (key generation is the slow part)."""
    directory = tmp_path_factory.mktemp("pki") / "dev"  # does not exist yet
    result = init_pki(directory, VINS)
    assert result["ca_created"] is True
    assert result["vehicles_added"] == VINS
    assert set(result["created"]) == {directory / n for n in KEY_FILES + CERT_FILES + ["jwks.json"]}
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[return-value]


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _openssl_verify(ca: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)],
        capture_output=True,
        text=True,
        timeout=30,
    )


# --------------------------------------------------------------------------- files


def test_files_exist_with_safe_modes(pki: Path) -> None:
    assert pki.stat().st_mode & 0o777 == 0o700
    for name in KEY_FILES:
        assert (pki / name).stat().st_mode & 0o777 == 0o600, name
    for name in CERT_FILES + ["jwks.json"]:
        assert (pki / name).stat().st_mode & 0o777 == 0o644, name
    assert sorted(p.name for p in pki.iterdir()) == sorted(KEY_FILES + CERT_FILES + ["jwks.json"])


def test_private_keys_are_unencrypted_pkcs8_p256(pki: Path) -> None:
    for name in KEY_FILES:
        pem = (pki / name).read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"), name
        key = load_private_key(pki / name)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_key_modes_do_not_depend_on_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        init_pki(tmp_path / "p", ["VIN1"])
    finally:
        os.umask(old)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "p" / "VIN1.signing.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "p" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "p" / "ca.crt").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- certificates


def test_ca_certificate(pki: Path) -> None:
    ca = _cert(pki / "ca.crt")
    assert _cn(ca) == "car-agent dev CA"
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())  # type: ignore[arg-type]
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)


def test_broker_certificate(pki: Path) -> None:
    ca, broker = _cert(pki / "ca.crt"), _cert(pki / "broker.crt")
    assert _cn(broker) == "localhost"
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert _eku(broker) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = broker.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = broker.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    broker.verify_directly_issued_by(ca)


@pytest.mark.parametrize("name", VINS + ["cloud"])
def test_client_certificates(pki: Path, name: str) -> None:
    ca, cert = _cert(pki / "ca.crt"), _cert(pki / f"{name}.crt")
    assert _cn(cert) == name
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(ca)
    # The certificate belongs to the TLS key next to it.
    key = load_private_key(pki / f"{name}.key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert dt.timedelta(days=364) < cert.not_valid_after_utc - now <= dt.timedelta(days=365)


def test_now_and_days_set_validity(tmp_path: Path) -> None:
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    init_pki(tmp_path, ["VIN1"], days=30, now=now)
    cert = _cert(tmp_path / "VIN1.crt")
    assert cert.not_valid_before_utc <= now <= cert.not_valid_before_utc + dt.timedelta(minutes=10)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=30)


# --------------------------------------------------------------------------- JWKS


def test_jwks_has_a_verifying_key_per_vehicle(pki: Path) -> None:
    jwks = json.loads((pki / "jwks.json").read_text())
    assert sorted(k["vid"] for k in jwks["keys"]) == sorted(VINS)
    verifier = Verifier.from_jwks_file(pki / "jwks.json")
    for vin in VINS:
        signer = Signer.from_file(pki / f"{vin}.signing.key")
        assert signer.alg == "ES256"
        header, claims = verifier.verify(signer.sign({"vid": vin, "v": 1}))
        assert claims == {"vid": vin, "v": 1}
        assert verifier.jwk(header["kid"])["vid"] == vin  # type: ignore[index]
        # The signing key is not the TLS key.
        tls = Signer.from_file(pki / f"{vin}.key")
        assert tls.kid != signer.kid
        assert tls.kid not in verifier.kids


# --------------------------------------------------------------------------- re-run


def test_rerun_keeps_ca_and_files_and_adds_vehicles(tmp_path: Path) -> None:
    first = init_pki(tmp_path, ["VIN1"])
    ca_fp = _cert(tmp_path / "ca.crt").fingerprint(hashes.SHA256())
    ca_key = (tmp_path / "ca.key").read_bytes()
    vin1 = {n: (tmp_path / n).read_bytes() for n in ("VIN1.crt", "VIN1.key", "VIN1.signing.key", "broker.crt")}

    second = init_pki(tmp_path, ["VIN1", "VIN2", "VIN2"])
    assert first["ca_created"] is True and second["ca_created"] is False
    assert _cert(tmp_path / "ca.crt").fingerprint(hashes.SHA256()) == ca_fp
    assert (tmp_path / "ca.key").read_bytes() == ca_key
    assert {n: (tmp_path / n).read_bytes() for n in vin1} == vin1
    assert second["vehicles_added"] == ["VIN2"]
    assert set(second["created"]) == {tmp_path / n for n in ("VIN2.crt", "VIN2.key", "VIN2.signing.key", "VIN2.signing.crt")}
    assert second["jwks_vehicles"] == ["VIN1", "VIN2"]
    _cert(tmp_path / "VIN2.crt").verify_directly_issued_by(_cert(tmp_path / "ca.crt"))

    # A third run naming no vehicles still lists every signing key in the directory.
    third = init_pki(tmp_path, [])
    assert third["created"] == [] and third["vehicles_added"] == []
    assert sorted(k["vid"] for k in json.loads((tmp_path / "jwks.json").read_text())["keys"]) == ["VIN1", "VIN2"]


def test_rerun_issues_missing_cert_for_existing_key(tmp_path: Path) -> None:
    init_pki(tmp_path, ["VIN1"])
    key = (tmp_path / "VIN1.key").read_bytes()
    (tmp_path / "VIN1.crt").unlink()
    result = init_pki(tmp_path, ["VIN1"])
    assert result["created"] == [tmp_path / "VIN1.crt"]
    assert (tmp_path / "VIN1.key").read_bytes() == key


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("vin", ["../evil", "", "a/b", "ca", "broker", "x" * 65, ".hidden"])
def test_bad_vehicle_ids_are_user_errors(tmp_path: Path, vin: str) -> None:
    with pytest.raises(UserError, match="vehicle id"):
        init_pki(tmp_path / "p", [vin])
    assert not (tmp_path / "p").exists()


def test_half_present_ca_is_a_user_error(tmp_path: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(UserError, match="ca.crt is missing"):
        init_pki(tmp_path, ["VIN1"])


def test_garbage_ca_key_is_a_key_file_error(tmp_path: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / "ca.key").write_text("garbage")
    with pytest.raises(KeyFileError, match="ca.key: not a PEM file"):
        init_pki(tmp_path, ["VIN1"])


def test_mismatched_ca_pair_is_a_key_file_error(tmp_path: Path) -> None:
    init_ca(tmp_path / "a")
    init_ca(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "ca.crt", tmp_path / "a" / "ca.crt")
    with pytest.raises(KeyFileError, match="does not match"):
        init_pki(tmp_path / "a", ["VIN1"])


def test_target_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        init_pki(tmp_path / "f", ["VIN1"])


def test_issue_client_cert_refuses_to_overwrite(pki: Path, tmp_path: Path) -> None:
    issue_client_cert(tmp_path, "extra", ca_dir=pki)
    with pytest.raises(UserError, match="already exists"):
        issue_client_cert(tmp_path, "extra", ca_dir=pki)


def test_issue_client_cert_rejects_inverted_validity(pki: Path, tmp_path: Path) -> None:
    t = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    with pytest.raises(UserError, match="must be after"):
        issue_client_cert(tmp_path, "x", ca_dir=pki, not_before=t, not_after=t - dt.timedelta(days=1))


# --------------------------------------------------------------------------- openssl


@needs_openssl
def test_openssl_accepts_purposes(pki: Path) -> None:
    ca = pki / "ca.crt"
    for name in VINS + ["cloud"]:
        result = _openssl_verify(ca, pki / f"{name}.crt", "sslclient")
        assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr
    result = _openssl_verify(ca, pki / "broker.crt", "sslserver")
    assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr


@needs_openssl
def test_openssl_rejects_wrong_purposes(pki: Path) -> None:
    ca = pki / "ca.crt"
    for cert, purpose in [(f"{VINS[0]}.crt", "sslserver"), ("broker.crt", "sslclient")]:
        result = _openssl_verify(ca, pki / cert, purpose)
        assert result.returncode != 0
        assert "unsuitable certificate purpose" in result.stdout + result.stderr


@needs_openssl
def test_openssl_rejects_expired_client_cert(pki: Path, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    cert_path, key_path = issue_client_cert(
        tmp_path, "expired", ca_dir=pki, not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
    )
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert _cert(cert_path).not_valid_after_utc < now
    result = _openssl_verify(pki / "ca.crt", cert_path, "sslclient")
    assert result.returncode != 0
    assert "certificate has expired" in result.stdout + result.stderr


@needs_openssl
def test_openssl_rejects_cert_from_foreign_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, "some other CA")
    cert_path, _ = issue_client_cert(other, "VIN1")
    assert _openssl_verify(other / "ca.crt", cert_path, "sslclient").returncode == 0
    result = _openssl_verify(pki / "ca.crt", cert_path, "sslclient")
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr
