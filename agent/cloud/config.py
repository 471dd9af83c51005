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
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.errors import KeyFileError
from agent.schema import Section, load_yaml
from agent.uplink.tlsdiag import (
    ClosingSSLSocket,
    _short,
)

# --------------------------------------------------------------------------- config


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


def load_cloud_config(path: str | Path) -> CloudConfig:
    """Load and validate a cloud config; errors are one-line ConfigErrors naming file and key."""
    file = Path(path)
    top = Section(load_yaml(file, "cloud config"), file)
    top.reject_unknown(("mqtt", "trust", "crl"))
    m = top.section("mqtt", required=True)
    assert m is not None
    m.reject_unknown(("host", "port", "ca", "cert", "key", "topic_prefix", "keepalive_s",
                      "reconnect_min_s", "reconnect_max_s"))
    prefix = m.text("topic_prefix", "vehicles")
    assert prefix is not None
    if any(c in prefix for c in "+#\x00") or prefix.startswith("/") or prefix.endswith("/"):
        raise m.error("topic_prefix", f"{prefix!r} must not contain + # or NUL, "
                                      "nor start or end with /")
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


