"""Certificate revocation: the dev PKI's CRL, mosquitto's ``crlfile``, the verifier's ``crl:``.

Broker tests run a real mosquitto (SIGHUP reload of the CRL); verifier tests use
MessageChecker directly, plus one end-to-end run of CloudWatcher over the real broker.
Every test that revokes makes its own PKI: the session PKI of conftest stays untouched.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws
from conftest import require_mosquitto, running_broker
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud.checks import MessageChecker
from agent.cloud.config import load_cloud_config
from agent.cloud.revocation import CrlTrust
from agent.cloud.watch import CloudWatcher
from agent.dev.broker import DevBroker
from agent.errors import ConfigError, UserError
from agent.dev.pki import _issue, _load_ca, init_ca, init_crl, init_pki, revoke
from agent.uplink.signing import DOCUMENT_SIGNING, Signer, Verifier, load_private_key
from agent.uplink.tlsdiag import ClosingSSLSocket, describe_connect_error, probe_tls12

VINS = ["VIN1", "VIN2"]
RANGE = "Vehicle.Powertrain.FuelSystem.Range"
OPENSSL = shutil.which("openssl")
UTC = dt.timezone.utc


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def make_claims(seq: int, vid: str = "VIN1") -> dict[str, Any]:
    return {"vid": vid, "seq": seq, "boot": 1, "ts": 1_700_000_000_000 + seq,
            "signals": {RANGE: 400000}, "kind": "event"}


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


def _serial(path: Path) -> int:
    return _cert(path).serial_number


@pytest.fixture
def rpki(tmp_path: Path) -> Path:
    """A fresh PKI (VIN1, VIN2) with an empty CRL, for tests that revoke."""
    directory = tmp_path / "pki"
    init_pki(directory, VINS)
    init_crl(directory)
    return directory


class Checker:
    """MessageChecker with a CrlTrust on ``pki``; signs and checks in one call."""

    def __init__(self, pki: Path, *, jwks: Path | None = None, crl: Path | None = None,
                 revocation: bool = True) -> None:
        self.problems: list[str] = []
        self.trust = (CrlTrust(crl or pki / "crl.pem", pki / "ca.crt",
                               on_problem=self.problems.append) if revocation else None)
        self.checker = MessageChecker(Verifier.from_jwks_file(jwks or pki / "jwks.json"),
                                      revocation=self.trust)
        self.signers = {vin: Signer.from_file(pki / f"{vin}.signing.key") for vin in VINS}
        self.seq = {vin: 0 for vin in VINS}

    def send(self, vin: str) -> dict[str, Any]:
        self.seq[vin] += 1
        token = self.signers[vin].sign(make_claims(self.seq[vin], vin))
        return self.checker.check(f"vehicles/{vin}/events", token.encode())


def _jwks_with(pki: Path, vin: str, change: Callable[[dict[str, Any]], None], out: Path) -> Path:
    """A copy of the PKI's jwks.json with ``change`` applied to ``vin``'s key."""
    data = json.loads((pki / "jwks.json").read_text())
    for key in data["keys"]:
        if key["vid"] == vin:
            change(key)
    out.write_text(json.dumps(data))
    return out


def _x5c(cert: x509.Certificate) -> list[str]:
    return [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")]


# --------------------------------------------------------------------------- PKI


def test_signing_certificate_and_x5c(rpki: Path) -> None:
    ca = _cert(rpki / "ca.crt")
    jwks = {k["vid"]: k for k in json.loads((rpki / "jwks.json").read_text())["keys"]}
    for vin in VINS:
        cert = _cert(rpki / f"{vin}.signing.crt")
        assert (rpki / f"{vin}.signing.crt").stat().st_mode & 0o777 == 0o644
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == vin
        cert.verify_directly_issued_by(ca)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature
        assert not (ku.value.key_encipherment or ku.value.key_cert_sign or ku.value.crl_sign
                    or ku.value.content_commitment or ku.value.key_agreement)
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) \
            == [DOCUMENT_SIGNING]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        # It certifies the signing key, not the TLS key, and lives as long as the TLS cert.
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_key = load_private_key(rpki / f"{vin}.signing.key").public_key()
        assert cert.public_key().public_bytes(*spki) == signing_key.public_bytes(*spki)
        tls = _cert(rpki / f"{vin}.crt")
        assert cert.serial_number != tls.serial_number
        assert abs(cert.not_valid_after_utc - tls.not_valid_after_utc) < dt.timedelta(minutes=1)
        # The JWK carries it (RFC 7517 4.7: standard base64 DER), next to kid and vid.
        key = jwks[vin]
        assert key["kid"] == Signer.from_file(rpki / f"{vin}.signing.key").kid
        assert key["x5c"] == _x5c(cert)
        assert Verifier.from_jwks_file(rpki / "jwks.json").certificate(key["kid"]) == cert


def test_jwcrypto_verifies_with_an_x5c_jwk(rpki: Path) -> None:
    key = json.loads((rpki / "jwks.json").read_text())["keys"][0]
    token = Signer.from_file(rpki / f"{key['vid']}.signing.key").sign(make_claims(1, key["vid"]))
    obj = jw_jws.JWS()
    obj.deserialize(token)
    obj.verify(jw_jwk.JWK(**key))
    assert json.loads(obj.payload)["vid"] == key["vid"]


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
def test_openssl_refuses_the_signing_certificate_for_tls(rpki: Path) -> None:
    result = subprocess.run([OPENSSL, "verify", "-CAfile", str(rpki / "ca.crt"), "-purpose",
                             "sslclient", str(rpki / "VIN1.signing.crt")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in result.stdout + result.stderr


def test_rerun_gives_old_vehicles_signing_certificates(tmp_path: Path) -> None:
    init_pki(tmp_path, VINS)
    keys = {v: (tmp_path / f"{v}.signing.key").read_bytes() for v in VINS}
    for vin in VINS:  # a PKI from before signing certificates existed
        (tmp_path / f"{vin}.signing.crt").unlink()
    result = init_pki(tmp_path, [])
    assert set(result["created"]) == {tmp_path / f"{v}.signing.crt" for v in VINS}
    assert result["vehicles_added"] == []
    assert {v: (tmp_path / f"{v}.signing.key").read_bytes() for v in VINS} == keys
    assert all("x5c" in k for k in json.loads((tmp_path / "jwks.json").read_text())["keys"])
    again = init_pki(tmp_path, VINS)
    assert again["created"] == [] and again["vehicles_added"] == []


def test_rerun_refuses_a_signing_certificate_for_another_key(tmp_path: Path) -> None:
    init_pki(tmp_path, VINS)
    shutil.copy(tmp_path / "VIN2.signing.crt", tmp_path / "VIN1.signing.crt")
    with pytest.raises(UserError, match=r"VIN1\.signing\.crt: does not match"):
        init_pki(tmp_path, [])


def test_init_crl_is_empty_and_signed_by_the_ca(rpki: Path) -> None:
    crl = _crl(rpki / "crl.pem")
    assert (rpki / "crl.pem").stat().st_mode & 0o777 == 0o644
    assert len(crl) == 0
    assert crl.issuer == _cert(rpki / "ca.crt").subject
    assert crl.is_signature_valid(_cert(rpki / "ca.crt").public_key())  # type: ignore[arg-type]
    assert crl.last_update_utc <= _now()
    assert dt.timedelta(days=29) < crl.next_update_utc - _now() <= dt.timedelta(days=30)


def test_revoke_lists_tls_and_signing_certificates(rpki: Path) -> None:
    number = _crl(rpki / "crl.pem").extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    path = revoke(rpki, "VIN1", "key-compromise")
    assert path == rpki / "crl.pem"
    crl = _crl(path)
    vin1 = {_serial(rpki / "VIN1.crt"), _serial(rpki / "VIN1.signing.crt")}
    assert {entry.serial_number for entry in crl} == vin1
    for entry in crl:
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
            == x509.ReasonFlags.key_compromise
    assert crl.is_signature_valid(_cert(rpki / "ca.crt").public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    first_dates = {e.serial_number: e.revocation_date_utc for e in crl}

    # Anything already revoked stays; revoking again keeps the first entry as it was.
    revoke(rpki, "VIN2")
    revoke(rpki, "VIN1", "superseded")
    crl = _crl(path)
    vin2 = {_serial(rpki / "VIN2.crt"), _serial(rpki / "VIN2.signing.crt")}
    assert {entry.serial_number for entry in crl} == vin1 | vin2
    assert {s: e.revocation_date_utc for s, e in ((e.serial_number, e) for e in crl)
            if s in vin1} == first_dates
    # "unspecified" carries no reason code (RFC 5280 5.3.1).
    assert all(not list(e.extensions) for e in crl if e.serial_number in vin2)
    # Renewing keeps every entry.
    init_crl(rpki, days=7)
    crl = _crl(path)
    assert {entry.serial_number for entry in crl} == vin1 | vin2
    assert crl.next_update_utc - _now() <= dt.timedelta(days=7)


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
def test_openssl_sees_the_revocation(rpki: Path) -> None:
    revoke(rpki, "VIN1")

    def verify(name: str) -> subprocess.CompletedProcess[str]:
        assert OPENSSL is not None
        return subprocess.run([OPENSSL, "verify", "-CAfile", str(rpki / "ca.crt"), "-crl_check",
                               "-CRLfile", str(rpki / "crl.pem"), str(rpki / name)],
                              capture_output=True, text=True, timeout=30)

    for name in ("VIN1.crt", "VIN1.signing.crt"):
        result = verify(name)
        assert result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr
    assert verify("VIN2.crt").returncode == 0


def test_revoke_errors(rpki: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no vehicle 'VIN9'"):
        revoke(rpki, "VIN9")
    with pytest.raises(UserError, match="vehicle id"):
        revoke(rpki, "../VIN1")
    with pytest.raises(UserError, match="revocation reason 'bored'"):
        revoke(rpki, "VIN1", "bored")
    (rpki / "VIN2.signing.crt").rename(tmp_path / "kept.crt")
    with pytest.raises(UserError, match=r"VIN2\.signing\.crt: not found; run `car-agent pki init"):
        revoke(rpki, "VIN2")
    other = tmp_path / "other"
    init_ca(other, "some other CA")
    shutil.copy(init_crl(other), rpki / "crl.pem")
    with pytest.raises(UserError, match="crl.pem: not signed by the CA"):
        revoke(rpki, "VIN1")
    (rpki / "crl.pem").write_text("garbage")
    with pytest.raises(UserError, match="crl.pem: not a CRL"):
        revoke(rpki, "VIN1")


# --------------------------------------------------------------------------- verifier


def test_revocation_applies_without_restart(rpki: Path) -> None:
    c = Checker(rpki)
    assert c.send("VIN1")["verified"] is True
    assert c.send("VIN2")["verified"] is True

    revoke(rpki, "VIN1")
    record = c.send("VIN1")
    serial = _serial(rpki / "VIN1.signing.crt")
    assert record == {"topic": "vehicles/VIN1/events", "verified": False, "seq": 2,
                      "rejected": f"signing key revoked (certificate serial 0x{serial:X})"}
    assert c.send("VIN2")["verified"] is True
    assert c.problems == []  # a revoked vehicle is not a problem of the CRL
    # A rejected message does not use up its seq.
    assert not c.checker.tracker.seen("VIN1", 2)


def test_crl_in_der_works(rpki: Path, tmp_path: Path) -> None:
    revoke(rpki, "VIN1")
    der = tmp_path / "crl.der"
    der.write_bytes(_crl(rpki / "crl.pem").public_bytes(serialization.Encoding.DER))
    c = Checker(rpki, crl=der)
    assert c.send("VIN1")["rejected"].startswith("signing key revoked")
    assert c.send("VIN2")["verified"] is True


def test_expired_crl_rejects_everything_and_is_reported_once(rpki: Path) -> None:
    init_crl(rpki, now=_now() - dt.timedelta(days=40), days=30)
    next_update = _crl(rpki / "crl.pem").next_update_utc
    c = Checker(rpki)  # not an error at start: renewing the file must be enough
    text = next_update.isoformat(timespec="seconds").replace("+00:00", "Z")
    for vin in ("VIN1", "VIN2", "VIN1"):
        record = c.send(vin)
        assert record["verified"] is False
        assert record["rejected"] == f"CRL expired (next update {text})"
    assert len(c.problems) == 1 and f"CRL expired (next update {text})" in c.problems[0]

    init_crl(rpki)  # renewed: accepted again, no restart
    assert c.send("VIN1")["verified"] is True
    assert len(c.problems) == 1


def test_crl_that_expires_while_running(rpki: Path) -> None:
    clock = [_now()]
    c = Checker(rpki, revocation=False)
    c.trust = CrlTrust(rpki / "crl.pem", rpki / "ca.crt", on_problem=c.problems.append,
                       clock=lambda: clock[0])
    c.checker.revocation = c.trust
    assert c.send("VIN1")["verified"] is True
    clock[0] += dt.timedelta(days=31)
    assert c.send("VIN1")["rejected"].startswith("CRL expired (next update ")
    assert len(c.problems) == 1


def test_crl_from_a_foreign_ca_is_a_config_error(rpki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, "some other CA")
    with pytest.raises(ConfigError, match=r"^crl: .*crl\.pem: not signed by the CA in mqtt\.ca"):
        CrlTrust(init_crl(other), rpki / "ca.crt")
    # Through the cloud config: the error names the file and the key.
    config = tmp_path / "cloud.yaml"
    config.write_text(f"mqtt: {{host: 127.0.0.1, ca: {rpki / 'ca.crt'}, cert: {rpki / 'cloud.crt'}, "
                      f"key: {rpki / 'cloud.key'}}}\ntrust: {rpki / 'jwks.json'}\n"
                      f"crl: {other / 'crl.pem'}\n")
    with pytest.raises(ConfigError, match=r"cloud\.yaml: crl: .*not signed by the CA in mqtt\.ca"):
        CloudWatcher(load_cloud_config(config), lambda record: None)


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"garbage", "not a CRL"),
    (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "not a CRL"),
])
def test_unusable_crl_at_start(rpki: Path, tmp_path: Path, content: bytes | None,
                               message: str) -> None:
    path = tmp_path / "crl.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"crl: .*{message}"):
        CrlTrust(path, rpki / "ca.crt")


def test_crl_broken_while_running_fails_closed(rpki: Path, tmp_path: Path) -> None:
    c = Checker(rpki)
    assert c.send("VIN1")["verified"] is True
    (rpki / "crl.pem").rename(tmp_path / "crl.pem")
    record = c.send("VIN1")
    assert record["rejected"].startswith("CRL unusable (") and "file not found" in record["rejected"]
    (tmp_path / "crl.pem").rename(rpki / "crl.pem")
    assert c.send("VIN1")["verified"] is True
    assert len(c.problems) == 1


def test_jwk_without_x5c(rpki: Path, tmp_path: Path) -> None:
    jwks = _jwks_with(rpki, "VIN1", lambda key: key.pop("x5c"), tmp_path / "jwks.json")
    c = Checker(rpki, jwks=jwks)
    assert c.send("VIN1")["rejected"] == "signing key has no certificate to check against the CRL"
    assert c.send("VIN2")["verified"] is True
    # Without a CRL nothing changes: such keys verify as before.
    assert Checker(rpki, jwks=jwks, revocation=False).send("VIN1")["verified"] is True


def test_no_crl_configured_ignores_certificates(rpki: Path) -> None:
    revoke(rpki, "VIN1")
    c = Checker(rpki, revocation=False)
    assert c.checker.revocation is None
    assert c.send("VIN1")["verified"] is True


def _craft(rpki: Path, tmp_path: Path, *, ca_dir: Path | None = None, cn: str = "VIN1",
           signing: bool = True, days: tuple[int, int] = (-1, 30)) -> Path:
    """jwks.json where VIN1's key carries a certificate made here instead of its own."""
    ca = _load_ca(ca_dir or rpki)
    key = load_private_key(rpki / "VIN1.signing.key")
    now = _now()
    cert = _issue(ca, cn, key, server=False, signing=signing,  # type: ignore[arg-type]
                  not_before=now + dt.timedelta(days=days[0]),
                  not_after=now + dt.timedelta(days=days[1]))
    return _jwks_with(rpki, "VIN1", lambda k: k.update(x5c=_x5c(cert)), tmp_path / "jwks.json")


