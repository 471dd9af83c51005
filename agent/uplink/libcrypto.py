"""Signing keys and certificate dates on the OpenSSL libcrypto that Python's ``ssl`` module
already loaded, through ctypes.

Why: the daemon needs TLS (so libcrypto is mapped anyway, ~4 MiB resident) and signs a few
messages a second. Signing through the cryptography package costs ~10 MiB more resident (its
Rust library's pages touched at load, cffi, its modules); signing through the libcrypto already
in the process costs ctypes (~0.6 MiB). The library is found in ``/proc/self/maps`` after
``import ssl`` so no second copy is mapped (``ctypes.util.find_library`` where there is no
``/proc`` or Python links OpenSSL statically).

Only what the daemon needs: an unencrypted PEM EC P-256 or Ed25519 private key, its public
point, one-shot signing (ES256 as JWS r || s, Ed25519), and a certificate's notBefore/notAfter.
OpenSSL 1.1.1 or later; OpenSSL 3 names with their 1.1.1 fallbacks. Every OpenSSL object is
freed where it was made (a key with its Python object).

When libcrypto cannot be found or lacks a symbol, :func:`binding` is None (logged once) and
callers use the cryptography package instead; tests force that with :data:`ENABLED`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import logging
import os
import ssl  # noqa: F401  (maps libcrypto into the process, the copy this module uses)
import weakref
from ctypes import POINTER, byref, c_char_p, c_int, c_long, c_size_t, c_ulong, c_void_p

from agent.errors import KeyFileError
from agent.uplink.jws import (
    ED25519_SIZE,
    P256_SIZE,
    SigningKey,
    encrypted_key,
    invalid_key,
    key_jwk,
    read_private_key_pem,
    unsupported_key,
)

__all__ = ["ENABLED", "LibcryptoKey", "binding", "certificate_validity", "describe",
           "load_private_key"]

log = logging.getLogger("car_agent.signing")

#: False: behave as if libcrypto were not usable (tests of the cryptography fallback).
ENABLED = True

_MIN_VERSION = 0x1010100F        # OpenSSL 1.1.1: EVP_DigestSign, raw keys, ASN1_TIME_to_tm

# EVP_PKEY base ids (obj_mac.h), for the one-line error naming a key we do not sign with.
_EVP_PKEY_EC = 408
_EVP_PKEY_ED25519 = 1087
_KEY_TYPES = {6: "RSA", 912: "RSA", 116: "DSA", 28: "DH", 920: "DH", 1034: "X25519",
              1035: "X448", 1088: "Ed448", _EVP_PKEY_ED25519: "Ed25519"}
# OpenSSL's names of the curves whose name differs in cryptography's messages.
_CURVE_NAMES = {"prime256v1": "secp256r1", "prime192v1": "secp192r1"}
_P256 = "prime256v1"
_POINT_CONVERSION_UNCOMPRESSED = 4
_MAX_SIG = 80                    # a DER ECDSA P-256 signature is at most 72 bytes

_PASSWORD_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, c_int, c_void_p)


@_PASSWORD_CB
def _no_password(buf, size, rwflag, asked):   # noqa: ARG001
    # OpenSSL asks for a passphrase: the key is encrypted. Say so, give none (never prompt).
    ctypes.cast(asked, POINTER(c_int))[0] = 1
    return -1


class _Tm(ctypes.Structure):
    # struct tm (glibc and musl); ASN1_TIME_to_tm fills it.
    _fields_ = [("tm_sec", c_int), ("tm_min", c_int), ("tm_hour", c_int), ("tm_mday", c_int),
                ("tm_mon", c_int), ("tm_year", c_int), ("tm_wday", c_int), ("tm_yday", c_int),
                ("tm_isdst", c_int), ("tm_gmtoff", c_long), ("tm_zone", c_char_p)]


# name (or OpenSSL 3 name, 1.1.1 name), restype, argtypes. Pointers are c_void_p: the default
# restype int would truncate them.
_FUNCTIONS: list[tuple[str | tuple[str, str], object, list[object]]] = [
    ("OpenSSL_version_num", c_ulong, []),
    ("OpenSSL_version", c_char_p, [c_int]),
    ("ERR_clear_error", None, []),
    ("BIO_new_mem_buf", c_void_p, [c_char_p, c_int]),
    ("BIO_free", c_int, [c_void_p]),
    ("PEM_read_bio_PrivateKey", c_void_p, [c_void_p, c_void_p, _PASSWORD_CB, c_void_p]),
    ("PEM_read_bio_X509", c_void_p, [c_void_p, c_void_p, _PASSWORD_CB, c_void_p]),
    ("X509_free", None, [c_void_p]),
    ("X509_get0_notBefore", c_void_p, [c_void_p]),
    ("X509_get0_notAfter", c_void_p, [c_void_p]),
    ("ASN1_TIME_to_tm", c_int, [c_void_p, POINTER(_Tm)]),
    ("EVP_PKEY_free", None, [c_void_p]),
    (("EVP_PKEY_get_base_id", "EVP_PKEY_base_id"), c_int, [c_void_p]),
    (("EVP_PKEY_get_bits", "EVP_PKEY_bits"), c_int, [c_void_p]),
    ("EVP_PKEY_get_raw_public_key", c_int, [c_void_p, c_char_p, POINTER(c_size_t)]),
    ("EVP_MD_CTX_new", c_void_p, []),
    ("EVP_MD_CTX_free", None, [c_void_p]),
    ("EVP_sha256", c_void_p, []),
    ("EVP_DigestSignInit", c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]),
    ("EVP_DigestSign", c_int, [c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t]),
]
# The curve and public point of an EC key: OpenSSL 3's parameter getters ...
_EC_V3 = [
    ("EVP_PKEY_get_group_name", c_int, [c_void_p, c_char_p, c_size_t, POINTER(c_size_t)]),
    ("EVP_PKEY_get_bn_param", c_int, [c_void_p, c_char_p, POINTER(c_void_p)]),
    ("BN_bn2binpad", c_int, [c_void_p, c_char_p, c_int]),
    ("BN_free", None, [c_void_p]),
]
# ... or, in 1.1.1, through the EC_KEY.
_EC_V1 = [
    ("EVP_PKEY_get1_EC_KEY", c_void_p, [c_void_p]),
    ("EC_KEY_free", None, [c_void_p]),
    ("EC_KEY_get0_group", c_void_p, [c_void_p]),
    ("EC_KEY_get0_public_key", c_void_p, [c_void_p]),
    ("EC_GROUP_get_curve_name", c_int, [c_void_p]),
    ("OBJ_nid2sn", c_char_p, [c_int]),
    ("EC_POINT_point2oct", c_size_t, [c_void_p, c_void_p, c_int, c_char_p, c_size_t, c_void_p]),
]


class _Unusable(Exception):
    """libcrypto cannot be used: why, for the one log line."""


class _Binding:
    """The functions of one libcrypto, declared (argtypes/restype) once."""

    def __init__(self, path: str) -> None:
        try:
            self.lib = lib = ctypes.CDLL(path)
        except OSError as exc:
            raise _Unusable(f"cannot load {exc}") from None   # the loader's text names it
        self.path = path
        self._bind(lib, _FUNCTIONS[:1])
        number = self.OpenSSL_version_num()
        if number < _MIN_VERSION:
            raise _Unusable(f"{path} is OpenSSL {number:#x}, older than 1.1.1")
        self._bind(lib, _FUNCTIONS[1:])
        try:
            self._bind(lib, _EC_V3)
            self.openssl3 = True
        except _Unusable:
            self._bind(lib, _EC_V1)
            self.openssl3 = False
        self.version = self.OpenSSL_version(0).decode("ascii", "replace")
        self.sha256 = self.EVP_sha256()

    def _bind(self, lib: ctypes.CDLL, functions: list) -> None:
        for names, restype, argtypes in functions:
            names = names if isinstance(names, tuple) else (names,)
            for name in names:
                function = getattr(lib, name, None)
                if function is not None:
                    break
            else:
                raise _Unusable(f"{self.path} has no {' or '.join(names)}")
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, names[0], function)   # called by its OpenSSL 3 name

    def read_pem(self, data: bytes, reader) -> tuple[int | None, bool]:
        """(object or None, whether it asked for a passphrase) of the first PEM block
        ``reader`` (a PEM_read_bio_* function) understands in ``data``."""
        bio = self.BIO_new_mem_buf(data, len(data))
        if not bio:
            raise MemoryError("libcrypto: BIO_new_mem_buf failed")
        asked = c_int(0)
        try:
            obj = reader(bio, None, _no_password, ctypes.addressof(asked))
        finally:
            self.BIO_free(bio)
        if not obj:
            self.ERR_clear_error()   # the queue is per thread and shared with the ssl module
        return obj or None, bool(asked.value)


_binding: _Binding | None = None
_why_not: str | None = None
_loaded = False


def _library_path() -> str | None:
    """The libcrypto mapped into this process (by ``ssl``), else the one the linker finds."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and os.path.basename(path).startswith("libcrypto"):
                    return "/" + path
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


