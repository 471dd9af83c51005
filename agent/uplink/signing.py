"""JWS compact serialization (RFC 7515) for signing uplinked vehicle data.

Each vehicle signs its messages with its own key so the cloud can tell which vehicle
produced a message and that nobody altered it in transit, independent of the TLS
connection that carried it. Only two algorithms are supported, deliberately:

* ``ES256``: ECDSA on P-256 with SHA-256 (RFC 7518 section 3.4);
* ``EdDSA``: Ed25519 (RFC 8037).

Keys are published to verifiers as an RFC 7517 JWK Set; each key is identified by its
RFC 7638 thumbprint (``kid``), so a key id cannot silently refer to a different key.

The car signs through :mod:`agent.uplink.jws` (:class:`Signer`, re-exported here), which does
not need this module when libcrypto signs; this module holds what needs the cryptography
package: loading keys as cryptography objects (the cloud, the dev PKI, the fallback signer),
JWK Sets and the verifier.

The verifier is strict on purpose: it never guesses an algorithm (``alg`` must match the
key it names), rejects ``none``, rejects duplicate JSON members and non-standard JSON
constants, and only parses the payload after the signature has been checked.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.config import vehicle_id_problem
from agent.errors import ConfigError, KeyFileError
from agent.uplink.jws import (
    ED25519_SIZE as _ED25519_SIZE,
    P256_SIZE as _P256_SIZE,
    SIG_SIZE as _SIG_SIZE,
    Signer,
    SigningKey,
    b64url_decode,
    b64url_encode,
    invalid_key,
    encrypted_key,
    jwk_thumbprint,
    key_jwk,
    read_private_key_pem,
    unsupported_key,
)

__all__ = [
    "CryptographyKey",
    "DOCUMENT_SIGNING",
    "PrivateKey",
    "PublicKey",
    "Signer",
    "VerificationError",
    "Verifier",
    "b64url_decode",
    "b64url_encode",
    "jwk_thumbprint",
    "load_private_key",
    "public_jwk",
    "write_jwks",
]

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]
PublicKey = Union[ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey]

SUPPORTED_ALGS = frozenset({"ES256", "EdDSA"})

#: id-kp-documentSigning (RFC 9336): the extended key usage of a signing key's certificate
#: (``x5c``). Unlike clientAuth/serverAuth it does not let the certificate do TLS.
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")

# Members that would turn a public JWK into a private one (RFC 7518 section 6).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "oth")


# --------------------------------------------------------------------------- keys


def _describe_key(key: object) -> str:
    """Human name of a key type, for error messages."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA ({key.key_size}-bit)"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"EC {key.curve.name}"
    names: list[tuple[tuple[type, ...], str]] = [
        ((ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey), "Ed25519"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "Ed448"),
        ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "X25519"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "X448"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "DSA"),
        ((dh.DHPrivateKey, dh.DHPublicKey), "DH"),
    ]
    for types, name in names:
        if isinstance(key, types):
            return name
    return type(key).__name__


