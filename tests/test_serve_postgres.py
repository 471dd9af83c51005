"""serve on a real PostgreSQL (a private cluster started here): two instances in one share group
on one database, and concurrent writers for one vehicle."""

from __future__ import annotations

import random
import threading
from typing import Iterator

import pytest

from agent.cloud.owners import add_owner
from agent.cloud.store import open_store
from agent.cloud.view import merge
from agent.uplink.signing import Signer
from support.postgres import PrivatePostgres
from support.serving import (DOOR, FUEL, FULL, RANGE, T0, claims, fake_car, get, metric,
                             serve_yaml, sign, start_service, wait_for)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres().start()
    yield pg
    pg.stop()


def test_two_instances_split_the_stream_store_each_message_once_and_agree(
        tmp_path, pki, broker, postgres, mqtt_client) -> None:
    url = postgres.create_database("fleet")
    owners = tmp_path / "owners.yaml"
    token = add_owner(owners, ["VIN1", "VIN2"])
    signers = {vid: Signer.from_file(pki / f"{vid}.signing.key") for vid in ("VIN1", "VIN2")}
    cars = {vid: mqtt_client(vid) for vid in ("VIN1", "VIN2")}
    # Retained before either instance runs: a shared subscription does not deliver it, so each
    # instance reads it at start; it is stored once.
    for vid, car in cars.items():
        car.publish(f"vehicles/{vid}/state", sign(signers[vid], claims(1, vid=vid, signals=FULL)),
                    retain=True)
    services = [start_service(serve_yaml(tmp_path / name, pki, broker.port, store=url,
                                         owners=owners, share_group="serve"), name=f"serve-{name}")
                for name in ("a", "b")]
    try:
        for seq in range(2, 42):
            for vid, car in cars.items():
                car.publish(f"vehicles/{vid}/events", sign(signers[vid], claims(
                    seq, vid=vid, kind="event", signals={RANGE: 400_000 - seq * 1000,
                                                         DOOR: seq % 2 == 0})))
        a, b = services
        wait_for(lambda: a.store.count() == 82, timeout=30, what="82 messages stored")
        for vid in ("VIN1", "VIN2"):
            assert sorted(m["seq"] for m in a.store.messages(vid, limit=1000)) == list(range(1, 42))
        new = sum(metric(s, "car_agent_messages_stored_total", result="new") for s in services)
        assert new == 82
        assert sum(metric(s, "car_agent_messages_stored_total", result="duplicate")
                   for s in services) >= 2      # the retained state, read by both
        assert [metric(s, "car_agent_retained_read_total") for s in services] == [2, 2]
        # The broker split the live stream: each instance verified a share of it.
        events = [metric(s, "car_agent_messages_verified_total", kind="event") for s in services]
        assert sum(events) == 80 and min(events) > 0, events
        for vid in ("VIN1", "VIN2"):
            answers = [get(s, f"/v1/vehicles/{vid}/answer", token).json() for s in services]
            for body in answers:
                assert body["source"]["seq"] == 41
                assert (body["range_m"], body["fuel_pct"], body["open"]) == (359_000, 63.4, [])
            assert answers[0]["text"].split(":", 1)[1] == answers[1]["text"].split(":", 1)[1]
            assert a.store.view(vid) == b.store.view(vid)
    finally:
        for s in services:
            s.stop()


def test_refresh_on_one_instance_sees_a_snapshot_the_other_stored(
        tmp_path, pki, broker, postgres, mqtt_client) -> None:
    url = postgres.create_database("refresh")
    owners = tmp_path / "owners.yaml"
    token = add_owner(owners, ["VIN1"])
    signer = Signer.from_file(pki / "VIN1.signing.key")
    car, requests = fake_car(mqtt_client, signer, answers=True)
    services = [start_service(serve_yaml(tmp_path / name, pki, broker.port, store=url,
                                         owners=owners, share_group="serve"), name=f"serve-{name}")
                for name in ("a", "b")]
    try:
        a, b = services
        car.publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL)))
        wait_for(lambda: a.store.count() >= 1, what="first state stored")
        for n in range(6):
            r = get(a, "/v1/vehicles/VIN1/refresh", token, method="POST")
            assert r.status_code == 200, r.text
            assert r.json()["source"]["seq"] == 100 + n
        # The answers went to either instance of the group; instance a saw them all.
        stored_by_b = metric(b, "car_agent_messages_stored_total", result="new")
        assert metric(a, "car_agent_refresh_total", outcome="answered") == 6
        assert stored_by_b + metric(a, "car_agent_messages_stored_total", result="new") == 7
        assert len(requests) == 6
    finally:
        for s in services:
            s.stop()