def binding() -> _Binding | None:
    """The libcrypto binding, or None when it is not usable (or :data:`ENABLED` is false);
    loaded on first use, the outcome logged once."""
    global _binding, _why_not, _loaded
    if not ENABLED:
        return None
    if not _loaded:
        _loaded = True
        path = _library_path()
        try:
            if path is None:
                raise _Unusable("no libcrypto found")
            _binding = _Binding(path)
        except _Unusable as exc:
            _why_not = str(exc)
            log.info("signing: libcrypto not usable (%s); signing with the cryptography package",
                     _why_not)
        else:
            log.debug("signing: with %s (%s)", _binding.version, _binding.path)
    return _binding


def describe() -> str:
    """Which library signs, for ``check-config``: one line."""
    lib = binding()
    if lib is not None:
        return f"libcrypto ({lib.version}, {lib.path})"
    why = "switched off" if not ENABLED else _why_not
    return f"cryptography (libcrypto not usable: {why})"


# --------------------------------------------------------------------------- keys


class LibcryptoKey(SigningKey):
    """An EC P-256 or Ed25519 private key held by libcrypto (an ``EVP_PKEY``, freed with this
    object)."""

    __slots__ = ("alg", "_lib", "_pkey", "_md", "_jwk", "__weakref__")
    backend = "libcrypto"

    def __init__(self, lib: _Binding, pkey: int, alg: str) -> None:
        # Owns pkey from here on, whatever happens next.
        weakref.finalize(self, lib.EVP_PKEY_free, pkey)
        self._lib = lib
        self._pkey = pkey
        self.alg = alg
        # Ed25519 signs the message itself (RFC 8032: no digest); ES256 hashes with SHA-256.
        self._md = None if alg == "EdDSA" else lib.sha256
        if alg == "EdDSA":
            raw = ctypes.create_string_buffer(ED25519_SIZE)
            size = c_size_t(ED25519_SIZE)
            _check(lib, lib.EVP_PKEY_get_raw_public_key(pkey, raw, byref(size)) == 1
                   and size.value == ED25519_SIZE, "EVP_PKEY_get_raw_public_key")
            self._jwk = key_jwk(alg, raw.raw)
        else:
            self._jwk = key_jwk(alg, *_ec_point(lib, pkey))

    def public_jwk(self) -> dict[str, str]:
        return dict(self._jwk)

    def sign(self, data: bytes) -> bytes:
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("libcrypto: EVP_MD_CTX_new failed")
        signature = ctypes.create_string_buffer(_MAX_SIG)
        size = c_size_t(_MAX_SIG)
        try:
            ok = (lib.EVP_DigestSignInit(ctx, None, self._md, None, self._pkey) == 1
                  and lib.EVP_DigestSign(ctx, signature, byref(size), data, len(data)) == 1)
        finally:
            lib.EVP_MD_CTX_free(ctx)
        _check(lib, ok, "EVP_DigestSign")
        if self._md is None:
            return signature.raw[:size.value]
        return _der_to_raw(signature.raw[:size.value])


