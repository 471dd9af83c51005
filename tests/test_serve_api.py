"""car-agent serve on SQLite, end to end: a real mosquitto with mTLS, messages signed with the dev
PKI's keys, the HTTP API over a real socket (uvicorn), owners' tokens from `owner add`."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from urllib.parse import quote
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cloud.api import create_app
from agent.cloud.config import load_cloud_config
from agent.cloud.metrics import ServeMetrics
from agent.cloud.owners import OwnerDirectory, RateLimiter, add_owner
from agent.cloud.store import open_store
from agent.cloud.serve import Service
from agent.dev.broker import DevBroker, free_port
from agent.dev.pki import init_pki, revoke
from agent.errors import ConfigError
from agent.uplink.signing import Signer, b64url_decode, b64url_encode
from conftest import VehicleClient, require_mosquitto
from support.serving import (DOOR, FUEL, FULL, LOCK, RANGE, WINDOW, claims, fake_car, get,
                             metric, serve_yaml, sign, start_service, wait_for)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def signer(pki: Path) -> Signer:
    return Signer.from_file(pki / "VIN1.signing.key")


@pytest.fixture
def owners(tmp_path: Path) -> tuple[Path, str, str]:
    """An owners file: one owner of VIN1, one of VIN2 (their tokens)."""
    path = tmp_path / "owners.yaml"
    return path, add_owner(path, ["VIN1"]), add_owner(path, ["VIN2"])


@pytest.fixture
def service(tmp_path: Path, pki: Path, broker: DevBroker, owners) -> Iterator[Service]:
    svc = start_service(serve_yaml(tmp_path / "serve", pki, broker.port, owners=owners[0],
                                   http="listen: 127.0.0.1:0, rate: 50, burst: 50"))
    yield svc
    svc.stop()


def stored(service: Service, vid: str, n: int) -> None:
    """Wait until ``n`` messages of ``vid`` are in the store."""
    wait_for(lambda: len(service.store.messages(vid)) >= n, what=f"{n} stored for {vid}")


# --------------------------------------------------------------------------- the answer


def test_the_owner_asks_and_gets_the_verified_answer(tmp_path, pki, broker, owners, signer,
                                                     mqtt_client) -> None:
    car = mqtt_client("VIN1")
    # Published before serve starts: retained, read at start.
    car.publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL,
                                                           age={RANGE: 0, DOOR: 0})), retain=True)
    car.publish("vehicles/VIN1/status", "online", retain=True)
    svc = start_service(serve_yaml(tmp_path / "serve", pki, broker.port, owners=owners[0]))
    try:
        _, token, _ = owners
        stored(svc, "VIN1", 1)
        wait_for(lambda: svc.store.view("VIN1").online is True, what="online")
        car.publish("vehicles/VIN1/events", sign(signer, claims(
            2, kind="event", signals={DOOR: True, WINDOW: 40, LOCK: False})))
        stored(svc, "VIN1", 2)

        en = get(svc, "/v1/vehicles/VIN1/answer", token)
        assert en.status_code == 200, en.text
        body = en.json()
        assert (body["vid"], body["lang"], body["as_of"], body["online"], body["verified"]) == \
            ("VIN1", "en", "2025-11-24T16:00:02Z", True, True)
        assert (body["range_m"], body["fuel_pct"]) == (423_600, 63.4)
        assert body["open"] == [DOOR, WINDOW] and body["unlocked"] == [LOCK]
        assert body["unknown"] == []
        assert body["source"] == {"seq": 2, "boot": 1, "kid": signer.kid, "stream": ""}
        assert body["text"].endswith(": about 420 km of range, 63% fuel. Open: driver's door, "
                                     "rear passenger-side window (40%). Unlocked: driver's door. "
                                     "The car is online. Signature verified.")
        assert body["ssml"].startswith("<speak>As of ")
        zh = get(svc, "/v1/vehicles/VIN1/answer?lang=zh", token).json()
        assert zh["text"].endswith("：续航约420公里，油量63%。打开：主驾车门、后排副驾侧车窗（40%）。"
                                   "未上锁：主驾车门。车辆在线。签名已验证。")
        assert zh["ssml"] is None

        state = get(svc, "/v1/vehicles/VIN1", token).json()
        assert state["signals"][DOOR] == {"value": True, "quality": "valid",
                                          "as_of": "2025-11-24T16:00:02.000Z",
                                          "valid_as_of": "2025-11-24T16:00:02.000Z"}
        assert state["signals"][RANGE]["value"] == 423_600
        assert state["signals"][RANGE]["as_of"] == "2025-11-24T16:00:01.000Z"
        assert state["source"]["seq"] == 2 and state["online"] is True

        assert metric(svc, "car_agent_messages_verified_total", kind="state") == 1
        assert metric(svc, "car_agent_messages_verified_total", kind="event") == 1
        assert metric(svc, "car_agent_messages_stored_total", result="new") == 2
        text = get(svc, "/metrics").text
        assert 'car_agent_http_requests_total{status="200"}' in text
        assert "car_agent_store_seconds_bucket" in text
        health = get(svc, "/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "broker": True, "retained_read": True}
        paths = get(svc, "/openapi.json").json()["paths"]
        assert {"/v1/vehicles/{vid}", "/v1/vehicles/{vid}/answer",
                "/v1/vehicles/{vid}/refresh", "/healthz", "/metrics"} <= set(paths)
    finally:
        svc.stop()


def test_forged_duplicate_and_late_deliveries(service, owners, signer, pki, mqtt_client) -> None:
    _, token1, token2 = owners
    car = mqtt_client("VIN1")
    car.publish("vehicles/VIN1/state", sign(signer, claims(10, signals=dict(FULL, **{DOOR: True}))))
    stored(service, "VIN1", 1)

    # Forged: the range changed after signing.
    header, payload, sig = sign(signer, claims(11, signals={RANGE: 999_000})).decode().split(".")
    forged = json.loads(b64url_decode(payload))
    forged["signals"][RANGE] = 1
    car.publish("vehicles/VIN1/state",
                ".".join([header, b64url_encode(json.dumps(forged).encode()), sig]))
    # Signed with VIN2's key.
    stranger = Signer.from_file(pki / "VIN2.signing.key")
    car.publish("vehicles/VIN1/state", sign(stranger, claims(12, signals={RANGE: 5})))
    # VIN1's key signing for VIN2, on VIN2's topic.
    mqtt_client("VIN2").publish("vehicles/VIN2/state",
                                sign(signer, claims(1, vid="VIN2", signals={RANGE: 5})))
    # The same message again, and an older one (seq 9, earlier ts) that arrives late.
    car.publish("vehicles/VIN1/state", sign(signer, claims(10, signals={RANGE: 7})))
    car.publish("vehicles/VIN1/events", sign(signer, claims(9, kind="event",
                                                            signals={DOOR: False, FUEL: 12.0})))
    stored(service, "VIN1", 2)
    wait_for(lambda: metric(service, "car_agent_messages_rejected_total",
                            reason="duplicate") == 1, what="the duplicate rejected")
    assert metric(service, "car_agent_messages_rejected_total", reason="bad_signature") == 1
    # VIN2's key signing for VIN1, VIN1's key signing for VIN2: each key is only its car's.
    assert metric(service, "car_agent_messages_rejected_total", reason="wrong_vehicle") == 2
    assert [m["seq"] for m in service.store.messages("VIN1")] == [9, 10]
    assert service.store.view("VIN2") is None

    body = get(service, "/v1/vehicles/VIN1/answer", token1).json()
    assert body["source"]["seq"] == 10
    assert body["range_m"] == 423_600 and body["open"] == [DOOR]    # not rolled back by seq 9
    assert body["fuel_pct"] == 63.4
    missing = get(service, "/v1/vehicles/VIN2/answer", token2)
    assert (missing.status_code, missing.json()) == (404, {"detail": "no verified state for "
                                                                     "VIN2 yet"})


# --------------------------------------------------------------------------- access


def test_owner_access_negatives(service, owners, signer, mqtt_client) -> None:
    _, token1, token2 = owners
    mqtt_client("VIN1").publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL)))
    stored(service, "VIN1", 1)
    assert get(service, "/v1/vehicles/VIN1/answer", token1).status_code == 200

    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer {token1}x"}, {"Authorization": "Bearer " + "a" * 4000}):
        r = get(service, "/v1/vehicles/VIN1/answer", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    # Another owner's car and a car that does not exist look the same.
    for path in ("/v1/vehicles/VIN1", "/v1/vehicles/VIN1/answer"):
        theirs = get(service, path, token2)
        nobody = get(service, path.replace("VIN1", "VIN9"), token2)
        assert (theirs.status_code, theirs.json()) == (404, {"detail": "no such vehicle"})
        assert (nobody.status_code, nobody.content) == (theirs.status_code, theirs.content)
    theirs = get(service, "/v1/vehicles/VIN1/refresh", token2, method="POST")
    assert (theirs.status_code, theirs.json()) == (404, {"detail": "no such vehicle"})
    assert metric(service, "car_agent_refresh_total", outcome="timeout") == 0


def test_rate_limit_per_token(tmp_path, pki, broker, owners) -> None:
    path, token1, token2 = owners
    svc = start_service(serve_yaml(tmp_path / "serve", pki, broker.port, owners=path,
                                   http="listen: 127.0.0.1:0, rate: 0.01, burst: 3"))
    try:
        codes = [get(svc, "/v1/vehicles/VIN1/answer", token1).status_code for _ in range(5)]
        assert codes == [404, 404, 404, 429, 429]     # no state yet: 404 within the limit
        limited = get(svc, "/v1/vehicles/VIN1/answer", token1)
        assert limited.json() == {"detail": "too many requests for this token"}
        assert limited.headers["retry-after"] == "100"
        assert get(svc, "/v1/vehicles/VIN2/answer", token2).status_code == 404   # own bucket
        assert metric(svc, "car_agent_http_requests_total", status="429") == 3
    finally:
        svc.stop()


def test_owner_added_while_serving_can_ask_at_once(service, owners) -> None:
    token = add_owner(owners[0], ["VIN3"])
    r = wait_for(lambda: (lambda r: r if r.status_code != 401 else None)(
        get(service, "/v1/vehicles/VIN3/answer", token)), what="the new owner known")
    assert (r.status_code, r.json()) == (404, {"detail": "no verified state for VIN3 yet"})


# --------------------------------------------------------------------------- HTTP fuzz


BAD_PATHS = [
    "/v1/vehicles/", "/v1/vehicles//answer", "/v1/vehicles/" + "A" * 5000,
    "/v1/vehicles/%00", "/v1/vehicles/..%2F..%2Fetc%2Fpasswd/answer", "/v1/vehicles/%E8%BD%A6",
    "/v1/vehicles/VIN1%0A/answer", "/v1/vehicles/VIN1/answer/x", "/v1/vehicles/%ff%fe",
    "/v1/vehicles/VIN1/answer?lang=", "/v1/vehicles/VIN1/answer?lang=EN",
    "/v1/vehicles/VIN1/answer?lang=xx", "/v1/vehicles/VIN1/answer?lang=%00",
    "/v1/vehicles/VIN1/answer?lang=en&lang=zh&lang=" + "z" * 3000,
    "/v1/vehicles/VIN1/answer?lang=xx&" + "&".join(f"k{i}=v" for i in range(2000)),
    "/v1/vehicles/VIN1/refresh?lang=fr", "/v2/anything", "/%2e%2e/%2e%2e/",
]


def test_http_fuzz_is_a_clear_4xx_never_a_500(service, owners, signer, mqtt_client) -> None:
    _, token1, _ = owners
    mqtt_client("VIN1").publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL)))
    stored(service, "VIN1", 1)
    seen = []
    for path in BAD_PATHS:
        method = "POST" if "refresh" in path else "GET"
        r = get(service, path, token1, method=method)
        seen.append((path[:60], r.status_code))
        assert 400 <= r.status_code < 500, (path[:80], r.status_code, r.text[:200])
        assert r.headers.get("content-type", "").startswith("application/json"), path[:80]
    assert dict(seen)["/v1/vehicles/VIN1/answer?lang=xx"] == 422
    # Methods, bodies and headers.
    cases = [
        ("PUT", "/v1/vehicles/VIN1/answer", {}, None, 405),
        ("DELETE", "/v1/vehicles/VIN1", {}, None, 405),
        ("GET", "/v1/vehicles/VIN1/refresh", {}, None, 405),
        ("POST", "/v1/vehicles/VIN1/answer", {"content-type": "application/json"}, b"{" * 10000,
         405),
        ("GET", "/v1/vehicles/VIN1/answer", {"X-Huge": "x" * 70_000}, None, 431),
        ("GET", "/v1/vehicles/VIN1/answer", {f"X-H{i}": "y" * 10 for i in range(300)}, None, 431),
        ("GET", "/v1/vehicles/VIN1/answer", {"Authorization": "Bearer \x7f\x01"}, None, 401),
        ("GET", "/v1/vehicles/VIN1/answer", {"Authorization": "Bearer ".encode() + b"\xe9\xff" * 50},
         None, 401),
    ]
    for method, path, headers, content, expected in cases:
        headers = {"Authorization": f"Bearer {token1}", **headers}
        r = httpx.request(method, service.url + path, headers=headers, content=content,
                          timeout=20)
        assert r.status_code == expected, (method, path, list(headers)[-1][:20], r.status_code)
    text = get(service, "/metrics").text
    assert 'status="5' not in text
    # Still serving.
    assert get(service, "/v1/vehicles/VIN1/answer", token1).status_code == 200


# --------------------------------------------------------------------------- refresh


def test_refresh_asks_the_car_and_answers_fresh(service, owners, signer, mqtt_client) -> None:
    _, token1, _ = owners
    car, requests = fake_car(mqtt_client, signer, answers=True)
    car.publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL)))
    stored(service, "VIN1", 1)
    r = get(service, "/v1/vehicles/VIN1/refresh?lang=zh", token1, method="POST")
    assert r.status_code == 200, r.text
    assert r.json()["source"]["seq"] == 100 and r.json()["fuel_pct"] == 12.5
    assert r.json()["lang"] == "zh"
    [props] = requests
    assert props.ResponseTopic == f"vehicles/VIN1/snapshot/{service.ingest.name}"
    assert len(props.CorrelationData) == 16
    assert metric(service, "car_agent_refresh_total", outcome="answered") == 1


def test_refresh_of_a_silent_car_is_504_with_the_last_known_answer(
        service, owners, signer, mqtt_client) -> None:
    _, token1, _ = owners
    car, requests = fake_car(mqtt_client, signer, answers=False)
    car.publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL)))
    stored(service, "VIN1", 1)
    r = get(service, "/v1/vehicles/VIN1/refresh", token1, method="POST")
    assert r.status_code == 504
    assert r.json()["source"]["seq"] == 1 and r.json()["range_m"] == 423_600
    assert len(requests) == 1
    assert metric(service, "car_agent_refresh_total", outcome="timeout") == 1


# --------------------------------------------------------------------------- the command


def test_serve_command_runs_and_stops_on_sigterm(tmp_path, pki, broker, owners) -> None:
    port = free_port()
    config = serve_yaml(tmp_path / "serve", pki, broker.port, owners=owners[0],
                        http=f"listen: 127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(config)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()["broker"]
            except (httpx.HTTPError, ValueError):
                return proc.poll() is not None
        wait_for(healthy, timeout=30, what="serve healthy")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "serve" / "state.db").is_file()     # sqlite:///state.db: the config's folder
    assert "Traceback" not in proc.stderr.read()


def test_serve_refuses_plain_http_on_a_public_address(tmp_path, pki) -> None:
    config = serve_yaml(tmp_path, pki, 1, http="listen: '0.0.0.0:8080'")
    run = subprocess.run([sys.executable, "-m", "agent", "serve", "--config", str(config)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"car-agent serve: error: {config}: http.listen: 0.0.0.0:8080 is not a loopback address: "
        "set http.cert and http.key (HTTPS), or http.insecure: true if TLS ends at a proxy in "
        "front"]
    assert not (tmp_path / "state.db").exists()


# --------------------------------------------------------------------------- in-process fuzz


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    """The API app over a SQLite store holding VIN1 (no broker: refresh is never answered)."""
    folder = tmp_path_factory.mktemp("fuzz")
    token = add_owner(folder / "owners.yaml", ["VIN1"])
    store = open_store("sqlite:///state.db", folder)
    store.apply({"vid": "VIN1", "kind": "state", "verified": True, "seq": 1, "boot": 1,
                 "kid": "k", "stream": "", "ts": 1_764_000_000_000, "signals": FULL,
                 "quality": {}})
    metrics = ServeMetrics()
    app = create_app(store, OwnerDirectory(folder / "owners.yaml"), RateLimiter(1e9, 10**9),
                     metrics, refresh=lambda vid: False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", http="h11"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn listening")
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
        yield client, token, metrics
    server.should_exit = True
    thread.join(10)
    store.close()


_segment = st.one_of(st.sampled_from(["VIN1", "VIN2", "", ".", "..", "answer", "refresh"]),
                     st.text(min_size=1, max_size=80))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vid=_segment, tail=st.sampled_from(["", "/answer", "/refresh", "/x"]),
       lang=st.one_of(st.none(), st.text(max_size=20)),
       method=st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
       auth=st.one_of(st.none(), st.just("good"),     # control characters cannot be sent
                      st.text(st.characters(blacklist_categories=("Cc",)), max_size=60)))
def test_fuzzed_requests_never_500(app_client, vid, tail, lang, method, auth) -> None:
    client, token, metrics = app_client
    headers = {}
    if auth == "good":
        headers["Authorization"] = f"Bearer {token}"
    elif auth is not None:
        # raw bytes on the wire; HTTP itself allows no spaces around a header value
        headers["Authorization"] = auth.strip(" \t").encode("utf-8", "replace")
    params = {} if lang is None else {"lang": lang}
    r = client.request(method, f"/v1/vehicles/{quote(vid, safe='')}{tail}", params=params,
                       headers=headers)
    assert r.status_code < 500 or (r.status_code == 504 and tail == "/refresh"), \
        (method, vid, tail, lang, auth, r.status_code, r.text[:200])
    if r.status_code == 200:
        assert vid == "VIN1" and auth == "good"


def test_a_port_in_use_is_one_line(tmp_path, pki, broker, service) -> None:
    config = serve_yaml(tmp_path / "second", pki, broker.port,
                        http=f"listen: 127.0.0.1:{service.port}")
    with pytest.raises(ConfigError) as err:
        Service(load_cloud_config(config)).start()
    assert str(err.value) == (f"{config}: http.listen: cannot listen on 127.0.0.1:"
                              f"{service.port} (address already in use)")


def test_a_revoked_signing_key_never_reaches_the_store(tmp_path, owners) -> None:
    require_mosquitto()
    pki = tmp_path / "pki"
    init_pki(pki, ["VIN1"])
    revoke(pki, "VIN1", "key-compromise")
    # The broker does not know the CRL (VIN1 still connects): serve alone must refuse it.
    with DevBroker(pki, tmp_path / "broker") as dev:
        svc = start_service(serve_yaml(tmp_path / "serve", pki, dev.port, owners=owners[0],
                                       extra=f"crl: {pki / 'crl.pem'}"))
        car = VehicleClient(dev.port, pki / "ca.crt", pki / "VIN1.crt", pki / "VIN1.key", "car")
        try:
            signer = Signer.from_file(pki / "VIN1.signing.key")
            assert not car.publish("vehicles/VIN1/state",
                                   sign(signer, claims(1, signals=FULL))).is_failure
            wait_for(lambda: metric(svc, "car_agent_messages_rejected_total",
                                    reason="revoked") == 1, what="rejected as revoked")
            assert svc.store.count() == 0
            r = get(svc, "/v1/vehicles/VIN1/answer", owners[1])
            assert (r.status_code, r.json()) == (404, {"detail": "no verified state for VIN1 yet"})
        finally:
            car.close()
            svc.stop()


def test_https_with_http_cert_and_key(tmp_path, pki, broker, owners) -> None:
    """The dev PKI's broker certificate (SAN 127.0.0.1) serves as the API's certificate here."""
    svc = start_service(serve_yaml(tmp_path / "serve", pki, broker.port, owners=owners[0],
                                   http=f"listen: '0.0.0.0:0', cert: {pki / 'broker.crt'}, "
                                        f"key: {pki / 'broker.key'}"))
    try:
        assert svc.url.startswith("https://0.0.0.0:")
        url = f"https://127.0.0.1:{svc.port}"
        r = httpx.get(f"{url}/v1/vehicles/VIN1/answer",
                      headers={"Authorization": f"Bearer {owners[1]}"},
                      verify=ssl.create_default_context(cafile=str(pki / "ca.crt")), timeout=20)
        assert (r.status_code, r.json()) == (404, {"detail": "no verified state for VIN1 yet"})
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{svc.port}/healthz", timeout=20)    # no plain HTTP
    finally:
        svc.stop()


def test_a_real_agent_answers_the_owner_s_refresh(tmp_path, pki, broker, service, owners) -> None:
    """The whole chain: CAN frames -> the real agent -> signed snapshot on serve's response
    topic -> store -> the owner's answer over HTTP."""
    from coredata import BODY_ID, CLUSTER_ID, OPEN, body_payload, cluster_payload
    from support.live_agent import RunningAgent

    (tmp_path / "car").mkdir()
    with RunningAgent(tmp_path / "car", pki, broker.port) as car:
        car.keep_sending({CLUSTER_ID: cluster_payload(fuel=100, range_km=512, litres=300),
                          BODY_ID: body_payload(doors=(OPEN, 0, 0, 0), locks=(1, 1, 1, 1))})
        wait_for(lambda: car.agent.pipeline.state.snapshot(time.time())[RANGE]["value"]
                 == 512_000, what="the agent decoding")
        r = get(service, "/v1/vehicles/VIN1/refresh", owners[1], method="POST")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["range_m"], body["fuel_pct"], body["open"]) == \
            (512_000, 40.0, ["Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"])
        [snapshot] = [m for m in service.store.messages("VIN1") if m["kind"] == "snapshot"]
        assert body["source"]["seq"] == snapshot["seq"]
        assert metric(service, "car_agent_messages_verified_total", kind="snapshot") == 1
