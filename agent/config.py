"""The agent's configuration file: YAML in, typed frozen dataclasses out.

Keys are documented in README.md ("Configuration"). Only ``vehicle_id``, ``dbc`` and ``mapping``
are needed by every command; the others are checked by the commands that use them
(:meth:`AgentConfig.require`), so that offline decoding needs no certificates.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError
from agent.schema import Section, describe, load_yaml

#: The one vehicle-id rule (config, `pki init --vehicle`, topics, the `vid` claim, JWKS keys).
#: Ids end up in MQTT topics, certificate CNs and the dev PKI's file names: no wildcards,
#: separators or spaces, and no "." (``A.signing`` would name vehicle A's signing files).
VEHICLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VEHICLE_ID_RULE = "1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit"


def vehicle_id_problem(value: object) -> str | None:
    """Why ``value`` is not a vehicle id (the same words everywhere), or None if it is one."""
    if isinstance(value, str) and VEHICLE_ID_PATTERN.fullmatch(value):
        return None
    shown = repr(value[:70]) if isinstance(value, str) else describe(value)
    return f"{shown} is not a valid vehicle id ({VEHICLE_ID_RULE})"
CAPTURE_FORMATS = ("candump", "asc", "blf", "trc")

# The publish policy's knobs (agent.signals.policy applies them).
DEFAULT_IMMEDIATE = ("*.IsOpen", "*.IsLocked", "*.Window.Position", "*.IsFuelLevelLow",
                     "Vehicle.Cabin.Sunroof.Position")
DEFAULT_DEADBANDS = (
    ("Vehicle.Powertrain.FuelSystem.RelativeLevel", 1.0),    # %
    ("Vehicle.Powertrain.FuelSystem.AbsoluteLevel", 1.0),    # l
    ("Vehicle.Powertrain.FuelSystem.Range", 1000.0),         # m
    ("Vehicle.Exterior.AirTemperature", 0.5),                # degC
)


@dataclass(frozen=True)
class PolicyConfig:
    immediate: tuple[str, ...] = DEFAULT_IMMEDIATE
    deadband: tuple[tuple[str, float], ...] = DEFAULT_DEADBANDS
    min_interval_s: float = 10.0
    snapshot_min_interval_s: float = 5.0
    heartbeat_s: float = 60.0
    max_messages_per_s: float = 5.0
    max_pending_batches: int = 1000


@dataclass(frozen=True)
class CanConfig:
    """Where frames come from: a python-can bus, or a capture file."""

    interface: str | None = None
    channel: str | None = None
    fd: bool = False
    bitrate: int | None = None
    capture: Path | None = None
    capture_format: str | None = None
    realtime: bool = True
    capture_channel: str | None = None


@dataclass(frozen=True)
class SigningConfig:
    key: Path


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    topic_prefix: str = "vehicles"
    client_id: str | None = None
    keepalive_s: int = 30
    max_inflight: int = 20
    tls_version: str = "1.2"
    max_packet_bytes: int = 128 * 1024
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    stats_interval_s: float = 60.0
    mask_vin: bool = False
    rate_limit_burst: int = 20
    rate_limit_window_s: float = 60.0


@dataclass(frozen=True)
class SecurityConfig:
    cert_warn_days: int = 30


@dataclass(frozen=True)
class CmdConfig:
    """Snapshot requests from the cloud (the only command there is: the agent never actuates)."""

    enabled: bool = True
    snapshot_rate: float = 0.5      # requests answered per second, sustained
    snapshot_burst: int = 3         # ... and at once after a quiet spell


@dataclass(frozen=True)
class AgentConfig:
    file: Path
    vehicle_id: str
    dbc: tuple[Path, ...]
    mapping: Path
    dbc_encodings: tuple[str | None, ...] = ()   # per DBC file: text encoding, None = detect
    can: CanConfig | None = None
    signing: SigningConfig | None = None
    mqtt: MqttConfig | None = None
    store: StoreConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    cmd: CmdConfig = field(default_factory=CmdConfig)

    def require(self, *sections: str) -> None:
        """Fail with one line if a section a command needs is absent."""
        for name in sections:
            if getattr(self, name) is None:
                raise ConfigError(f"{self.file}: {name}: missing (this command needs it)")


TOP_KEYS = ("vehicle_id", "can", "dbc", "mapping", "signing", "mqtt", "store", "policy",
            "logging", "security", "cmd")
LOG_LEVELS = ("debug", "info", "warning", "error")


def load_config(path: str | Path) -> AgentConfig:
    """Load and validate an agent config file (DBC and mapping files are not opened here)."""
    file = Path(path)
    top = Section(load_yaml(file, "config"), file)
    top.reject_unknown(TOP_KEYS)

    vehicle_id = top.text("vehicle_id", required=True)
    problem = vehicle_id_problem(vehicle_id)
    if problem:
        raise top.error("vehicle_id", problem)

    dbc_value = top.data.get("dbc")
    if isinstance(dbc_value, (str, int)) and not isinstance(dbc_value, bool):
        dbc_value = [dbc_value]
    if not isinstance(dbc_value, list) or not dbc_value:
        raise top.error("dbc", "expected one DBC path or a non-empty list of them")
    dbc_section = Section({str(i): v for i, v in enumerate(dbc_value)}, file, "dbc")
    dbc, encodings = zip(*(_dbc_entry(dbc_section, str(i)) for i in range(len(dbc_value))))

    return AgentConfig(
        file=file,
        vehicle_id=vehicle_id,
        dbc=tuple(dbc),
        dbc_encodings=tuple(encodings),
        mapping=top.path_value("mapping", required=True),
        can=_can(top.section("can")),
        signing=_signing(top.section("signing")),
        mqtt=_mqtt(top.section("mqtt")),
        store=_store(top.section("store")),
        logging=_logging(top.section("logging")),
        policy=_policy(top.section("policy")),
        security=_security(top.section("security")),
        cmd=_cmd(top.section("cmd")),
    )


def _dbc_entry(dbc: Section, index: str) -> tuple[Path, str | None]:
    """One ``dbc`` entry: a path, or ``{path: ..., encoding: ...}`` (the encoding overrides
    detection: UTF-8 when the file is valid UTF-8, else cp1252)."""
    if not isinstance(dbc.data.get(index), dict):
        return dbc.path_value(index, required=True), None
    entry = dbc.section(index)
    entry.reject_unknown(("path", "encoding"))
    encoding = entry.text("encoding")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise entry.error("encoding", f"unknown text encoding {encoding[:40]!r} (e.g. "
                                          "utf-8, cp1252, latin-1)") from None
    return entry.path_value("path", required=True), encoding


def _can(s: Section | None) -> CanConfig | None:
    if s is None:
        return None
    s.reject_unknown(("interface", "channel", "fd", "bitrate", "capture", "format", "realtime",
                      "capture_channel"))
    capture = s.path_value("capture")
    if capture is not None and (s.has("interface") or s.has("channel")):
        raise s.error("capture", "give either a capture file or interface/channel, not both")
    if capture is None and not s.has("interface"):
        raise s.error("interface", "missing (expected a python-can interface name such as "
                                   "socketcan, or a capture file under can.capture)")
    fmt = s.text("format")
    if fmt is not None and fmt not in CAPTURE_FORMATS:
        raise s.error("format", f"expected one of {', '.join(CAPTURE_FORMATS)}, got {fmt!r}")
    return CanConfig(
        interface=s.text("interface"),
        channel=s.text("channel"),
        fd=s.get("fd", bool, False),
        bitrate=s.integer("bitrate", minimum=1000, maximum=10_000_000),
        capture=capture,
        capture_format=fmt,
        realtime=s.get("realtime", bool, True),
        capture_channel=s.text("capture_channel"),
    )


def _signing(s: Section | None) -> SigningConfig | None:
    if s is None:
        return None
    s.reject_unknown(("key",))
    return SigningConfig(key=s.path_value("key", required=True))


def _mqtt(s: Section | None) -> MqttConfig | None:
    if s is None:
        return None
    s.reject_unknown(("host", "port", "ca", "cert", "key", "topic_prefix", "client_id",
                      "keepalive_s", "max_inflight", "tls_version", "reconnect_min_s",
                      "reconnect_max_s", "max_packet_bytes"))
    prefix = s.text("topic_prefix", "vehicles")
    if any(c in prefix for c in "+#\x00") or prefix.startswith("/") or prefix.endswith("/"):
        raise s.error("topic_prefix", f"{prefix!r} must not contain + # or NUL, "
                                      "nor start or end with /")
    tls_version = str(s.get("tls_version", (str, float), "1.2"))
    if tls_version not in ("1.2", "1.3"):
        raise s.error("tls_version", f"expected \"1.2\" or \"1.3\" (the minimum), got {tls_version!r}")
    reconnect_min = s.number("reconnect_min_s", 1.0, minimum=0.05)
    reconnect_max = s.number("reconnect_max_s", 60.0, minimum=reconnect_min)
    return MqttConfig(
        host=s.text("host", required=True),
        port=s.integer("port", 8883, minimum=1, maximum=65535),
        ca=s.path_value("ca", required=True),
        cert=s.path_value("cert", required=True),
        key=s.path_value("key", required=True),
        topic_prefix=prefix,
        client_id=s.text("client_id"),
        keepalive_s=s.integer("keepalive_s", 30, minimum=5, maximum=3600),
        max_inflight=s.integer("max_inflight", 20, minimum=1, maximum=1000),
        tls_version=tls_version,
        max_packet_bytes=s.integer("max_packet_bytes", 128 * 1024, minimum=1024,
                                   maximum=268_435_455),
        reconnect_min_s=float(reconnect_min),
        reconnect_max_s=float(reconnect_max),
    )


def _store(s: Section | None) -> StoreConfig | None:
    if s is None:
        return None
    s.reject_unknown(("path", "max_bytes", "max_age_s"))
    return StoreConfig(
        path=s.path_value("path", required=True),
        max_bytes=s.integer("max_bytes", 64 * 1024 * 1024, minimum=4096),
        max_age_s=float(s.number("max_age_s", 7 * 86400.0, minimum=1.0)),
    )


def _logging(s: Section | None) -> LoggingConfig:
    if s is None:
        return LoggingConfig()
    s.reject_unknown(("level", "stats_interval_s", "mask_vin", "rate_limit_burst",
                      "rate_limit_window_s"))
    level = s.text("level", "info").lower()
    if level not in LOG_LEVELS:
        raise s.error("level", f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return LoggingConfig(level=level,
                         stats_interval_s=float(s.number("stats_interval_s", 60.0, minimum=1.0)),
                         mask_vin=s.get("mask_vin", bool, False),
                         rate_limit_burst=s.integer("rate_limit_burst", 20, minimum=1,
                                                    maximum=100_000),
                         rate_limit_window_s=float(s.number("rate_limit_window_s", 60.0,
                                                            minimum=1.0)))


def _policy(s: Section | None) -> PolicyConfig:
    default = PolicyConfig()
    if s is None:
        return default
    s.reject_unknown(("immediate", "deadband", "min_interval_s", "snapshot_min_interval_s",
                      "heartbeat_s", "max_messages_per_s", "max_pending_batches"))
    immediate = default.immediate
    if s.has("immediate"):
        raw = s.data["immediate"]
        if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
            raise s.error("immediate", f"expected a list of VSS path patterns, got {describe(raw)}")
        immediate = tuple(raw)
    deadband = default.deadband
    bands = s.section("deadband")
    if bands is not None:
        for pattern in bands.data:
            if not isinstance(pattern, str):
                raise bands.error(str(pattern), "expected a VSS path pattern as key")
        deadband = tuple((pattern, float(bands.number(pattern, minimum=0.0, required=True)))
                         for pattern in bands.data)
    heartbeat = s.number("heartbeat_s", default.heartbeat_s, minimum=1.0)
    return PolicyConfig(
        immediate=immediate,
        deadband=deadband,
        min_interval_s=float(s.number("min_interval_s", default.min_interval_s, minimum=0.0)),
        snapshot_min_interval_s=float(s.number("snapshot_min_interval_s",
                                               default.snapshot_min_interval_s, minimum=0.0)),
        heartbeat_s=float(heartbeat),
        max_messages_per_s=float(s.number("max_messages_per_s", default.max_messages_per_s,
                                          minimum=0.1)),
        max_pending_batches=s.integer("max_pending_batches", default.max_pending_batches,
                                      minimum=1, maximum=1_000_000),
    )


def _security(s: Section | None) -> SecurityConfig:
    if s is None:
        return SecurityConfig()
    s.reject_unknown(("cert_warn_days",))
    return SecurityConfig(cert_warn_days=s.integer("cert_warn_days", 30, minimum=0, maximum=3650))


def _cmd(s: Section | None) -> CmdConfig:
    default = CmdConfig()
    if s is None:
        return default
    s.reject_unknown(("enabled", "snapshot_rate", "snapshot_burst"))
    return CmdConfig(
        enabled=s.get("enabled", bool, default.enabled),
        snapshot_rate=float(s.number("snapshot_rate", default.snapshot_rate, minimum=0.0,
                                     exclusive_minimum=True)),
        snapshot_burst=s.integer("snapshot_burst", default.snapshot_burst, minimum=1,
                                 maximum=100),
    )