def test_certificate_checks(rpki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, "some other CA")
    cases = [
        ({"ca_dir": other}, "signing certificate not issued by the CRL's CA (CN=car-agent dev CA)"),
        ({"cn": "VIN2"}, "signing certificate has CN 'VIN2', not the vid claim 'VIN1'"),
        ({"days": (-30, -1)}, "signing certificate expired (not after "),
        ({"days": (1, 30)}, "signing certificate not valid yet (not before "),
        ({"signing": False},  # a TLS client certificate (EKU clientAuth) for the signing key
         "signing certificate's extended key usage does not include documentSigning"),
    ]
    for kwargs, reason in cases:
        c = Checker(rpki, jwks=_craft(rpki, tmp_path, **kwargs))
        assert c.send("VIN1")["rejected"].startswith(reason), kwargs
        assert c.send("VIN2")["verified"] is True
    # The same certificate, freshly issued by our CA for the right CN, is fine.
    assert Checker(rpki, jwks=_craft(rpki, tmp_path)).send("VIN1")["verified"] is True


@pytest.mark.parametrize("x5c, message", [
    ("not a list", "'x5c' must be a non-empty array"),
    ([], "'x5c' must be a non-empty array"),
    (["!!!"], r"'x5c'\[0\] is not base64"),
    ([base64.b64encode(b"not DER").decode()], r"'x5c'\[0\] is not a DER X\.509 certificate"),
])
def test_malformed_x5c_is_a_config_error(rpki: Path, tmp_path: Path, x5c: Any,
                                         message: str) -> None:
    jwks = _jwks_with(rpki, "VIN1", lambda k: k.update(x5c=x5c), tmp_path / "jwks.json")
    with pytest.raises(ConfigError, match=r"jwks\.json: keys\[0\]: " + message):
        Verifier.from_jwks_file(jwks)


