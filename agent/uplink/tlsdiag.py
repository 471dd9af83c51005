"""Why a TLS/MQTT connection failed, in one line a person can act on.

Shared by the agent's uplink and the cloud watcher. With TLS 1.3 a broker checks the client
certificate after the handshake, so its refusal surfaces as a bare disconnect and the alert
text reaches paho's log only sometimes; :func:`probe_tls12` then asks again with a handshake
capped at TLS 1.2, during which the broker's alert is always raised.
"""

from __future__ import annotations

import re
import socket
import ssl

def _short(exc: BaseException) -> str:
    text = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(text).splitlines()[0][:200] if text else type(exc).__name__


class ClosingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho does not close the socket when ``do_handshake()`` raises, which leaks a file
    descriptor (and a ResourceWarning) on every failed attempt while retrying.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


_ALERT_RE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_ALERT_MEANING = {
    "TLSV1_ALERT_UNKNOWN_CA": "it was not issued by a CA the broker trusts",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired or is not valid yet "
                                       "(or the broker's CRL has expired)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no client certificate was sent",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it has been revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker finds it unacceptable (e.g. wrong key usage)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsuitable purpose or key usage",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the broker could not verify it",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}


def describe_tls_alert(text: str) -> str | None:
    """One line for a TLS alert named in an error text (``[SSL: NAME] ...``), or None."""
    match = _ALERT_RE.search(text)
    if not match:
        return None
    name = match.group(1)
    if "ALERT" not in name:
        return None
    if name in _ALERT_MEANING or "CERTIFICATE" in name or "UNKNOWN_CA" in name:
        meaning = _ALERT_MEANING.get(name, "rejected")
        return f"broker refused the client certificate: {name} ({meaning})"
    return f"TLS handshake refused by the broker: {name}"


def describe_connect_error(exc: BaseException, host: str, port: int) -> str:
    """One line for an exception raised while connecting."""
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or _short(exc)
        if "mismatch" in detail.lower():
            return (f"broker {where} is not trusted: {detail.rstrip('.')} (its certificate "
                    "names other hosts; check mqtt.host)")
        return f"broker {where} is not trusted: {detail} (check mqtt.ca)"
    if isinstance(exc, ssl.CertificateError):  # hostname mismatch on old Pythons
        return f"broker {where} is not trusted: {_short(exc)} (check mqtt.host and mqtt.ca)"
    if isinstance(exc, ssl.SSLError):
        alert = describe_tls_alert(str(exc))
        return alert or f"TLS error with {where}: {exc.reason or _short(exc)}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where} (is the broker running?)"
    if isinstance(exc, TimeoutError):
        return f"timed out connecting to {where}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {exc.strerror or exc}"
    if isinstance(exc, ConnectionResetError):
        return f"connection to {where} reset during the TLS handshake"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or _short(exc)}"
    return f"cannot connect to {where}: {type(exc).__name__}: {_short(exc)}"


def probe_tls12(context: ssl.SSLContext, host: str, port: int, timeout: float = 5.0) -> str | None:
    """Why the broker refuses our client certificate, learnt by a TLS 1.2 handshake.

    ``context`` must be a fresh client context (it is capped at TLS 1.2 here). None if that
    handshake succeeds or fails for a reason other than the certificate.
    """
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except (OSError, ValueError) as exc:
        text = describe_connect_error(exc, host, port)
        return text if text.startswith("broker refused the client certificate") else None
