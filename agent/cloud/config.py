"""The cloud side's configuration (``watch``, ``status``, ``serve``): YAML in, a frozen
:class:`CloudConfig` out, and the TLS client context it describes.

Keys (relative paths are relative to the config file)::

    mqtt:
      host: localhost
      port: 8883
      ca: pki/ca.crt          # CA that issued the broker's certificate
      cert: pki/cloud.crt     # the cloud client's certificate ...
      key: pki/cloud.key      # ... and its key
      topic_prefix: vehicles  # optional, default "vehicles"
    trust: pki/jwks.json      # JWK Set of the vehicles' signing keys
    crl: pki/crl.pem          # optional: CRL of the CA in mqtt.ca (see agent.cloud.revocation)

``serve`` only (``watch`` and ``status`` ignore them)::

    mqtt:
      share_group: serve      # optional: subscribe via $share/<name>/... (several instances)
    store:
      url: sqlite:///state.db # default; sqlite:////abs/path, or postgresql://...
      history: 1000           # verified messages kept per vehicle (the newest)
    http:
      listen: 127.0.0.1:8080  # HOST:PORT ([::1]:8080 for IPv6)
      cert: tls/server.crt    # HTTPS; required for a non-loopback host ...
      key: tls/server.key
      insecure: false         # ... unless this is true (TLS ends at a proxy)
      rate: 5                 # requests per second per token (sustained) ...
      burst: 20               # ... and in a burst
    owners: owners.yaml       # tokens' SHA-256 and their vehicles (car-agent owner add)
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import KeyFileError
from agent.schema import Section, load_yaml
from agent.uplink.tlsdiag import (
    ClosingSSLSocket,
    _short,
)

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StoreConfig:
    url: str                    # as written (sqlite:///... or postgresql://...)
    history: int = 1000


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    rate: float = 5.0
    burst: int = 20

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


@dataclass(frozen=True)
class CloudConfig:
    """A validated cloud (watcher) config."""

    file: Path
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    trust: Path
    topic_prefix: str = "vehicles"
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    crl: Path | None = None
    share_group: str | None = None
    store: StoreConfig = field(default_factory=lambda: StoreConfig("sqlite:///state.db"))
    http: HttpConfig = field(default_factory=HttpConfig)
    owners: Path | None = None


_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _parse_listen(section: Section, key: str) -> tuple[str, int]:
    text = section.text(key, "127.0.0.1:8080")
    assert text is not None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise section.error(key, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080)")
    return host, int(port)


def _store(top: Section) -> StoreConfig:
    s = top.section("store")
    if s is None:
        return StoreConfig(url="sqlite:///state.db")
    s.reject_unknown(("url", "history"))
    url = s.text("url", "sqlite:///state.db")
    assert url is not None
    if not (url.startswith("sqlite:///") or url.startswith(("postgresql://", "postgres://"))):
        raise s.error("url", f"{url[:60]!r}: expected sqlite:///PATH or postgresql://...")
    return StoreConfig(url=url, history=s.integer("history", 1000, minimum=1, maximum=1_000_000))


def _http(top: Section) -> HttpConfig:
    h = top.section("http")
    if h is None:
        return HttpConfig()
    h.reject_unknown(("listen", "cert", "key", "insecure", "rate", "burst"))
    host, port = _parse_listen(h, "listen")
    cert, key = h.path_value("cert"), h.path_value("key")
    if (cert is None) != (key is None):
        raise h.error("cert" if cert is None else "key", "missing (http.cert and http.key go "
                                                         "together)")
    return HttpConfig(host=host, port=port, cert=cert, key=key,
                      insecure=bool(h.get("insecure", bool, False)),
                      rate=float(h.number("rate", 5.0, minimum=0.01)),
                      burst=h.integer("burst", 20, minimum=1, maximum=100_000))


def load_cloud_config(path: str | Path) -> CloudConfig:
    """Load and validate a cloud config; errors are one-line ConfigErrors naming file and key."""
    file = Path(path)
    top = Section(load_yaml(file, "cloud config"), file)
    top.reject_unknown(("mqtt", "trust", "crl", "store", "http", "owners"))
    m = top.section("mqtt", required=True)
    assert m is not None
    m.reject_unknown(("host", "port", "ca", "cert", "key", "topic_prefix", "keepalive_s",
                      "reconnect_min_s", "reconnect_max_s", "share_group"))
    prefix = m.text("topic_prefix", "vehicles")
    assert prefix is not None
    if any(c in prefix for c in "+#\x00") or prefix.startswith("/") or prefix.endswith("/"):
        raise m.error("topic_prefix", f"{prefix!r} must not contain + # or NUL, "
                                      "nor start or end with /")
    share_group = m.text("share_group")
    if share_group is not None and not _SHARE_GROUP.fullmatch(share_group):
        raise m.error("share_group", f"{share_group[:70]!r}: expected 1-64 characters of "
                                     "A-Z a-z 0-9 _ -")
    reconnect_min = m.number("reconnect_min_s", 0.5, minimum=0.05)
    reconnect_max = m.number("reconnect_max_s", 30.0, minimum=reconnect_min)
    return CloudConfig(
        file=file,
        host=m.text("host", required=True),
        port=m.integer("port", 8883, minimum=1, maximum=65535),
        ca=m.path_value("ca", required=True),
        cert=m.path_value("cert", required=True),
        key=m.path_value("key", required=True),
        trust=top.path_value("trust", required=True),
        topic_prefix=prefix,
        keepalive_s=m.integer("keepalive_s", 30, minimum=5, maximum=3600),
        reconnect_min_s=float(reconnect_min),
        reconnect_max_s=float(reconnect_max),
        crl=top.path_value("crl"),
        share_group=share_group,
        store=_store(top),
        http=_http(top),
        owners=top.path_value("owners"),
    )


def make_ssl_context(config: CloudConfig) -> ssl.SSLContext:
    """Client TLS context: verify the broker against ``ca``, present ``cert``/``key``.

    :raises KeyFileError: a file is missing, unreadable or not what it should be.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = ClosingSSLSocket
    where = f"{config.file}: mqtt"
    try:
        ctx.load_verify_locations(cafile=str(config.ca))
    except FileNotFoundError:
        raise KeyFileError(f"{where}.ca: {config.ca}: file not found") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise KeyFileError(f"{where}.ca: {config.ca}: not a PEM CA certificate "
                           f"({_short(exc)})") from None
    for name, path in (("cert", config.cert), ("key", config.key)):
        if not path.is_file():
            raise KeyFileError(f"{where}.{name}: {path}: file not found")
    try:
        ctx.load_cert_chain(certfile=str(config.cert), keyfile=str(config.key))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise KeyFileError(f"{where}.cert/key: {config.cert}, {config.key}: cannot load the "
                           f"client certificate and key, or they do not match ({_short(exc)})"
                           ) from None
    return ctx


