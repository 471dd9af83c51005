"""The car's side of JWS (RFC 7515): base64url, key ids and :class:`Signer`, without the
cryptography package.

The daemon signs through a :class:`SigningKey`: normally one held by the OpenSSL libcrypto that
Python's ``ssl`` module already loaded for TLS (:mod:`agent.uplink.libcrypto`), which keeps
cryptography's Rust library (~10 MiB resident) out of the head unit; where that libcrypto is
not usable, a cryptography key (:mod:`agent.uplink.signing`, which also holds the verifier).
Both produce the same tokens byte for byte (Ed25519 is deterministic; ECDSA is randomised
either way).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from agent.errors import KeyFileError
from agent.uplink.keyfiles import read_key_material

__all__ = ["Signer", "SigningKey", "b64url_decode", "b64url_encode", "jwk_thumbprint",
           "read_private_key_pem", "unsupported_key"]

# P-256 coordinates, scalars and Ed25519 public keys are all 32 bytes.
P256_SIZE = 32
ED25519_SIZE = 32
SIG_SIZE = 64

# RFC 7638 section 3.2: the members that define each key type, nothing else.
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
    "oct": ("k", "kty"),
}

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


# --------------------------------------------------------------------------- base64url


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2), as JWS requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of :func:`b64url_encode`.

    Rejects padding, characters outside the base64url alphabet (the standard library
    would silently drop or accept ``+``/``/``) and non-canonical trailing bits, so that
    each byte string has exactly one accepted encoding.

    :raises ValueError: if ``text`` is not canonical unpadded base64url.
    """
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex already guards
        raise ValueError("not base64url") from exc
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


# --------------------------------------------------------------------------- keys


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url), used as the key id.

    Only the members that define the key are hashed, in lexicographic order with no
    whitespace, so the id is stable whatever else (``kid``, ``use``, ``vid``...) the JWK
    carries. RSA and ``oct`` are accepted here, although we never sign with them, so the
    function can be checked against the RFC's own example.

    :raises ValueError: unknown ``kty`` or a required member missing / not a string.
    """
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise ValueError("missing 'kty'" if kty is None else "'kty' must be a string")
    members = _THUMBPRINT_MEMBERS.get(kty)
    if members is None:
        raise ValueError(f"unsupported kty {kty!r}")
    required: dict[str, str] = {}
    for name in members:
        value = jwk.get(name)
        if value is None:
            raise ValueError(f"missing {name!r}")
        if not isinstance(value, str):
            raise ValueError(f"{name!r} must be a string")
        required[name] = value
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def key_jwk(alg: str, x: bytes, y: bytes | None = None) -> dict[str, str]:
    """The public JWK (with ``kid``, ``alg``, ``use``) of a P-256 point (``x``, ``y``, 32 bytes
    each, big-endian) or an Ed25519 public key (``x``, its 32 raw bytes).

    ``alg`` is included so a verifier pins the key to one algorithm (no algorithm
    confusion); ``kid`` is the RFC 7638 thumbprint.
    """
    if alg == "ES256":
        assert y is not None
        jwk = {"kty": "EC", "crv": "P-256", "x": b64url_encode(x), "y": b64url_encode(y)}
    else:
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(x)}
    jwk["kid"] = jwk_thumbprint(jwk)
    jwk["alg"] = alg
    jwk["use"] = "sig"
    return jwk


def read_private_key_pem(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a PEM private key file, refusing what no loader could use without a
    passphrase (keys live on the vehicle unencrypted: there is nobody to type one).

    :raises KeyFileError: ``"<path>: <what is wrong>"``.
    """
    data = read_key_material(Path(path), "a PEM private key file")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise encrypted_key(path)
    if b"-----BEGIN" not in data:
        raise KeyFileError(f"{path}: not a PEM file (no '-----BEGIN' line)")
    return data


# The loaders' errors, the same whichever library read the key.

def encrypted_key(path: str | os.PathLike[str]) -> KeyFileError:
    return KeyFileError(f"{path}: key is encrypted; an unencrypted PKCS#8 PEM key is required")