def test_x5c_for_another_key_is_a_config_error(rpki: Path, tmp_path: Path) -> None:
    vin2 = _x5c(_cert(rpki / "VIN2.signing.crt"))
    jwks = _jwks_with(rpki, "VIN1", lambda k: k.update(x5c=vin2), tmp_path / "jwks.json")
    with pytest.raises(ConfigError, match=r"keys\[0\]: 'x5c'\[0\] certifies a different key"):
        Verifier.from_jwks_file(jwks)


def test_cloud_config_crl_key(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "cloud.yaml"
    path.parent.mkdir()
    base = "mqtt: {host: h, ca: ca.crt, cert: c.crt, key: c.key}\ntrust: jwks.json\n"
    path.write_text(base)
    assert load_cloud_config(path).crl is None
    path.write_text(base + "crl: ../pki/crl.pem\n")
    assert load_cloud_config(path).crl == path.parent / "../pki/crl.pem"
    path.write_text(base + "crl: [a]\n")
    with pytest.raises(ConfigError, match=r"cloud\.yaml: crl: expected a string"):
        load_cloud_config(path)


def test_expired_crl_is_reported_when_the_watcher_is_made(rpki: Path, tmp_path: Path) -> None:
    init_crl(rpki, now=_now() - dt.timedelta(days=40), days=30)
    config = _cloud_yaml(tmp_path, rpki, 1)
    problems: list[str] = []
    CloudWatcher(load_cloud_config(config), lambda record: None, on_problem=problems.append)
    assert len(problems) == 1 and "CRL expired (next update " in problems[0]


# --------------------------------------------------------------------------- real broker


@pytest.fixture
def crl_broker(rpki: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DevBroker]:
    """A DevBroker on ``rpki`` whose listener checks ``crl.pem`` (``crlfile``)."""
    # extra_conf lands after the listener's TLS settings, so crlfile applies to it.
    dev = DevBroker(rpki, tmp_path / "broker", extra_conf=f"crlfile {rpki / 'crl.pem'}")
    yield from running_broker(dev, request)


def _context(pki: Path, name: str, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = ClosingSSLSocket  # paho leaves a failed handshake's socket open
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
    return ctx


def _mqtt_connect(port: int, ctx: ssl.SSLContext, client_id: str,
                  timeout: float = 5.0) -> tuple[bool, str]:
    """Connect a paho MQTT 5 client; (True, "") on a successful CONNACK, else (False, why).

    With TLS 1.3 the broker refuses a client certificate after the handshake, so a
    refusal shows up as a closed connection, not as an exception from connect().
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        result["connack"] = reason
        done.set()

    def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        result.setdefault("disconnect", str(reason))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except (OSError, ValueError) as exc:
        return False, describe_connect_error(exc, "127.0.0.1", port)
    deadline = time.monotonic() + timeout
    try:
        while not done.is_set() and time.monotonic() < deadline:
            if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                result.setdefault("disconnect", "connection lost")
                break
        connack = result.get("connack")
        if connack is not None and not connack.is_failure:
            client.disconnect()
            return True, ""
        return False, str(connack or result.get("disconnect", "timeout"))
    finally:
        reset = getattr(client, "_reset_sockets", None)
        if callable(reset):
            reset()


def _wait_refused(port: int, ctx_factory: Callable[[], ssl.SSLContext], name: str,
                  timeout: float = 5.0) -> str:
    """After a SIGHUP the broker re-reads the CRL asynchronously: retry until refused."""
    deadline = time.monotonic() + timeout
    while True:
        ok, why = _mqtt_connect(port, ctx_factory(), f"{name}-after")
        if not ok:
            return why
        assert time.monotonic() < deadline, f"{name} still accepted {timeout} s after SIGHUP"
        time.sleep(0.1)


def test_broker_needs_the_crl_file(tmp_path: Path) -> None:
    """Why init_crl exists: mosquitto does not start when crlfile names a missing file."""
    require_mosquitto()
    pki = tmp_path / "pki"
    init_pki(pki, ["VIN1"])
    broker = DevBroker(pki, tmp_path / "broker", extra_conf=f"crlfile {pki / 'crl.pem'}")
    with pytest.raises(RuntimeError, match="crlfile"):
        broker.start()
    init_crl(pki)
    with broker:
        ok, why = _mqtt_connect(broker.port, _context(pki, "VIN1"), "VIN1-empty-crl")
        assert ok, why


def test_broker_refuses_a_revoked_vehicle_after_sighup(rpki: Path, crl_broker: DevBroker) -> None:
    port = crl_broker.port
    for vin in VINS:  # an empty CRL lets everyone in
        assert _mqtt_connect(port, _context(rpki, vin), f"{vin}-before") == (True, "")

    revoke(rpki, "VIN2", "key-compromise")
    crl_broker.reload()  # SIGHUP: no restart
    _wait_refused(port, lambda: _context(rpki, "VIN2"), "VIN2")
    assert _mqtt_connect(port, _context(rpki, "VIN1"), "VIN1-after") == (True, "")

    # Why: a TLS 1.2 handshake makes the broker say it (TLS 1.3 reports it after the fact).
    why = probe_tls12(_context(rpki, "VIN2"), "127.0.0.1", port)
    assert why == ("broker refused the client certificate: SSLV3_ALERT_CERTIFICATE_REVOKED "
                   "(it has been revoked)")
    ok, why = _mqtt_connect(port, _context(rpki, "VIN2", tls12=True), "VIN2-tls12")
    assert not ok and "revoked" in why
    assert "certificate verify failed" in crl_broker.log_text()


def test_broker_refuses_the_signing_certificate_as_a_tls_certificate(
        rpki: Path, crl_broker: DevBroker) -> None:
    shutil.copy(rpki / "VIN1.signing.crt", rpki / "VIN1sig.crt")
    shutil.copy(rpki / "VIN1.signing.key", rpki / "VIN1sig.key")
    why = probe_tls12(_context(rpki, "VIN1sig"), "127.0.0.1", crl_broker.port)
    assert why is not None and "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE" in why


def test_broker_with_an_expired_crl_locks_everyone_out(rpki: Path, crl_broker: DevBroker) -> None:
    """mosquitto's behaviour the verifier mirrors: an expired CRL lets nobody in."""
    port = crl_broker.port
    init_crl(rpki, now=_now() - dt.timedelta(days=40), days=30)
    crl_broker.reload()
    _wait_refused(port, lambda: _context(rpki, "VIN1"), "VIN1")
    why = probe_tls12(_context(rpki, "VIN1"), "127.0.0.1", port)
    assert why is not None and "SSLV3_ALERT_CERTIFICATE_EXPIRED" in why and "CRL" in why
    init_crl(rpki)
    crl_broker.reload()
    deadline = time.monotonic() + 5
    while _mqtt_connect(port, _context(rpki, "VIN1"), "VIN1-renewed") != (True, ""):
        assert time.monotonic() < deadline, "VIN1 still refused after the CRL was renewed"
        time.sleep(0.1)


# --------------------------------------------------------------------------- end to end


def _cloud_yaml(tmp_path: Path, pki: Path, port: int) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text(
        "mqtt:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        f"  ca: {pki / 'ca.crt'}\n"
        f"  cert: {pki / 'cloud.crt'}\n"
        f"  key: {pki / 'cloud.key'}\n"
        "  reconnect_min_s: 0.1\n"
        "  reconnect_max_s: 0.5\n"
        f"trust: {pki / 'jwks.json'}\n"
        f"crl: {pki / 'crl.pem'}\n", encoding="utf-8")
    return path


class _Publisher:
    """A connected vehicle client that waits for each PUBACK."""

    def __init__(self, port: int, ctx: ssl.SSLContext, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(ctx)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(self, topic: str, payload: str) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_watcher_rejects_a_revoked_signing_key_without_restart(rpki: Path,
                                                               tmp_path: Path) -> None:
    require_mosquitto()
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    cond = threading.Condition()

    def on_message(record: dict[str, Any]) -> None:
        with cond:
            records.append(record)
            cond.notify_all()

    def wait_for(n: int) -> dict[str, Any]:
        with cond:
            assert cond.wait_for(lambda: len(records) >= n, 5), (records, problems)
            return records[n - 1]

    # This broker has no crlfile: it keeps carrying VIN1's messages after the revocation,
    # as one that has not been reloaded yet would, so the verifier is what must refuse them.
    with DevBroker(rpki, tmp_path / "broker") as broker:
        config = load_cloud_config(_cloud_yaml(tmp_path, rpki, broker.port))
        watcher = CloudWatcher(config, on_message, on_problem=problems.append)
        signers = {vin: Signer.from_file(rpki / f"{vin}.signing.key") for vin in VINS}
        pubs = {vin: _Publisher(broker.port, _context(rpki, vin), f"{vin}-pub") for vin in VINS}
        try:
            watcher.start()
            assert watcher.connected.wait(5), problems
            pubs["VIN1"].publish("vehicles/VIN1/events", signers["VIN1"].sign(make_claims(1)))
            assert wait_for(1)["verified"] is True

            revoke(rpki, "VIN1")  # the watcher keeps running
            pubs["VIN1"].publish("vehicles/VIN1/events", signers["VIN1"].sign(make_claims(2)))
            record = wait_for(2)
            serial = _serial(rpki / "VIN1.signing.crt")
            assert record["verified"] is False and record["seq"] == 2
            assert record["rejected"] == f"signing key revoked (certificate serial 0x{serial:X})"

            pubs["VIN2"].publish("vehicles/VIN2/events",
                                 signers["VIN2"].sign(make_claims(1, "VIN2")))
            record = wait_for(3)
            assert record["verified"] is True and record["vid"] == "VIN2"
            assert problems == []
        finally:
            watcher.stop()
            for pub in pubs.values():
                pub.close()
