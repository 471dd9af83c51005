"""agent.uplink.envelope: the signed claims, checked with jwcrypto (an independent JOSE library).

Envelopes are built exactly as the daemon builds them: a payload factory handed to a real
:class:`agent.uplink.outbox.Outbox`, which allocates ``seq`` inside its transaction. Clocks are
injected so ``ts`` is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwcrypto import jwk, jws

from agent.uplink.envelope import Envelopes
from agent.uplink.outbox import Outbox
from agent.dev.pki import init_pki
from agent.signals.model import INVALID, STALE, VALID, Change
from agent.uplink.signing import Signer
from agent.signals.state import VehicleState
from coredata import AIR, HOOD, IS_LOCKED, IS_OPEN, LOW, RANGE, REL, TRUNK, WINDOWS, demo_decoder

VID = "VIN1"
NOW = 1_767_225_600.125          # exactly representable: ts is exactly 1767225600125 ms
NOW_MS = 1_767_225_600_125
EVENTS = f"vehicles/{VID}/events"
STATE = f"vehicles/{VID}/state"
EVENT_CLAIMS = {"vid", "seq", "boot", "ts", "kind", "signals", "quality"}
STATE_CLAIMS = EVENT_CLAIMS | {"age"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """PEM files of the two supported key types: the PKI's P-256 key and an Ed25519 key."""
    directory = tmp_path_factory.mktemp("keys")
    init_pki(directory / "pki", [VID])
    ed_path = directory / "ed25519.key"
    ed_path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return {"ES256": directory / "pki" / f"{VID}.signing.key", "EdDSA": ed_path}


@pytest.fixture(params=["ES256", "EdDSA"])
def alg(request) -> str:
    return request.param


@pytest.fixture
def key_file(alg, keys) -> Path:
    return keys[alg]


@pytest.fixture
def signer(key_file) -> Signer:
    return Signer.from_file(key_file)


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.db", clock=lambda: NOW) as box:
        yield box


def verify(token: bytes, key_file: Path) -> tuple[dict, dict]:
    """(header, claims), verified by jwcrypto with a key it reads from the PEM itself."""
    private = jwk.JWK.from_pem(key_file.read_bytes())
    public = jwk.JWK.from_json(private.export_public())
    obj = jws.JWS()
    obj.deserialize(token.decode("ascii"))
    obj.verify(public)                                  # raises on a bad signature
    return obj.jose_header, json.loads(obj.payload)


def thumbprint(key_file: Path) -> str:
    return jwk.JWK.from_pem(key_file.read_bytes()).thumbprint()   # RFC 7638, SHA-256


# -- header and signature ---------------------------------------------------------------------


def test_header_alg_kid_typ(alg, signer, key_file, outbox):
    entry = outbox.add(EVENTS, "event", Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
                       .event([Change(NOW, IS_OPEN[0], True, VALID)]))
    header, _ = verify(entry.payload, key_file)
    assert signer.alg == alg
    assert header == {"alg": alg, "kid": thumbprint(key_file), "typ": "JWT"}
    assert header["kid"] == signer.kid == signer.public_jwk["kid"]


def test_public_jwk_verifies_too_and_tampering_is_detected(signer, outbox):
    entry = outbox.add(EVENTS, "event", Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
                       .event([Change(NOW, IS_OPEN[0], True, VALID)]))
    key = jwk.JWK(**signer.public_jwk)
    assert key.thumbprint() == signer.kid
    obj = jws.JWS()
    obj.deserialize(entry.payload.decode())
    obj.verify(key)
    head, payload, sig = entry.payload.decode().split(".")
    forged = json.loads(jws.base64url_decode(payload))
    forged["signals"][IS_OPEN[0]] = False
    bad = jws.JWS()
    bad.deserialize(".".join([head, jws.base64url_encode(json.dumps(forged)), sig]))
    with pytest.raises(jws.InvalidJWSSignature):
        bad.verify(key)


# -- event claims -----------------------------------------------------------------------------