def invalid_key(path: str | os.PathLike[str]) -> KeyFileError:
    return KeyFileError(f"{path}: not a valid PEM private key")


def unsupported_key(description: str) -> str:
    return f"unsupported key type {description}; expected EC P-256 or Ed25519"


class SigningKey:
    """A private key the :class:`Signer` signs with: its JWS ``alg``, its public JWK, and
    :meth:`sign` giving the raw JWS signature (64 bytes: Ed25519, or ECDSA's r || s)."""

    __slots__ = ()

    #: Which library holds the key: ``"libcrypto"`` or ``"cryptography"``.
    backend: ClassVar[str]
    #: ``"ES256"`` or ``"EdDSA"``.
    alg: str

    def public_jwk(self) -> dict[str, str]:
        raise NotImplementedError

    def sign(self, data: bytes) -> bytes:
        raise NotImplementedError


# --------------------------------------------------------------------------- signing


class Signer:
    """Signs claims as JWS compact tokens with one private key.

    Created once at start-up; everything that does not depend on the claims (algorithm,
    key id, encoded protected header) is computed here so :meth:`sign` does only the
    serialization and the signature. Attributes are read-only.

    ``private_key`` is a :class:`SigningKey` or a cryptography P-256 / Ed25519 private key.
    """

    __slots__ = ("_key", "_sign", "_alg", "_kid", "_jwk", "_prefix")

    _key: SigningKey
    _alg: str
    _kid: str
    _jwk: dict[str, str]
    _prefix: bytes

    def __init__(self, private_key: Any) -> None:
        if not isinstance(private_key, SigningKey):
            # A cryptography key (the fallback, the cloud's tools, tests): imported only then,
            # so that the daemon never loads cryptography when libcrypto signs.
            from agent.uplink.signing import CryptographyKey
            private_key = CryptographyKey(private_key)
        alg = private_key.alg
        jwk = private_key.public_jwk()
        header = json.dumps(
            {"alg": alg, "kid": jwk["kid"], "typ": "JWT"}, separators=(",", ":")
        ).encode("ascii")
        set_ = object.__setattr__
        set_(self, "_key", private_key)
        set_(self, "_sign", private_key.sign)
        set_(self, "_alg", alg)
        set_(self, "_kid", jwk["kid"])
        set_(self, "_jwk", jwk)
        set_(self, "_prefix", b64url_encode(header).encode("ascii") + b".")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Signer for the unencrypted PEM EC P-256 or Ed25519 key in ``path``, held by
        libcrypto when it is usable, else by the cryptography package.

        :raises KeyFileError: ``"<path>: <what is wrong>"`` (the same from either library).
        """
        from agent.uplink import libcrypto

        if libcrypto.binding() is not None:
            return cls(libcrypto.load_private_key(path))
        from agent.uplink.signing import load_private_key
        return cls(load_private_key(path))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return f"Signer(alg={self._alg!r}, kid={self._kid!r}, backend={self.backend!r})"

    @property
    def alg(self) -> str:
        """JWS algorithm: ``"ES256"`` or ``"EdDSA"``."""
        return self._alg

    @property
    def kid(self) -> str:
        """RFC 7638 thumbprint of the public key, sent in every header."""
        return self._kid

    @property
    def public_jwk(self) -> dict[str, str]:
        """The public JWK (a copy, so callers can add members such as ``vid``)."""
        return dict(self._jwk)

    @property
    def backend(self) -> str:
        """The library that signs: ``"libcrypto"`` or ``"cryptography"``."""
        return self._key.backend

    def sign(self, claims: dict[str, Any]) -> str:
        """Return ``b64url(header).b64url(payload).b64url(signature)``.

        The payload is canonical JSON (sorted keys, no whitespace, UTF-8) so the same
        claims always produce the same payload bytes.

        :raises ValueError: if a claim holds NaN or an infinity (not JSON).
        """
        # allow_nan=False: NaN/Infinity are not JSON; a verifier would reject the message.
        payload = json.dumps(
            claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        signing_input = self._prefix + b64url_encode(payload).encode("ascii")
        signature = self._sign(signing_input)
        return (signing_input + b"." + b64url_encode(signature).encode("ascii")).decode("ascii")