def load_private_key(path: str | os.PathLike[str]) -> LibcryptoKey:
    """The unencrypted PEM EC P-256 or Ed25519 private key in ``path``; the same errors as
    :func:`agent.uplink.signing.load_private_key`. File permissions are checked by the caller.

    :raises KeyFileError: ``"<path>: <what is wrong>"``.
    :raises RuntimeError: libcrypto is not usable (call :func:`binding` first).
    """
    lib = binding()
    if lib is None:
        raise RuntimeError("libcrypto is not usable")
    data = read_private_key_pem(path)
    pkey, asked = lib.read_pem(data, lib.PEM_read_bio_PrivateKey)
    if pkey is None:
        raise encrypted_key(path) if asked else invalid_key(path)
    try:
        kind = lib.EVP_PKEY_get_base_id(pkey)
        if kind == _EVP_PKEY_ED25519:
            alg = "EdDSA"
        elif kind == _EVP_PKEY_EC and _curve_name(lib, pkey) == _P256:
            alg = "ES256"
        else:
            raise KeyFileError(f"{path}: {unsupported_key(_describe(lib, pkey, kind))}")
    except BaseException:
        lib.EVP_PKEY_free(pkey)
        raise
    return LibcryptoKey(lib, pkey, alg)


def _describe(lib: _Binding, pkey: int, kind: int) -> str:
    """The key type as :func:`agent.uplink.signing.load_private_key` names it."""
    if kind == _EVP_PKEY_EC:
        name = _curve_name(lib, pkey)
        return f"EC {_CURVE_NAMES.get(name, name)}"
    name = _KEY_TYPES.get(kind, f"type {kind}")
    return f"{name} ({lib.EVP_PKEY_get_bits(pkey)}-bit)" if name == "RSA" else name