def test_event_claims_exact(signer, key_file, outbox):
    envelopes = Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
    changes = [
        Change(NOW - 1, IS_OPEN[0], True, VALID),
        Change(NOW - 1, LOW, False, VALID),                 # false stays false, not null
        Change(NOW - 1, WINDOWS[0], 0, VALID),              # 0 stays 0, not null
        Change(NOW - 1, RANGE, None, INVALID),
        Change(NOW - 1, REL, None, STALE),
        Change(NOW - 1, AIR, 18.5, VALID),
    ]
    entry = outbox.add(EVENTS, "event", envelopes.event(changes))
    _, claims = verify(entry.payload, key_file)
    assert claims == {
        "vid": VID, "seq": entry.seq, "boot": outbox.boot, "ts": NOW_MS, "kind": "event",
        "signals": {IS_OPEN[0]: True, LOW: False, WINDOWS[0]: 0, RANGE: None, REL: None,
                    AIR: 18.5},
        "quality": {RANGE: "invalid", REL: "stale"},
    }
    assert set(claims) == EVENT_CLAIMS
    assert (entry.seq, outbox.boot) == (1, 1)


def test_event_value_is_null_whenever_quality_is_not_valid(signer, key_file, outbox):
    # Even if a value rides along with a non-valid quality, it must not be published.
    envelopes = Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
    entry = outbox.add(EVENTS, "event", envelopes.event(
        [Change(NOW, RANGE, 1_023_000, INVALID), Change(NOW, HOOD, True, STALE)]))
    _, claims = verify(entry.payload, key_file)
    assert claims["signals"] == {RANGE: None, HOOD: None}
    assert claims["quality"] == {RANGE: "invalid", HOOD: "stale"}


def test_all_valid_event_has_empty_quality(signer, key_file, outbox):
    entry = outbox.add(EVENTS, "event", Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
                       .event([Change(NOW, TRUNK, True, VALID)]))
    _, claims = verify(entry.payload, key_file)
    assert claims["quality"] == {} and claims["signals"] == {TRUNK: True}


def test_ts_is_taken_at_signing_in_ms(signer, key_file, outbox):
    clock = iter([NOW, NOW + 2.5])
    envelopes = Envelopes(signer, VID, outbox.boot, clock=lambda: next(clock))
    first = envelopes.event([Change(NOW, TRUNK, True, VALID)])     # built now...
    second = envelopes.event([Change(NOW, TRUNK, False, VALID)])
    e1 = outbox.add(EVENTS, "event", first)                         # ...signed here
    e2 = outbox.add(EVENTS, "event", second)
    assert verify(e1.payload, key_file)[1]["ts"] == NOW_MS
    assert verify(e2.payload, key_file)[1]["ts"] == NOW_MS + 2500


def test_default_clock_is_the_wall_clock_in_ms(signer, key_file, outbox):
    import time
    before = int(time.time() * 1000)
    entry = outbox.add(EVENTS, "event", Envelopes(signer, VID, outbox.boot)
                       .event([Change(NOW, TRUNK, True, VALID)]))
    after = int(time.time() * 1000) + 1
    ts = verify(entry.payload, key_file)[1]["ts"]
    assert isinstance(ts, int) and before <= ts <= after


# -- state claims -----------------------------------------------------------------------------


def test_state_snapshot_claims_exact(signer, key_file, outbox):
    paths = demo_decoder().paths
    index = {p: i for i, p in enumerate(paths)}
    state = VehicleState(paths)
    state.apply(NOW - 10.0, [(index[IS_OPEN[0]], True, VALID), (index[RANGE], None, INVALID),
                             (index[WINDOWS[0]], 40, VALID), (index[IS_LOCKED[0]], False, VALID)])
    state.apply(NOW - 1.75, [(index[REL], 55.2, VALID), (index[IS_LOCKED[0]], False, VALID)])
    state.mark_stale(NOW - 0.5, [index[WINDOWS[0]]])
    never = set(paths) - {IS_OPEN[0], RANGE, WINDOWS[0], IS_LOCKED[0], REL}
    assert never                                              # some signals were never received

    envelopes = Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
    entry = outbox.add(STATE, "state", envelopes.state(state, NOW), retain=True)
    _, claims = verify(entry.payload, key_file)
    assert set(claims) == STATE_CLAIMS
    assert {k: claims[k] for k in ("vid", "seq", "boot", "ts", "kind")} == {
        "vid": VID, "seq": entry.seq, "boot": outbox.boot, "ts": NOW_MS, "kind": "state"}
    assert set(claims["signals"]) == set(paths) == set(claims["age"])   # every mapped path
    expected_signals = {p: None for p in paths}
    expected_signals.update({IS_OPEN[0]: True, IS_LOCKED[0]: False, REL: 55.2})
    assert claims["signals"] == expected_signals
    expected_quality = {p: "stale" for p in never}
    expected_quality.update({RANGE: "invalid", WINDOWS[0]: "stale"})
    assert claims["quality"] == expected_quality
    expected_age = {p: None for p in never}
    expected_age.update({IS_OPEN[0]: 10.0, RANGE: 10.0, WINDOWS[0]: 10.0,
                         IS_LOCKED[0]: 1.75, REL: 1.75})
    assert claims["age"] == expected_age
    # quality lists exactly the non-valid signals, and those are exactly the null ones
    assert set(claims["quality"]) == {p for p, v in claims["signals"].items() if v is None}