def test_concurrent_writers_for_one_vehicle_lose_nothing(tmp_path, postgres) -> None:
    """Eight writers (two stores, as two instances; four threads each) apply one vehicle's
    messages in a shuffled order: the result is the merge of all of them."""
    N, W = 600, 8
    url = postgres.create_database("concurrent")
    rng = random.Random(7)
    records = []
    for seq in range(1, N + 1):
        signals = {RANGE: seq * 100, FUEL: float(seq), DOOR: seq % 3 == 0}
        records.append({"vid": "VIN1", "kind": "event", "verified": True, "seq": seq, "boot": 1,
                        "kid": "k", "stream": "", "ts": int((T0 + seq) * 1000),
                        "signals": {p: v for p, v in signals.items() if rng.random() < 0.6},
                        "quality": {}})
    expected = None
    for r in records:
        expected = merge(expected, r)
    shuffled = records[:]
    rng.shuffle(shuffled)
    stores = [open_store(url, tmp_path, history=N), open_store(url, tmp_path, history=N)]
    try:
        start = threading.Barrier(W)
        errors: list[BaseException] = []

        def write(store, part) -> None:
            start.wait()
            try:
                for r in part:
                    assert store.apply(r)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(stores[i % 2], shuffled[i::W]))
                   for i in range(W)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert stores[0].count() == N
        view = stores[1].view("VIN1")
        assert view.source == expected.source and view.source.seq == N
        assert dict(view.readings) == dict(expected.readings)
    finally:
        for s in stores:
            s.close()


def test_a_write_waits_for_another_instance_holding_the_vehicle(tmp_path, postgres) -> None:
    """The load-merge-save of one instance holds the vehicle's row: another instance's write for
    that vehicle waits for it (seen in pg_stat_activity), then merges on top of it."""
    import psycopg

    url = postgres.create_database("row_lock")
    first, second = open_store(url, tmp_path), open_store(url, tmp_path)
    record = {"vid": "VIN1", "kind": "event", "verified": True, "seq": 2, "boot": 1, "kid": "k",
              "stream": "", "ts": int((T0 + 2) * 1000), "signals": {RANGE: 2000}, "quality": {}}
    first.apply(dict(record, seq=1, ts=int((T0 + 1) * 1000), signals={RANGE: 1000}))
    done = threading.Event()
    try:
        with first.transaction("VIN1"), psycopg.connect(url, autocommit=True) as watcher:
            writer = threading.Thread(target=lambda: (second.apply(record), done.set()))
            writer.start()
            wait_for(lambda: watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'").fetchone()[0] == 1, what="the writer waiting")
            assert not done.is_set()
        writer.join(30)
        assert done.is_set()
        assert first.view("VIN1").readings[RANGE].value == 2000
    finally:
        first.close()
        second.close()


def test_a_database_outage_is_503_and_counted_and_serve_recovers(tmp_path, pki, broker,
                                                                 mqtt_client, caplog) -> None:
    pg = PrivatePostgres().start()     # its own cluster: this test stops it
    try:
        url = pg.create_database("outage")
        owners = tmp_path / "owners.yaml"
        token = add_owner(owners, ["VIN1"])
        signer = Signer.from_file(pki / "VIN1.signing.key")
        car = mqtt_client("VIN1")
        svc = start_service(serve_yaml(tmp_path / "serve", pki, broker.port, store=url,
                                       owners=owners))
        try:
            car.publish("vehicles/VIN1/state", sign(signer, claims(1, signals=FULL)))
            wait_for(lambda: svc.store.count() == 1, what="stored")
            pg.halt()
            r = get(svc, "/v1/vehicles/VIN1/answer", token)
            assert (r.status_code, r.json()) == (503, {"detail": "service unavailable"})
            assert get(svc, "/healthz").status_code == 503
            car.publish("vehicles/VIN1/events", sign(signer, claims(2, kind="event",
                                                                    signals={DOOR: True})))
            wait_for(lambda: metric(svc, "car_agent_store_errors_total") == 1, what="counted")
            assert svc.ingest.watcher.connected.is_set()
            pg.resume()
            wait_for(lambda: get(svc, "/v1/vehicles/VIN1/answer", token).status_code == 200,
                     timeout=30, what="answers again")
            car.publish("vehicles/VIN1/events", sign(signer, claims(3, kind="event",
                                                                    signals={DOOR: True})))
            wait_for(lambda: svc.store.count() == 2, timeout=30, what="stored again")
            assert get(svc, "/v1/vehicles/VIN1/answer", token).json()["open"] == [DOOR]
            # Logged as one line each, no traceback.
            assert [r.getMessage() for r in caplog.records if r.exc_info] == []
            assert any(r.getMessage().startswith("GET /v1/vehicles/VIN1/answer failed: ")
                       for r in caplog.records)
        finally:
            svc.stop()
    finally:
        pg.stop()
