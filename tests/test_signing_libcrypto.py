"""Signing through libcrypto (agent.uplink.libcrypto), the daemon's signer.

Every figure is checked against the cryptography package, which signed before and still
verifies: the same keys give the same JWK and kid, libcrypto's tokens verify with our verifier
and with jwcrypto, Ed25519 tokens are byte-identical, and bad keys give the same one-line
errors. The fallback to cryptography is forced with the module's switch, not by mocking.
"""

from __future__ import annotations

import ctypes.util
import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

from agent.errors import KeyFileError
from agent.uplink import libcrypto
from agent.uplink.jws import Signer, b64url_decode
from agent.uplink.keyfiles import certificate_validity
from agent.uplink.signing import VerificationError, Verifier, load_private_key

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = {"vid": "VIN1", "seq": 7, "ts": 1767225600125, "signals": {"Vehicle.Speed": 42.5},
          "note": "grüße"}
UTC = dt.timezone.utc

EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
KEYS = {"ES256": EC_KEY, "EdDSA": ED_KEY}

def _pem(key: object, fmt=serialization.PrivateFormat.PKCS8,
         encryption=serialization.NoEncryption()) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)  # type: ignore[attr-defined]


@pytest.fixture(params=["ES256", "EdDSA"])
def alg_and_key(request, tmp_path: Path):
    path = tmp_path / f"{request.param}.key"
    path.write_bytes(_pem(KEYS[request.param]))
    return request.param, KEYS[request.param], path


def _jwcrypto_verify(token: str, jwk: dict) -> dict:
    obj = jw_jws.JWS()
    obj.deserialize(token)
    obj.verify(jw_jwk.JWK(**jwk))   # raises on failure
    return json.loads(obj.payload)


# --------------------------------------------------------------------------- signing


def test_from_file_signs_through_libcrypto_and_both_verifiers_accept(alg_and_key) -> None:
    alg, key, path = alg_and_key
    signer = Signer.from_file(path)
    assert signer.backend == "libcrypto" and signer.alg == alg
    token = signer.sign(CLAIMS)
    verifier = Verifier({"keys": [{**signer.public_jwk, "vid": "VIN1"}]})
    header, claims = verifier.verify(token)
    assert header == {"alg": alg, "kid": signer.kid, "typ": "JWT"}
    assert claims == CLAIMS
    assert _jwcrypto_verify(token, signer.public_jwk) == CLAIMS


def test_jwk_and_kid_equal_cryptographys(alg_and_key) -> None:
    _, key, path = alg_and_key
    ours, theirs = Signer.from_file(path), Signer(key)
    assert theirs.backend == "cryptography"
    assert ours.public_jwk == theirs.public_jwk
    assert ours.kid == theirs.kid == jw_jwk.JWK(**ours.public_jwk).thumbprint()


def test_ed25519_tokens_are_byte_identical_to_cryptographys(tmp_path: Path) -> None:
    path = tmp_path / "ed.key"
    path.write_bytes(_pem(ED_KEY))
    ours, theirs = Signer.from_file(path), Signer(ED_KEY)
    for claims in (CLAIMS, {}, {"i": 1, "x": "y" * 1000}):
        assert ours.sign(claims) == theirs.sign(claims)


def test_tampered_payload_fails(alg_and_key) -> None:
    _, _, path = alg_and_key
    signer = Signer.from_file(path)
    header, _, signature = signer.sign(CLAIMS).split(".")
    forged = signer.sign({**CLAIMS, "seq": 8}).split(".")[1]
    token = f"{header}.{forged}.{signature}"
    verifier = Verifier({"keys": [{**signer.public_jwk, "vid": "VIN1"}]})
    with pytest.raises(VerificationError) as info:
        verifier.verify(token)
    assert info.value.reason == "bad signature"
    with pytest.raises(jw_jws.InvalidJWSSignature):
        _jwcrypto_verify(token, signer.public_jwk)


def test_es256_r_and_s_with_leading_zero_bytes_stay_32_bytes_each(tmp_path: Path) -> None:
    """OpenSSL signs in DER, where an r or s below 2**248 is shorter than 32 bytes (about
    1 signature in 128 each): the JWS form must left-pad it."""
    path = tmp_path / "ec.key"
    path.write_bytes(_pem(EC_KEY, serialization.PrivateFormat.TraditionalOpenSSL))
    signer = Signer.from_file(path)
    verifier = Verifier({"keys": [{**signer.public_jwk, "vid": "VIN1"}]})
    short = None
    for i in range(5000):
        token = signer.sign({"i": i})
        signature = b64url_decode(token.split(".")[2])
        assert len(signature) == 64
        if signature[0] == 0 or signature[32] == 0:
            short = token
            break
    assert short is not None, "no zero-prefixed r or s in 5000 signatures"
    assert verifier.verify(short)[1] == {"i": i}
    assert _jwcrypto_verify(short, signer.public_jwk) == {"i": i}