def test_state_snapshot_is_taken_when_built_not_when_signed(signer, key_file, outbox):
    paths = (IS_OPEN[0], TRUNK)
    state = VehicleState(paths)
    state.apply(NOW, [(0, False, VALID), (1, False, VALID)])
    factory = Envelopes(signer, VID, outbox.boot, clock=lambda: NOW).state(state, NOW + 1.0)
    state.apply(NOW + 2, [(0, True, VALID)])
    _, claims = verify(outbox.add(STATE, "state", factory, retain=True).payload, key_file)
    assert claims["signals"] == {IS_OPEN[0]: False, TRUNK: False}
    assert claims["age"] == {IS_OPEN[0]: 1.0, TRUNK: 1.0}


def test_state_with_nothing_received_yet(signer, key_file, outbox):
    paths = demo_decoder().paths
    entry = outbox.add(STATE, "state", Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
                       .state(VehicleState(paths), NOW), retain=True)
    _, claims = verify(entry.payload, key_file)
    assert claims["signals"] == {p: None for p in paths}
    assert claims["quality"] == {p: "stale" for p in paths}
    assert claims["age"] == {p: None for p in paths}


# -- seq and boot ---------------------------------------------------------------------------


def test_seq_is_the_outbox_seq_never_shared_and_continues_after_reopen(signer, key_file,
                                                                        tmp_path):
    paths = (IS_OPEN[0], RANGE)
    state = VehicleState(paths)
    state.apply(NOW, [(0, False, VALID), (1, 500_000, VALID)])
    seen: list[tuple[int, int]] = []
    store = tmp_path / "box.db"
    for boot in (1, 2, 3):
        with Outbox(store, clock=lambda: NOW) as box:
            assert box.boot == boot
            envelopes = Envelopes(signer, VID, box.boot, clock=lambda: NOW)
            for k in range(4):
                if k % 2:
                    entry = box.add(STATE, "state", envelopes.state(state, NOW), retain=True)
                else:
                    entry = box.add(EVENTS, "event",
                                    envelopes.event([Change(NOW, IS_OPEN[0], bool(k), VALID)]))
                _, claims = verify(entry.payload, key_file)
                assert claims["seq"] == entry.seq
                assert claims["boot"] == boot
                seen.append((claims["seq"], claims["boot"]))
            # some get delivered: deleting never frees a seq for reuse
            box.delete(seen[-1][0])
    seqs = [s for s, _ in seen]
    assert seqs == list(range(1, 13))                # contiguous, never shared across boots


def test_factory_that_fails_does_not_consume_a_seq(signer, key_file, outbox):
    envelopes = Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
    good = envelopes.event([Change(NOW, TRUNK, True, VALID)])

    def broken(seq: int) -> bytes:
        good(seq)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        outbox.add(EVENTS, "event", broken)
    entry = outbox.add(EVENTS, "event", good)
    assert entry.seq == 1 and verify(entry.payload, key_file)[1]["seq"] == 1


def test_payload_is_canonical_json(signer, outbox):
    entry = outbox.add(EVENTS, "event", Envelopes(signer, VID, outbox.boot, clock=lambda: NOW)
                       .event([Change(NOW, IS_OPEN[1], True, VALID),
                               Change(NOW, IS_OPEN[0], False, VALID)]))
    raw = jws.base64url_decode(entry.payload.decode().split(".")[1])
    claims = json.loads(raw)
    assert raw == json.dumps(claims, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode()