def _curve_name(lib: _Binding, pkey: int) -> str:
    if lib.openssl3:
        name = ctypes.create_string_buffer(80)
        size = c_size_t(0)
        if lib.EVP_PKEY_get_group_name(pkey, name, len(name), byref(size)) != 1:
            lib.ERR_clear_error()
            return "(unnamed curve)"
        return name.value.decode("ascii", "replace")
    ec_key = lib.EVP_PKEY_get1_EC_KEY(pkey)
    _check(lib, bool(ec_key), "EVP_PKEY_get1_EC_KEY")
    try:
        sn = lib.OBJ_nid2sn(lib.EC_GROUP_get_curve_name(lib.EC_KEY_get0_group(ec_key)))
    finally:
        lib.EC_KEY_free(ec_key)
    return sn.decode("ascii", "replace") if sn else "(unnamed curve)"


def _ec_point(lib: _Binding, pkey: int) -> tuple[bytes, bytes]:
    """(x, y) of a P-256 key's public point, 32 big-endian bytes each."""
    if lib.openssl3:
        coordinates = []
        for name in (b"qx", b"qy"):
            bn = c_void_p()
            _check(lib, lib.EVP_PKEY_get_bn_param(pkey, name, byref(bn)) == 1,
                   "EVP_PKEY_get_bn_param")
            try:
                out = ctypes.create_string_buffer(P256_SIZE)
                _check(lib, lib.BN_bn2binpad(bn, out, P256_SIZE) == P256_SIZE, "BN_bn2binpad")
            finally:
                lib.BN_free(bn)
            coordinates.append(out.raw)
        return coordinates[0], coordinates[1]
    ec_key = lib.EVP_PKEY_get1_EC_KEY(pkey)
    _check(lib, bool(ec_key), "EVP_PKEY_get1_EC_KEY")
    try:
        out = ctypes.create_string_buffer(1 + 2 * P256_SIZE)
        size = lib.EC_POINT_point2oct(lib.EC_KEY_get0_group(ec_key),
                                      lib.EC_KEY_get0_public_key(ec_key),
                                      _POINT_CONVERSION_UNCOMPRESSED, out, len(out), None)
    finally:
        lib.EC_KEY_free(ec_key)
    _check(lib, size == len(out), "EC_POINT_point2oct")
    return out.raw[1:1 + P256_SIZE], out.raw[1 + P256_SIZE:]


def _der_to_raw(der: bytes) -> bytes:
    """ECDSA-Sig-Value ``SEQUENCE { INTEGER r, INTEGER s }`` (DER, as OpenSSL signs) to the
    fixed-width r || s of JWS (RFC 7518 3.4). P-256 lengths are all short-form."""
    if len(der) < 8 or der[0] != 0x30 or der[1] != len(der) - 2:
        raise ValueError("libcrypto: not a DER ECDSA signature")
    out = b""
    at = 2
    for _ in range(2):
        if der[at] != 0x02:
            raise ValueError("libcrypto: not a DER ECDSA signature")
        size = der[at + 1]
        number = der[at + 2:at + 2 + size].lstrip(b"\0")
        if size > P256_SIZE + 1 or len(number) > P256_SIZE:
            raise ValueError("libcrypto: not a DER ECDSA signature")
        out += number.rjust(P256_SIZE, b"\0")
        at += 2 + size
    if at != len(der):
        raise ValueError("libcrypto: not a DER ECDSA signature")
    return out


def _check(lib: _Binding, ok: bool, what: str) -> None:
    if not ok:
        lib.ERR_clear_error()
        raise RuntimeError(f"libcrypto: {what} failed")


# --------------------------------------------------------------------------- certificates


def certificate_validity(data: bytes) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter), UTC, of the first PEM certificate in ``data``.

    :raises ValueError: no PEM certificate in ``data``, or a date libcrypto cannot read.
    :raises RuntimeError: libcrypto is not usable (call :func:`binding` first).
    """
    lib = binding()
    if lib is None:
        raise RuntimeError("libcrypto is not usable")
    cert, _ = lib.read_pem(data, lib.PEM_read_bio_X509)
    if cert is None:
        raise ValueError("not a PEM certificate")
    try:
        return _time(lib, lib.X509_get0_notBefore(cert)), _time(lib, lib.X509_get0_notAfter(cert))
    finally:
        lib.X509_free(cert)


def _time(lib: _Binding, asn1_time: int) -> dt.datetime:
    tm = _Tm()
    if not asn1_time or lib.ASN1_TIME_to_tm(asn1_time, byref(tm)) != 1:
        lib.ERR_clear_error()
        raise ValueError("unreadable validity date")
    return dt.datetime(tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                       tm.tm_sec, tzinfo=dt.timezone.utc)