def _is_p256(key: object) -> bool:
    return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and isinstance(
        key.curve, ec.SECP256R1
    )


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load an unencrypted PEM private key that can sign JWS (EC P-256 or Ed25519).

    Keys live on the vehicle without a passphrase (there is nobody to type one), so an
    encrypted key is reported as such rather than prompting. File permissions are
    checked by the caller, not here.

    :raises KeyFileError: ``"<path>: <what is wrong>"`` for a missing or unreadable
        file, data that is not a PEM private key, or an unsupported key type.
    """
    data = read_private_key_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise encrypted_key(path) from None
    except (ValueError, UnsupportedAlgorithm):
        raise invalid_key(path) from None
    if _is_p256(key) or isinstance(key, ed25519.Ed25519PrivateKey):
        return key  # type: ignore[return-value]
    raise KeyFileError(f"{path}: {unsupported_key(_describe_key(key))}")


def _alg_for(key: object) -> str:
    if _is_p256(key):
        return "ES256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "EdDSA"
    raise TypeError(unsupported_key(_describe_key(key)))


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    """RFC 7517 JWK for a P-256 or Ed25519 public key, with ``kid``, ``alg`` and ``use``.

    :raises TypeError: for any other key type (a programming error, not user input).
    """
    alg = _alg_for(public_key)
    if alg == "ES256":
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        numbers = public_key.public_numbers()
        return key_jwk(alg, numbers.x.to_bytes(_P256_SIZE, "big"),
                       numbers.y.to_bytes(_P256_SIZE, "big"))
    assert isinstance(public_key, ed25519.Ed25519PublicKey)
    return key_jwk(alg, public_key.public_bytes_raw())


class CryptographyKey(SigningKey):
    """A cryptography P-256 or Ed25519 private key as a :class:`SigningKey`: the fallback
    where libcrypto is not usable, and what ``Signer(key)`` wraps a cryptography key in."""

    __slots__ = ("key", "alg")
    backend = "cryptography"

    def __init__(self, key: PrivateKey) -> None:
        self.key = key
        self.alg = _alg_for(key)     # TypeError for any other key type

    def public_jwk(self) -> dict[str, str]:
        return public_jwk(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        # cryptography returns DER; JWS wants fixed-width r || s (RFC 7518 3.4).
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(_P256_SIZE, "big") + s.to_bytes(_P256_SIZE, "big")


def write_jwks(path: str | os.PathLike[str], jwks: list[dict[str, Any]]) -> None:
    """Write ``{"keys": [...]}`` as pretty JSON.

    The file is replaced atomically (temp file + rename) so a verifier reading it
    concurrently never sees half a key set. It holds public keys only: mode 0644.
    """
    text = json.dumps({"keys": jwks}, indent=2, ensure_ascii=False) + "\n"
    replace_public_file(Path(path), text.encode("utf-8"))


def replace_public_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temp file + rename) with public data, mode 0644: a reader
    (a verifier, a broker reloading on SIGHUP) never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------- verification


class VerificationError(Exception):
    """A token was rejected. ``reason`` is a short, stable code for metrics and logs:

    ``"malformed"``, ``"unsupported alg"``, ``"unknown kid"``, ``"alg mismatch"`` or
    ``"bad signature"``. The message may add detail after the reason.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason if detail is None else f"{reason}: {detail}")
        self.reason = reason


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 section 5.2: duplicate header names must be rejected (or last-wins);
    # rejecting means two parsers can never disagree on what a token says.
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"duplicate member {name!r}")
        obj[name] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse ``data`` as a UTF-8 JSON object, or raise ``VerificationError("malformed")``."""
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise VerificationError("malformed", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise VerificationError("malformed", f"{what} is not a JSON object")
    return value


class _JwkError(ValueError):
    """Internal: what is wrong with one JWK; the caller adds file and index."""


def _decode_member(jwk: dict[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    if value is None:
        raise _JwkError(f"missing {name!r}")
    if not isinstance(value, str):
        raise _JwkError(f"{name!r} must be a string")
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise _JwkError(f"{name!r} is not base64url") from None
    if len(raw) != size:
        raise _JwkError(f"{name!r} must be {size} bytes, got {len(raw)}")
    return raw


def _key_from_jwk(jwk: Any) -> tuple[str, PublicKey]:
    """(alg, public key) for one JWK, or raise :class:`_JwkError`."""
    if not isinstance(jwk, dict):
        raise _JwkError("not a JSON object")
    for name in _PRIVATE_MEMBERS:
        if name in jwk:
            raise _JwkError(f"contains private member {name!r}; publish public keys only")
    kty = jwk.get("kty")
    if kty is None:
        raise _JwkError("missing 'kty'")
    crv = jwk.get("crv")
    key: PublicKey
    if kty == "EC":
        if crv != "P-256":
            raise _JwkError(f"unsupported crv {crv!r} (only P-256)" if crv else "missing 'crv'")
        x = _decode_member(jwk, "x", _P256_SIZE)
        y = _decode_member(jwk, "y", _P256_SIZE)
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError:
            raise _JwkError("'x'/'y' is not a point on P-256") from None
        alg = "ES256"
    elif kty == "OKP":
        if crv != "Ed25519":
            raise _JwkError(f"unsupported crv {crv!r} (only Ed25519)" if crv else "missing 'crv'")
        x = _decode_member(jwk, "x", _ED25519_SIZE)
        key = ed25519.Ed25519PublicKey.from_public_bytes(x)
        alg = "EdDSA"
    else:
        raise _JwkError(f"unsupported kty {kty!r} (only EC P-256 and OKP Ed25519)")
    if "alg" in jwk and jwk["alg"] != alg:
        raise _JwkError(f"'alg' is {jwk['alg']!r} but the key is {alg}")
    if "use" in jwk and jwk["use"] != "sig":
        raise _JwkError(f"'use' is {jwk['use']!r}, expected 'sig'")
    return alg, key


def _certificate_from_jwk(jwk: dict[str, Any], key: PublicKey) -> x509.Certificate | None:
    """The first ``x5c`` certificate of a JWK (None without ``x5c``), or raise :class:`_JwkError`.

    RFC 7517 section 4.7: ``x5c`` is an array of *standard* base64 (not base64url) DER
    certificates, and the key in the first one MUST match the JWK's key. Only that first
    certificate is used; whether it is trusted (issuer, validity, revocation) is for the
    caller to decide.
    """
    chain = jwk.get("x5c")
    if chain is None:
        return None
    if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
        raise _JwkError("'x5c' must be a non-empty array of base64 strings")
    try:
        der = base64.b64decode(chain[0], validate=True)
    except (binascii.Error, ValueError):
        raise _JwkError("'x5c'[0] is not base64") from None
    try:
        cert = x509.load_der_x509_certificate(der)
        cert_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise _JwkError("'x5c'[0] is not a DER X.509 certificate") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert_key.public_bytes(*spki) != key.public_bytes(*spki):
        raise _JwkError("'x5c'[0] certifies a different key than the JWK's")
    return cert


def _bound_vehicle(jwk: dict[str, Any], cert: x509.Certificate | None, where: str) -> str:
    """The vehicle a trust key signs for: its ``vid`` member, else its certificate's CN.

    (A certificate naming another vehicle than ``vid`` is the revocation check's to reject.)
    """
    vid = jwk.get("vid")
    if vid is not None:
        problem = vehicle_id_problem(vid)
        if problem:
            raise ConfigError(f"{where}: 'vid': {problem}")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert is not None else []
    cn = str(names[0].value) if names else None
    if vid is None and cn is None:
        raise ConfigError(f"{where}: bound to no vehicle (no 'vid' and no 'x5c' certificate "
                          "with a CN); such a key would verify any vehicle's messages")
    return vid if vid is not None else cn


class Verifier:
    """Verifies JWS compact tokens against a fixed JWK Set, looking keys up by ``kid``."""

    def __init__(self, jwks: dict[str, Any], *, source: str = "JWK Set") -> None:
        """Parse and validate every key up front, so a bad key set fails at start-up.

        :param source: named in error messages (the file path when loaded from a file).
        :raises ConfigError: ``"<source>: keys[2]: missing 'x'"`` and the like.
        """
        if not isinstance(jwks, dict):
            raise ConfigError(f"{source}: expected a JSON object with a 'keys' array")
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise ConfigError(
                f"{source}: missing 'keys' array" if keys is None else f"{source}: 'keys' must be an array"
            )
        if not keys:
            raise ConfigError(f"{source}: 'keys' is empty; no token could ever verify")
        self._keys: dict[str, tuple[str, PublicKey]] = {}
        self._jwks: dict[str, dict[str, Any]] = {}
        self._certs: dict[str, x509.Certificate] = {}
        first_index: dict[str, int] = {}
        for index, jwk in enumerate(keys):
            where = f"{source}: keys[{index}]"
            try:
                alg, key = _key_from_jwk(jwk)
                cert = _certificate_from_jwk(jwk, key)
            except _JwkError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            kid = jwk.get("kid")
            if kid is None:
                kid = jwk_thumbprint(jwk)
            elif not isinstance(kid, str) or not kid:
                raise ConfigError(f"{where}: 'kid' must be a non-empty string")
            if kid in self._keys:
                raise ConfigError(f"{where}: duplicate kid {kid!r} (also keys[{first_index[kid]}])")
            first_index[kid] = index
            self._keys[kid] = (alg, key)
            # Fail closed: a key bound to no vehicle would verify messages of every vehicle.
            self._jwks[kid] = dict(jwk, vid=_bound_vehicle(jwk, cert, f"{where} (kid {kid})"))
            if cert is not None:
                self._certs[kid] = cert

    @classmethod
    def from_jwks_file(cls, path: str | os.PathLike[str]) -> Verifier:
        """Verifier for the RFC 7517 JWK Set in ``path``.

        :raises ConfigError: ``"<path>: <what is wrong>"``.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
        return cls(data, source=str(path))

    @property
    def kids(self) -> frozenset[str]:
        """Key ids this verifier accepts."""
        return frozenset(self._keys)

    def jwk(self, kid: str) -> dict[str, Any] | None:
        """The JWK (as given, with extra members) for ``kid``, or None. Its ``vid`` is the
        vehicle the key is bound to: the JWK's own ``vid``, else its certificate's CN."""
        jwk = self._jwks.get(kid)
        return None if jwk is None else dict(jwk)

    def certificate(self, kid: str) -> x509.Certificate | None:
        """The key's certificate (first of its ``x5c``, already checked to hold the key),
        or None if the JWK has no ``x5c`` or ``kid`` is unknown. Not checked for trust."""
        return self._certs.get(kid)

    def verify(self, token: str | bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(header, claims)`` of a valid token.

        The payload is only parsed once the signature has been checked.

        :raises VerificationError: for any invalid token; never anything else for
            ``str``/``bytes`` input.
        :raises TypeError: if ``token`` is neither ``str`` nor ``bytes``.
        """
        if isinstance(token, (bytes, bytearray)):
            try:
                token = bytes(token).decode("ascii")
            except UnicodeDecodeError:
                raise VerificationError("malformed", "token is not ASCII") from None
        elif not isinstance(token, str):
            raise TypeError(f"token must be str or bytes, not {type(token).__name__}")
        parts = token.split(".")
        if len(parts) != 3:
            raise VerificationError("malformed", "expected 3 dot-separated parts")
        header_b64, payload_b64, sig_b64 = parts
        try:
            header_raw = b64url_decode(header_b64)
            payload_raw = b64url_decode(payload_b64)
            signature = b64url_decode(sig_b64)
        except ValueError:
            raise VerificationError("malformed", "part is not base64url") from None

        header = _strict_json_object(header_raw, "header")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise VerificationError("malformed", "header has no string 'alg'")
        if "crit" in header:
            # RFC 7515 4.1.11: we understand no extensions, so must reject.
            raise VerificationError("malformed", "unsupported 'crit' header")
        if alg not in SUPPORTED_ALGS:
            raise VerificationError("unsupported alg", alg[:32])
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise VerificationError("malformed", "'kid' is not a string")
        entry = self._keys.get(kid) if kid is not None else None
        if entry is None:
            raise VerificationError("unknown kid")
        key_alg, key = entry
        if alg != key_alg:
            raise VerificationError("alg mismatch", f"header says {alg}, key is {key_alg}")

        if len(signature) != _SIG_SIZE:
            raise VerificationError("bad signature", "wrong length")
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, signing_input)
            else:
                der = encode_dss_signature(
                    int.from_bytes(signature[:_P256_SIZE], "big"),
                    int.from_bytes(signature[_P256_SIZE:], "big"),
                )
                key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerificationError("bad signature") from None

        claims = _strict_json_object(payload_raw, "payload")
        return header, claims