def test_der_signature_conversion_known_values() -> None:
    r, s = bytes(range(1, 33)), b"\x80" + bytes(31)    # s needs DER's leading 0x00
    der = bytes([0x30, 2 + 32 + 2 + 33, 0x02, 32]) + r + bytes([0x02, 33, 0]) + s
    assert libcrypto._der_to_raw(der) == r + s
    small = bytes([0x30, 6, 0x02, 1, 5, 0x02, 1, 7])   # r = 5, s = 7
    assert libcrypto._der_to_raw(small) == bytes(31) + b"\x05" + bytes(31) + b"\x07"
    for bad in (small[:-1], b"\x31" + small[1:], small + b"\0", bytes(8)):
        with pytest.raises(ValueError):
            libcrypto._der_to_raw(bad)


# --------------------------------------------------------------------------- key errors


def _encrypted_traditional() -> bytes:
    return _pem(EC_KEY, serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.BestAvailableEncryption(b"pw"))


BAD_KEYS = {
    "rsa": (lambda: _pem(rsa.generate_private_key(65537, 2048)),
            "unsupported key type RSA (2048-bit); expected EC P-256 or Ed25519"),
    "p384": (lambda: _pem(ec.generate_private_key(ec.SECP384R1())),
             "unsupported key type EC secp384r1; expected EC P-256 or Ed25519"),
    "secp256k1": (lambda: _pem(ec.generate_private_key(ec.SECP256K1())),
                  "unsupported key type EC secp256k1; expected EC P-256 or Ed25519"),
    "ed448": (lambda: _pem(ed448.Ed448PrivateKey.generate()),
              "unsupported key type Ed448; expected EC P-256 or Ed25519"),
    "x25519": (lambda: _pem(x25519.X25519PrivateKey.generate()),
               "unsupported key type X25519; expected EC P-256 or Ed25519"),
    "encrypted-pkcs8": (lambda: _pem(EC_KEY, encryption=serialization.BestAvailableEncryption(b"pw")),
                        "key is encrypted; an unencrypted PKCS#8 PEM key is required"),
    "encrypted-traditional": (_encrypted_traditional,
                              "key is encrypted; an unencrypted PKCS#8 PEM key is required"),
    "garbage-pem": (lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                    "not a valid PEM private key"),
    "certificate-only": (lambda: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                         "not a valid PEM private key"),
    "not-pem": (lambda: b"hello, not a key\n", "not a PEM file (no '-----BEGIN' line)"),
    "missing": (None, "file not found"),
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_bad_keys_give_cryptographys_one_line_errors(case: str, tmp_path: Path) -> None:
    make, expected = BAD_KEYS[case]
    path = tmp_path / "bad.key"
    if make is not None:
        path.write_bytes(make())
    with pytest.raises(KeyFileError) as ours:
        libcrypto.load_private_key(path)
    with pytest.raises(KeyFileError) as theirs:
        load_private_key(path)
    assert str(ours.value) == str(theirs.value) == f"{path}: {expected}"
    with pytest.raises(KeyFileError) as through_signer:
        Signer.from_file(path)
    assert str(through_signer.value) == f"{path}: {expected}"


# --------------------------------------------------------------------------- fallback


def test_fallback_to_cryptography_when_libcrypto_is_switched_off(alg_and_key, monkeypatch,
                                                                 tmp_path: Path) -> None:
    alg, key, path = alg_and_key
    with_libcrypto = Signer.from_file(path)
    monkeypatch.setattr(libcrypto, "ENABLED", False)
    assert libcrypto.binding() is None
    assert libcrypto.describe().startswith("cryptography (")
    signer = Signer.from_file(path)
    assert signer.backend == "cryptography" and signer.alg == alg
    assert signer.kid == with_libcrypto.kid
    token = signer.sign(CLAIMS)
    verifier = Verifier({"keys": [{**with_libcrypto.public_jwk, "vid": "VIN1"}]})
    assert verifier.verify(token)[1] == CLAIMS
    # The same one-line error as through libcrypto.
    bad = tmp_path / "p384.key"
    bad.write_bytes(_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(KeyFileError, match=r"unsupported key type EC secp384r1; expected"):
        Signer.from_file(bad)


@pytest.mark.parametrize("library,why", [
    ("/nonexistent/libcrypto.so.3", "cannot load /nonexistent/libcrypto.so.3: cannot open "
                                    "shared object file: No such file or directory"),
    (ctypes.util.find_library("c"), f"{ctypes.util.find_library('c')} has no OpenSSL_version_num"),
], ids=["not found", "lacks a symbol"])
def test_unusable_libcrypto_falls_back_and_says_so_once(library, why, monkeypatch, caplog,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(libcrypto, "_library_path", lambda: library)
    monkeypatch.setattr(libcrypto, "_loaded", False)
    monkeypatch.setattr(libcrypto, "_binding", None)
    path = tmp_path / "ed.key"
    path.write_bytes(_pem(ED_KEY))
    with caplog.at_level(logging.INFO, logger="car_agent.signing"):
        first, second = Signer.from_file(path), Signer.from_file(path)
    assert first.backend == second.backend == "cryptography"
    assert first.sign(CLAIMS) == Signer(ED_KEY).sign(CLAIMS)
    assert [r.getMessage() for r in caplog.records] == [
        f"signing: libcrypto not usable ({why}); signing with the cryptography package"]
    assert libcrypto.describe().startswith("cryptography (libcrypto not usable: ")


def test_openssl_111_names_give_the_same_key(monkeypatch, tmp_path: Path) -> None:
    """The 1.1.1 way to a curve and point (through the EC_KEY; OpenSSL 3 still exports it)."""
    v1 = libcrypto._Binding(libcrypto.binding().path)
    v1._bind(v1.lib, libcrypto._EC_V1)
    v1.openssl3 = False
    monkeypatch.setattr(libcrypto, "_binding", v1)
    path = tmp_path / "ec.key"
    path.write_bytes(_pem(EC_KEY))
    signer = Signer.from_file(path)
    assert signer.public_jwk == Signer(EC_KEY).public_jwk
    verifier = Verifier({"keys": [{**signer.public_jwk, "vid": "VIN1"}]})
    assert verifier.verify(signer.sign(CLAIMS))[1] == CLAIMS
    path.write_bytes(_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(KeyFileError, match=r": unsupported key type EC secp384r1; expected"):
        Signer.from_file(path)


# --------------------------------------------------------------------------- certificates


def _certificate(tmp_path: Path, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "VIN1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(EC_KEY.public_key()).serial_number(1)
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(EC_KEY, hashes.SHA256()))
    path = tmp_path / "client.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("not_after", [dt.datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC),
                                       dt.datetime(2051, 12, 31, 23, 59, 58, tzinfo=UTC)],
                         ids=["UTCTime", "GeneralizedTime"])
def test_certificate_dates_through_libcrypto_and_the_fallback(tmp_path: Path, monkeypatch,
                                                              not_after: dt.datetime) -> None:
    not_before = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    path = _certificate(tmp_path, not_before, not_after)
    assert libcrypto.certificate_validity(path.read_bytes()) == (not_before, not_after)
    assert certificate_validity(path) == (not_before, not_after)
    monkeypatch.setattr(libcrypto, "ENABLED", False)
    assert certificate_validity(path) == (not_before, not_after)


def test_not_a_certificate_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(_pem(EC_KEY))
    with pytest.raises(ValueError, match="not a PEM certificate"):
        certificate_validity(path)


# --------------------------------------------------------------------------- the daemon


def _daemon_run(tmp_path: Path, *, enabled: bool) -> dict:
    """In a fresh interpreter: import the daemon, sign with a key from a file and read the
    client certificate's expiry as `run` does; what got loaded."""
    key = tmp_path / "ec.key"
    key.write_bytes(_pem(EC_KEY))
    cert = _certificate(tmp_path, dt.datetime(2026, 1, 1, tzinfo=UTC),
                        dt.datetime(2031, 1, 1, tzinfo=UTC))
    code = f"""if True:
        import json, sys
        from pathlib import Path
        import agent.uplink.libcrypto as libcrypto
        libcrypto.ENABLED = {enabled}
        import agent.service.daemon
        from agent.uplink.jws import Signer
        from agent.uplink.mqtt import certificate_expiry
        signer = Signer.from_file({str(key)!r})
        token = signer.sign({{"seq": 1}})
        expiry = certificate_expiry(Path({str(cert)!r}))
        maps = open("/proc/self/maps").read().splitlines()
        print(json.dumps({{"backend": signer.backend, "token": token, "kid": signer.kid,
                          "expiry": expiry.isoformat(),
                          "cryptography": sorted(m for m in sys.modules
                                                 if m.split(".")[0] == "cryptography")[:1],
                          "libcrypto": sorted({{l.split()[-1] for l in maps if "libcrypto" in l}})}}))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout)


def test_daemon_signs_and_reads_its_certificate_without_cryptography(tmp_path: Path) -> None:
    seen = _daemon_run(tmp_path, enabled=True)
    assert seen["backend"] == "libcrypto"
    assert seen["cryptography"] == []
    assert len(seen["libcrypto"]) == 1              # the ssl module's copy, no second one
    assert seen["expiry"] == "2031-01-01T00:00:00+00:00"
    verifier = Verifier({"keys": [{**Signer(EC_KEY).public_jwk, "vid": "VIN1"}]})
    assert verifier.verify(seen["token"])[1] == {"seq": 1}
    # Switched off, the same run falls back to (and so loads) cryptography.
    fallback = _daemon_run(tmp_path, enabled=False)
    assert fallback["backend"] == "cryptography" and fallback["cryptography"] == ["cryptography"]
    assert fallback["kid"] == seen["kid"] and fallback["expiry"] == seen["expiry"]
