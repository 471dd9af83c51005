"""Tests for agent.signing: JWS compact signing/verification, JWK and thumbprints.

jwcrypto is used as an independent implementation: tokens we sign must verify there, and
our thumbprints must equal its thumbprints.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

from agent.errors import ConfigError, KeyFileError
from agent.uplink.signing import (
    Signer,
    VerificationError,
    Verifier,
    b64url_decode,
    b64url_encode,
    jwk_thumbprint,
    load_private_key,
    public_jwk,
    write_jwks,
)

# RFC 7638 section 3.1 example key (also RFC 7517 appendix A.1) and its thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# Keys shared by the whole module (Hypothesis tests cannot use function-scoped fixtures).
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
EC_SIGNER = Signer(EC_KEY)
ED_SIGNER = Signer(ED_KEY)
VERIFIER = Verifier({"keys": [{**EC_SIGNER.public_jwk, "vid": "VIN1"},
                              {**ED_SIGNER.public_jwk, "vid": "VIN2"}]})
CLAIMS = {"vid": "VIN1", "ts": 1700000000123, "signals": {"Vehicle.Speed": 42.5}, "note": "grüße"}


def _pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _parts(token: str) -> tuple[bytes, bytes, bytes]:
    h, p, s = token.split(".")
    return b64url_decode(h), b64url_decode(p), b64url_decode(s)


def _token(header: object, payload: object, sig: bytes = b"\0" * 64) -> str:
    enc = lambda o: b64url_encode(o if isinstance(o, bytes) else json.dumps(o).encode())  # noqa: E731
    return f"{enc(header)}.{enc(payload)}.{b64url_encode(sig)}"


def _jwcrypto_verify(token: str, jwk: dict) -> dict:
    obj = jw_jws.JWS()
    obj.deserialize(token)
    obj.verify(jw_jwk.JWK(**jwk))  # raises on failure
    return json.loads(obj.payload)


# --------------------------------------------------------------------------- base64url


def test_b64url_roundtrip_and_strictness() -> None:
    for n in range(0, 7):
        data = bytes(range(250, 250 - n, -1))
        enc = b64url_encode(data)
        assert "=" not in enc and "+" not in enc and "/" not in enc
        assert b64url_decode(enc) == data
    assert b64url_encode(b"\xfb\xff") == "-_8"
    for bad in ("-_8=", "+/8", "a", "ab c", "AB"):  # padding, std alphabet, bad length, space, non-canonical
        with pytest.raises(ValueError):
            b64url_decode(bad)


# --------------------------------------------------------------------------- keys


def test_load_private_key_ec_and_ed25519(tmp_path: Path) -> None:
    (tmp_path / "ec.key").write_bytes(_pem(EC_KEY))
    (tmp_path / "ed.key").write_bytes(_pem(ED_KEY))
    ec_loaded = load_private_key(tmp_path / "ec.key")
    ed_loaded = load_private_key(tmp_path / "ed.key")
    assert isinstance(ec_loaded, ec.EllipticCurvePrivateKey)
    assert ec_loaded.private_numbers() == EC_KEY.private_numbers()
    assert isinstance(ed_loaded, ed25519.Ed25519PrivateKey)
    assert Signer.from_file(tmp_path / "ed.key").kid == ED_SIGNER.kid


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        (b"hello, not a key\n", "not a PEM file"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a valid PEM private key"),
        ("rsa", "unsupported key type RSA (2048-bit)"),
        ("p384", "unsupported key type EC secp384r1"),
        ("encrypted", "encrypted"),
    ],
)
def test_load_private_key_errors_name_file_and_problem(tmp_path: Path, content: object, expected: str) -> None:
    path = tmp_path / "bad.key"
    if content == "rsa":
        path.write_bytes(_pem(rsa.generate_private_key(65537, 2048)))
    elif content == "p384":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP384R1())))
    elif content == "encrypted":
        path.write_bytes(
            EC_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            )
        )
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        load_private_key(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_load_private_key_directory_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is a directory"):
        load_private_key(tmp_path)


def test_public_jwk_shapes() -> None:
    ec_jwk = public_jwk(EC_KEY.public_key())
    assert set(ec_jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (ec_jwk["kty"], ec_jwk["crv"], ec_jwk["alg"], ec_jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    nums = EC_KEY.public_key().public_numbers()
    assert b64url_decode(ec_jwk["x"]) == nums.x.to_bytes(32, "big")
    assert b64url_decode(ec_jwk["y"]) == nums.y.to_bytes(32, "big")

    ed_jwk = public_jwk(ED_KEY.public_key())
    assert ed_jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(ED_KEY.public_key().public_bytes_raw()),
        "kid": ed_jwk["kid"],
        "alg": "EdDSA",
        "use": "sig",
    }
    with pytest.raises(TypeError, match="RSA"):
        public_jwk(rsa.generate_private_key(65537, 2048).public_key())  # type: ignore[arg-type]


def test_thumbprint_rfc7638_example() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    # Extra members (kid, alg, use, vid...) must not change it.
    assert jwk_thumbprint({**RFC7638_JWK, "use": "sig", "vid": "X"}) == RFC7638_THUMBPRINT


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_thumbprint_matches_jwcrypto(key: object) -> None:
    jwk = public_jwk(key.public_key())  # type: ignore[attr-defined]
    expected = jw_jwk.JWK(**jwk).thumbprint()
    assert jwk["kid"] == expected
    assert jwk_thumbprint(jwk) == expected


def test_thumbprint_rejects_incomplete_jwk() -> None:
    with pytest.raises(ValueError, match="missing 'y'"):
        jwk_thumbprint({"kty": "EC", "crv": "P-256", "x": "AA"})
    with pytest.raises(ValueError, match="unsupported kty"):
        jwk_thumbprint({"kty": "XYZ"})


# --------------------------------------------------------------------------- signing


@pytest.mark.parametrize("signer", [EC_SIGNER, ED_SIGNER], ids=["ES256", "EdDSA"])
def test_sign_verifies_with_jwcrypto_and_ours(signer: Signer) -> None:
    token = signer.sign(CLAIMS)
    assert _jwcrypto_verify(token, signer.public_jwk) == CLAIMS
    header, claims = VERIFIER.verify(token)
    assert claims == CLAIMS
    assert header == {"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}
    # bytes tokens are accepted too
    assert VERIFIER.verify(token.encode())[1] == CLAIMS


def test_signer_attributes() -> None:
    assert EC_SIGNER.alg == "ES256" and ED_SIGNER.alg == "EdDSA"
    assert EC_SIGNER.kid == jwk_thumbprint(EC_SIGNER.public_jwk) == EC_SIGNER.public_jwk["kid"]
    with pytest.raises(AttributeError):
        EC_SIGNER.alg = "none"  # type: ignore[misc]
    # public_jwk is a copy: callers may add "vid" without changing the signer.
    jwk = EC_SIGNER.public_jwk
    jwk["vid"] = "VIN1"
    assert "vid" not in EC_SIGNER.public_jwk
    with pytest.raises(TypeError):
        Signer(rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]


def test_header_is_exactly_alg_kid_typ() -> None:
    header_raw, _, _ = _parts(EC_SIGNER.sign({}))
    assert header_raw == ('{"alg":"ES256","kid":"%s","typ":"JWT"}' % EC_SIGNER.kid).encode()
    assert list(json.loads(header_raw)) == ["alg", "kid", "typ"]


def test_payload_is_canonical_json() -> None:
    _, payload, _ = _parts(ED_SIGNER.sign({"b": 1, "a": {"z": [1, 2], "y": "ü"}}))
    assert payload == '{"a":{"y":"ü","z":[1,2]},"b":1}'.encode("utf-8")
    # Deterministic for Ed25519: same claims, same token.
    assert ED_SIGNER.sign({"b": 1}) == ED_SIGNER.sign({"b": 1})


def test_es256_signature_is_raw_64_bytes_even_with_leading_zero() -> None:
    """r||s must be fixed-width; a signature whose r or s starts with a zero byte is the
    case a naive DER conversion gets wrong (about 1 in 128 signatures)."""
    padded = None
    for i in range(5000):
        token = EC_SIGNER.sign({"i": i})
        _, _, sig = _parts(token)
        assert len(sig) == 64
        if sig[0] == 0 or sig[32] == 0:
            padded = token
            break
    assert padded is not None, "no zero-prefixed r or s in 5000 signatures"
    assert _jwcrypto_verify(padded, EC_SIGNER.public_jwk)["i"] == i
    VERIFIER.verify(padded)
    # And it is the same (r, s) ECDSA verifies as DER.
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    h, p, _ = padded.split(".")
    _, _, sig = _parts(padded)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    EC_KEY.public_key().verify(der, f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))


def test_jwcrypto_token_verifies_with_ours() -> None:
    """The other direction: a token signed by jwcrypto verifies with our Verifier."""
    key = jw_jwk.JWK.generate(kty="EC", crv="P-256")
    pub = json.loads(key.export_public())
    kid = key.thumbprint()
    obj = jw_jws.JWS(json.dumps({"a": 1}).encode())
    obj.add_signature(key, None, json.dumps({"alg": "ES256", "kid": kid}))
    header, claims = Verifier({"keys": [{**pub, "vid": "VIN1"}]}).verify(obj.serialize(compact=True))
    assert claims == {"a": 1} and header["kid"] == kid


# --------------------------------------------------------------------------- rejection


def _reason(token: str | bytes, verifier: Verifier = VERIFIER) -> str:
    with pytest.raises(VerificationError) as info:
        verifier.verify(token)
    return info.value.reason


@pytest.mark.parametrize("signer", [EC_SIGNER, ED_SIGNER], ids=["ES256", "EdDSA"])
def test_tampered_payload_is_bad_signature(signer: Signer) -> None:
    h, _, s = signer.sign({"speed": 10}).split(".")
    forged = ".".join([h, b64url_encode(b'{"speed":99}'), s])
    assert _reason(forged) == "bad signature"
    with pytest.raises(Exception):
        _jwcrypto_verify(forged, signer.public_jwk)


def test_tampered_signature_and_header_are_rejected() -> None:
    h, p, s = EC_SIGNER.sign(CLAIMS).split(".")
    sig = bytearray(b64url_decode(s))
    sig[10] ^= 1
    assert _reason(f"{h}.{p}.{b64url_encode(bytes(sig))}") == "bad signature"
    assert _reason(f"{h}.{p}.{b64url_encode(bytes(sig[:63]))}") == "bad signature"
    # Re-encoding the header changes the signing input even if it means the same.
    h2 = b64url_encode(json.dumps({"alg": "ES256", "kid": EC_SIGNER.kid, "typ": "JWT"}).encode())
    assert h2 != h
    assert _reason(f"{h2}.{p}.{s}") == "bad signature"


def test_unknown_and_missing_kid() -> None:
    other = Signer(ec.generate_private_key(ec.SECP256R1()))
    assert _reason(other.sign(CLAIMS)) == "unknown kid"
    assert _reason(_token({"alg": "ES256"}, {})) == "unknown kid"


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "ES384", "", "es256"])
def test_unsupported_alg(alg: str) -> None:
    assert _reason(_token({"alg": alg, "kid": EC_SIGNER.kid}, CLAIMS)) == "unsupported alg"


def test_alg_mismatch() -> None:
    h, p, s = ED_SIGNER.sign(CLAIMS).split(".")
    header = {"alg": "ES256", "kid": ED_SIGNER.kid, "typ": "JWT"}
    assert _reason(f"{b64url_encode(json.dumps(header).encode())}.{p}.{s}") == "alg mismatch"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "!!!.e30.AAAA",
        "e30=.e30.AAAA",  # padded
        " " + EC_SIGNER.sign({}),
        EC_SIGNER.sign({}) + "\n",
        b"\xff\xfe.e30.AAAA",
        "ü.e30.AAAA",
        _token([1, 2], {}),  # header not an object
        _token(b"not json", {}),
        _token(b'{"alg":"ES256","alg":"EdDSA","kid":"x"}', {}),  # duplicate member
        _token(b'{"alg":NaN}', {}),
        _token({"kid": "x"}, {}),  # no alg
        _token({"alg": "ES256", "kid": 5}, {}),
        _token({"alg": "ES256", "kid": "x", "crit": ["exp"]}, {}),
        _token(b"[" * 100_000, {}),  # deep nesting must not escape as RecursionError
    ],
    ids=lambda t: repr(t)[:30],
)
def test_garbage_is_malformed(token: str | bytes) -> None:
    assert _reason(token) == "malformed"


@pytest.mark.parametrize("payload", [b"[1,2]", b"\"text\"", b"not json", b"\xff\xfe"])
def test_validly_signed_non_object_payload_is_malformed(payload: bytes) -> None:
    header = b64url_encode(json.dumps({"alg": "EdDSA", "kid": ED_SIGNER.kid}).encode())
    body = b64url_encode(payload)
    sig = ED_KEY.sign(f"{header}.{body}".encode())
    assert _reason(f"{header}.{body}.{b64url_encode(sig)}") == "malformed"


def test_verify_rejects_non_text_type() -> None:
    with pytest.raises(TypeError):
        VERIFIER.verify(123)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- JWK Set


def test_write_jwks_and_from_file_with_extra_members(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    jwk = {**EC_SIGNER.public_jwk, "vid": "VIN1", "note": "extra"}
    ed_jwk = {**ED_SIGNER.public_jwk, "vid": "VIN2"}
    write_jwks(path, [jwk, ed_jwk])
    data = json.loads(path.read_text())
    assert data == {"keys": [jwk, ed_jwk]}
    assert path.read_text().startswith("{\n  ")  # pretty-printed
    assert path.stat().st_mode & 0o777 == 0o644
    verifier = Verifier.from_jwks_file(path)
    assert verifier.kids == {EC_SIGNER.kid, ED_SIGNER.kid}
    assert verifier.jwk(EC_SIGNER.kid)["vid"] == "VIN1"  # type: ignore[index]
    assert verifier.verify(EC_SIGNER.sign(CLAIMS))[1] == CLAIMS
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_jwk_without_kid_is_found_by_thumbprint() -> None:
    jwk = {k: v for k, v in EC_SIGNER.public_jwk.items() if k != "kid"}
    verifier = Verifier({"keys": [{**jwk, "vid": "VIN1"}]})
    assert verifier.kids == {EC_SIGNER.kid}
    assert verifier.verify(EC_SIGNER.sign({"x": 1}))[1] == {"x": 1}


def _bad_point_jwk() -> dict:
    jwk = dict(EC_SIGNER.public_jwk)
    y = bytearray(b64url_decode(jwk["y"]))
    y[-1] ^= 1
    jwk["y"] = b64url_encode(bytes(y))
    return jwk


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("{not json", "invalid JSON at line 1 column 2"),
        ("[]", "expected a JSON object"),
        ("{}", "missing 'keys'"),
        ('{"keys": {}}', "'keys' must be an array"),
        ('{"keys": []}', "'keys' is empty"),
        ({"keys": ["ED", {"crv": "P-256"}]}, "keys[1]: missing 'kty'"),
        ({"keys": ["ED", "EC-no-x"]}, "keys[1]: missing 'x'"),
        ({"keys": ["EC", "ED", "EC-no-x"]}, "keys[2]: missing 'x'"),
        ({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}, "keys[0]: unsupported kty 'RSA'"),
        ({"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]}, "unsupported crv 'P-384'"),
        ({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}, "'x' must be 32 bytes, got 3"),
        ({"keys": ["EC-private"]}, "keys[0]: contains private member 'd'"),
        ({"keys": ["EC", "EC"]}, "keys[1]: duplicate kid"),
        ({"keys": ["EC-bad-point"]}, "not a point on P-256"),
        ({"keys": ["EC-wrong-alg"]}, "'alg' is 'EdDSA' but the key is ES256"),
        ({"keys": ["EC-enc"]}, "'use' is 'enc'"),
        ({"keys": ["not an object"]}, "keys[0]: not a JSON object"),
        # Fail closed: a key bound to no vehicle would verify every vehicle's messages.
        ({"keys": ["EC-no-vid"]}, "keys[0] (kid EC-KID): bound to no vehicle"),
        ({"keys": ["EC", "ED-no-vid"]}, "keys[1] (kid ED-KID): bound to no vehicle"),
        ({"keys": ["EC-bad-vid"]}, "keys[0] (kid EC-KID): 'vid': 'VIN/1' is not a valid "
                                   "vehicle id"),
    ],
)
def test_jwks_file_errors_are_config_errors(tmp_path: Path, content: object, expected: str) -> None:
    expected = expected.replace("EC-KID", EC_SIGNER.kid).replace("ED-KID", ED_SIGNER.kid)
    named = {
        "EC": {**EC_SIGNER.public_jwk, "vid": "VIN1"},
        "ED": {**ED_SIGNER.public_jwk, "vid": "VIN2"},
        "EC-no-vid": EC_SIGNER.public_jwk,
        "ED-no-vid": ED_SIGNER.public_jwk,
        "EC-bad-vid": {**EC_SIGNER.public_jwk, "vid": "VIN/1"},
        "EC-no-x": {k: v for k, v in EC_SIGNER.public_jwk.items() if k not in ("x", "kid")},
        "EC-private": {**EC_SIGNER.public_jwk, "d": "AAAA"},
        "EC-bad-point": _bad_point_jwk(),
        "EC-wrong-alg": {**EC_SIGNER.public_jwk, "alg": "EdDSA"},
        "EC-enc": {**EC_SIGNER.public_jwk, "use": "enc"},
    }
    path = tmp_path / "jwks.json"
    if isinstance(content, dict):
        content = json.dumps({"keys": [named.get(k, k) if isinstance(k, str) else k for k in content["keys"]]})
    if content is not None:
        path.write_text(content)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        Verifier.from_jwks_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


# --------------------------------------------------------------------------- properties

_REAL_PREFIX = EC_SIGNER.sign(CLAIMS).rsplit(".", 1)[0]
_B64_SEGMENT = st.binary(max_size=80).map(b64url_encode)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
_JSON_SEGMENT = _JSON_VALUES.map(lambda v: b64url_encode(json.dumps(v).encode()))
_HEADERS = st.fixed_dictionaries(
    {"alg": st.sampled_from(["ES256", "EdDSA", "none"]) | st.text(max_size=5)},
    optional={"kid": st.sampled_from([EC_SIGNER.kid, ED_SIGNER.kid]) | st.text(max_size=5) | _JSON_VALUES},
).map(lambda h: b64url_encode(json.dumps(h).encode()))
_TOKENS = st.one_of(
    st.text(),
    st.binary(),
    st.tuples(_B64_SEGMENT, _B64_SEGMENT, _B64_SEGMENT).map(".".join),
    st.tuples(_HEADERS | _JSON_SEGMENT, _JSON_SEGMENT | _B64_SEGMENT, _B64_SEGMENT).map(".".join),
    # A real header and payload with a random signature of the right length.
    st.binary(min_size=64, max_size=64).map(lambda sig: f"{_REAL_PREFIX}.{b64url_encode(sig)}"),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TOKENS)
def test_verify_rejects_every_token_no_trusted_key_signed(token: str | bytes) -> None:
    # None of these tokens was signed by a key the verifier trusts: each must be rejected.
    with pytest.raises(VerificationError) as info:
        VERIFIER.verify(token)
    assert info.value.reason in {"malformed", "unsupported alg", "unknown kid", "alg mismatch",
                                 "bad signature"}


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=6), st.sampled_from([EC_SIGNER, ED_SIGNER]))
def test_sign_verify_roundtrip(claims: dict, signer: Signer) -> None:
    token = signer.sign(claims)
    assert VERIFIER.verify(token) == ({"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}, claims)
    assert base64.urlsafe_b64decode(token.split(".")[1] + "==") == json.dumps(
        claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def test_key_bound_by_its_certificate_cn_alone(tmp_path: Path) -> None:
    """A standard JWKS without `vid` is accepted when each key's x5c names its vehicle (CN);
    the CN is then the key's vehicle."""
    from agent.dev.pki import init_pki

    init_pki(tmp_path, ["VIN7"])
    published = json.loads((tmp_path / "jwks.json").read_text())["keys"][0]
    assert published["vid"] == "VIN7" and published["x5c"]
    without_vid = {k: v for k, v in published.items() if k != "vid"}
    verifier = Verifier({"keys": [without_vid]})
    assert verifier.jwk(published["kid"])["vid"] == "VIN7"  # type: ignore[index]
    assert Verifier({"keys": [{**published, "vid": "VIN8"}]}).jwk(published["kid"])["vid"] == "VIN8"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_sign_refuses_non_finite_numbers(bad: float) -> None:
    """NaN/Infinity are not JSON: signing them would make a message every verifier rejects."""
    with pytest.raises(ValueError):
        EC_SIGNER.sign({"vid": "VIN1", "age": {"Vehicle.Speed": bad}})
