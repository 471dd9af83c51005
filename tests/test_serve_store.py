"""serve's store (SQLite and a real PostgreSQL), its config keys, owners and rate limit.

No broker here: records are written in the shape MessageChecker gives verified messages, and
the expected values are written down, not computed by the code under test."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from agent.cloud.answer import answer
from agent.cloud.config import load_cloud_config
from agent.cloud.metrics import reason_label
from agent.cloud.owners import OwnerDirectory, RateLimiter, add_owner, load_owners, token_hash
from agent.cloud.serve import check_listen
from agent.cloud.store import Store, StoreError, open_store
from agent.cloud.view import Reading, Source
from agent.errors import ConfigError
from support.postgres import PrivatePostgres
from support.serving import DOOR, FUEL, RANGE, T0

REPO = Path(__file__).resolve().parent.parent


def record(seq: int, signals: dict, *, ts: float | None = None, quality: dict | None = None,
           age: dict | None = None, stream: str = "", vid: str = "VIN1", kind: str = "state"):
    r = {"vid": vid, "topic": f"vehicles/{vid}/state", "kind": kind, "verified": True,
         "seq": seq, "boot": 1, "kid": "kid-1", "stream": stream,
         "ts": int(((T0 + seq) if ts is None else ts) * 1000), "signals": signals,
         "quality": quality or {}, "retained": False}
    if age is not None:
        r["age"] = age
    return r


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = open_store("sqlite:///state.db", tmp_path, history=5)
    else:
        pg = request.getfixturevalue("postgres")
        s = open_store(pg.create_database(f"store_{tmp_path.name.lower()}"[:60]), tmp_path,
                       history=5)
    yield s
    s.close()


# --------------------------------------------------------------------------- the store


def test_a_message_is_stored_once_and_a_late_older_one_never_rolls_back(store: Store) -> None:
    assert store.apply(record(5, {RANGE: 300_000, DOOR: True}))
    assert not store.apply(record(5, {RANGE: 300_000, DOOR: True}))     # delivered again
    # Older (seq 4, earlier ts), arriving late: the door it reports is older than what we hold.
    assert store.apply(record(4, {RANGE: 310_000, DOOR: False, FUEL: 50.0}))
    view = store.view("VIN1")
    assert view.source == Source(seq=5, boot=1, kid="kid-1", stream="", ts=T0 + 5)
    assert view.readings[RANGE] == Reading("valid", T0 + 5, 300_000, T0 + 5)
    assert view.readings[DOOR] == Reading("valid", T0 + 5, True, T0 + 5)
    assert view.readings[FUEL] == Reading("valid", T0 + 4, 50.0, T0 + 4)   # new signal: taken
    assert store.count() == 2
    assert [m["seq"] for m in store.messages("VIN1")] == [4, 5]


def test_the_last_valid_value_is_kept_when_a_signal_turns_stale(store: Store) -> None:
    store.apply(record(1, {RANGE: 123_400}))
    store.apply(record(2, {RANGE: None}, quality={RANGE: "stale"}, age={RANGE: 0.5}))
    store.set_online("VIN1", False)
    view = store.view("VIN1")
    assert view.readings[RANGE] == Reading("stale", T0 + 1.5, 123_400, T0 + 1)
    a = answer(view, "en", now=T0 + 62)
    assert (a["range_m"], a["unknown"], a["online"]) == (123_400, [RANGE], False)
    assert a["text"] == ("As of 1 min ago. Unknown: range (no recent data; last known 120 km "
                         "(1 min ago)). The car is offline; this is its last report. "
                         "Signature verified.")


def test_same_seq_in_another_stream_is_another_message(store: Store) -> None:
    assert store.apply(record(1, {RANGE: 1000}, stream="a"))
    assert store.apply(record(1, {RANGE: 2000}, stream="b", ts=T0 + 10))
    assert not store.apply(record(1, {RANGE: 2000}, stream="b", ts=T0 + 10))
    assert store.count() == 2
    assert store.view("VIN1").readings[RANGE].value == 2000


def test_history_is_bounded_to_the_newest(store: Store) -> None:
    for seq in range(1, 13):
        store.apply(record(seq, {RANGE: seq * 1000}))
    assert [m["seq"] for m in store.messages("VIN1")] == [12, 11, 10, 9, 8]
    assert store.messages("VIN1", limit=1)[0]["signals"] == {RANGE: 12000}
    assert store.count() == 5
    assert store.view("VIN1").readings[RANGE].value == 12000


def test_vehicles_are_apart(store: Store) -> None:
    store.apply(record(1, {RANGE: 1000}, vid="VIN1"))
    store.apply(record(1, {RANGE: 2000}, vid="VIN2"))
    assert store.view("VIN1").readings[RANGE].value == 1000
    assert store.view("VIN2").readings[RANGE].value == 2000
    assert store.view("VIN3") is None
    assert store.last_id("VIN3") == 0 < store.last_id("VIN1") < store.last_id("VIN2")


def test_state_survives_a_reopen_and_the_schema_is_migrated_once(tmp_path: Path) -> None:
    s = open_store("sqlite:///db/state.db", tmp_path)
    s.apply(record(3, {RANGE: 42_000}))
    s.close()
    s = open_store(f"sqlite:///{tmp_path}/db/state.db", tmp_path)    # absolute: sqlite:////...
    assert s.view("VIN1").readings[RANGE].value == 42_000
    s.close()
    db = sqlite3.connect(tmp_path / "db" / "state.db")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    db.execute("INSERT INTO schema_version VALUES (99)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema is version 99, newer than this car-agent"):
        open_store("sqlite:///db/state.db", tmp_path)


def test_postgres_schema_is_migrated_once(postgres: PrivatePostgres, tmp_path: Path) -> None:
    url = postgres.create_database("migrate_once")
    for _ in range(2):
        open_store(url, tmp_path).close()
    import psycopg

    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as err:
        open_store(f"postgresql://nobody:secret@/x?host={tmp_path}&connect_timeout=1", tmp_path)
    text = str(err.value)
    assert "\n" not in text and "cannot open" in text and "secret" not in text


# --------------------------------------------------------------------------- config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text("mqtt: {host: h, ca: ca.crt, cert: c.crt, key: c.key}\ntrust: jwks.json\n"
                    + text, encoding="utf-8")
    return path


def test_serve_keys_and_their_defaults(tmp_path: Path) -> None:
    c = load_cloud_config(write(tmp_path, ""))
    assert (c.store.url, c.http.host, c.http.port, c.http.insecure, c.owners, c.share_group) \
        == ("sqlite:///state.db", "127.0.0.1", 8080, False, None, None)
    c = load_cloud_config(write(tmp_path, (
        "store: {url: 'postgresql://u@db/x', history: 50}\n"
        "http: {listen: '[::1]:9443', cert: s.crt, key: s.key, rate: 2, burst: 4}\n"
        "owners: owners.yaml\n").replace("key: c.key}", "key: c.key, share_group: serve}")))
    assert (c.store.url, c.store.history) == ("postgresql://u@db/x", 50)
    assert (c.http.host, c.http.port, c.http.cert, c.http.rate, c.http.burst) == \
        ("::1", 9443, tmp_path / "s.crt", 2.0, 4)
    assert c.owners == tmp_path / "owners.yaml" and c.http.loopback


@pytest.mark.parametrize("text, message", [
    ("store: {url: 'mysql://x'}\n", "store.url: 'mysql://x': expected sqlite:///PATH or"),
    ("store: {path: x}\n", "store.path: unknown key"),
    ("http: {listen: 8080}\n", "http.listen: '8080' is not HOST:PORT"),
    ("http: {listen: 'localhost'}\n", "http.listen: 'localhost' is not HOST:PORT"),
    ("http: {listen: '1.2.3.4:99999'}\n", "is not HOST:PORT"),
    ("http: {cert: a.crt}\n", "http.key: missing (http.cert and http.key go together)"),
    ("http: {insecure: 'yes'}\n", "http.insecure: expected true or false"),
    ("http: {rate: 0}\n", "http.rate: expected a number at least 0.01"),
    ("owners: [a]\n", "owners: expected a string"),
])
def test_bad_serve_keys_are_one_line_naming_the_key(tmp_path: Path, text: str,
                                                    message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_cloud_config(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_share_group_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.write_text(path.read_text().replace("key: c.key}", "key: c.key, share_group: 'a/b'}"))
    with pytest.raises(ConfigError, match=r"mqtt.share_group: 'a/b': expected 1-64 characters"):
        load_cloud_config(path)


@pytest.mark.parametrize("http, refused", [
    ("{listen: '0.0.0.0:8080'}", True),
    ("{listen: '192.0.2.1:8080'}", True),
    ("{listen: 'example.org:8080'}", True),
    ("{listen: '0.0.0.0:8080', insecure: true}", False),
    ("{listen: '127.0.0.2:8080'}", False),
    ("{listen: '[::1]:8080'}", False),
    ("{listen: 'localhost:8080'}", False),
])
def test_plain_http_only_on_loopback_unless_insecure(tmp_path: Path, http: str,
                                                     refused: bool) -> None:
    config = load_cloud_config(write(tmp_path, f"http: {http}\n"))
    if refused:
        with pytest.raises(ConfigError) as err:
            check_listen(config)
        assert str(err.value) == (
            f"{tmp_path / 'cloud.yaml'}: http.listen: {config.http.host}:8080 is not a loopback "
            "address: set http.cert and http.key (HTTPS), or http.insecure: true if TLS ends "
            "at a proxy in front")
    else:
        check_listen(config)


def test_tls_listen_needs_the_files(tmp_path: Path) -> None:
    config = load_cloud_config(write(tmp_path, "http: {listen: '0.0.0.0:8443', cert: s.crt, "
                                               "key: s.key}\n"))
    with pytest.raises(ConfigError, match=r"http.cert: .*s.crt: file not found"):
        check_listen(config)


# --------------------------------------------------------------------------- owners


def test_owner_add_prints_only_the_token_and_stores_only_its_hash(tmp_path: Path) -> None:
    owners = tmp_path / "owners.yaml"
    run = subprocess.run([sys.executable, "-m", "agent", "owner", "add", str(owners),
                          "--vehicle", "VIN1", "--vehicle", "VIN2"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) >= 40
    token = lines[0]
    text = owners.read_text()
    assert token not in text
    assert yaml.safe_load(text) == {"owners": [{"token_sha256": token_hash(token).hex(),
                                                "vehicles": ["VIN1", "VIN2"]}]}
    assert stat.S_IMODE(owners.stat().st_mode) == 0o600
    second = add_owner(owners, ["VIN3"])
    directory = OwnerDirectory(owners)
    assert directory.vehicles(token) == {"VIN1", "VIN2"}
    assert directory.vehicles(second) == {"VIN3"}
    assert directory.vehicles(token + "x") is None
    assert directory.vehicles("") is None


def test_owner_add_refuses_a_bad_vehicle_id(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "agent", "owner", "add",
                          str(tmp_path / "o.yaml"), "--vehicle", "VIN/1"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "car-agent owner: error: --vehicle: 'VIN/1' is not a valid vehicle id (1-64 of "
        "A-Z a-z 0-9 _ -, starting with a letter or digit)"]
    assert not (tmp_path / "o.yaml").exists()


@pytest.mark.parametrize("text, message", [
    ("owners: [{token_sha256: abc, vehicles: [VIN1]}]", "owners[0].token_sha256: expected 64"),
    (f"owners: [{{token_sha256: {'a' * 64}}}]", "owners[0].vehicles: missing"),
    (f"owners: [{{token_sha256: {'a' * 64}, vehicles: ['a b']}}]", "'a b' is not a vehicle id"),
    ("owners: [{token: x}]", "owners[0].token: unknown key"),
    ("owners: {", "YAML syntax error"),
])
def test_a_bad_owners_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "owners.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_owners(path)
    assert message in str(err.value) and str(err.value).startswith(str(path))


def test_a_broken_owners_file_keeps_the_owners_read_before(tmp_path: Path) -> None:
    path = tmp_path / "owners.yaml"
    token = add_owner(path, ["VIN1"])
    directory = OwnerDirectory(path)
    path.write_text("owners: {")
    directory._checked = -10.0          # as if a second had passed since the last look
    assert directory.vehicles(token) == {"VIN1"}
    assert "YAML syntax error" in directory.problem


def test_rate_limit_is_a_token_bucket_per_token() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=1.0, burst=3, clock=lambda: now[0])
    assert [limiter.allow(b"a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(b"b")              # another token has its own bucket
    now[0] += 1.0
    assert [limiter.allow(b"a") for _ in range(2)] == [True, False]


def test_rejection_reasons_become_few_labels() -> None:
    assert [reason_label(r) for r in (
        "bad signature", "unknown kid", "duplicate seq 3", "signing key revoked (certificate "
        "serial 0x1F)", "vid claim 'VIN2' does not match the topic's vehicle 'VIN1'",
        "malformed: payload is not UTF-8 (byte 0)", "payload too large (9 bytes, limit 1)",
        "unexpected topic: unknown leaf 'x'", "bad claims: 'seq' missing",
        "implausible ts 2019-01-01T00:00:00.000Z: before 2020-01-01", "something new")] \
        == ["bad_signature", "unknown_kid", "duplicate", "revoked", "wrong_vehicle", "malformed",
            "too_large", "topic", "bad_claims", "implausible_ts", "other"]



def test_a_bad_https_certificate_is_one_line(tmp_path: Path, pki: Path) -> None:
    (tmp_path / "s.crt").write_text("not a certificate")
    config = load_cloud_config(write(tmp_path, f"http: {{listen: '0.0.0.0:8443', cert: s.crt, "
                                               f"key: {pki / 'broker.key'}}}\n"))
    with pytest.raises(ConfigError) as err:
        check_listen(config)
    assert str(err.value).startswith(f"{tmp_path / 'cloud.yaml'}: http.cert/key: ")
    assert "cannot load the certificate and key" in str(err.value) and "\n" not in str(err.value)
