"""agent.cloud.view and agent.cloud.answer: verified records in, the owner's answer out.

Records are written by hand in the shape MessageChecker gives verified messages; the expected
sentences and numbers are written down here, not computed by the code under test."""

from __future__ import annotations

import pytest

from agent.cloud.answer import NoAnswer, answer, range_km
from agent.cloud.view import merge

T = 1_764_000_000.0            # 2025-11-24T16:00:00Z
RANGE = "Vehicle.Powertrain.FuelSystem.Range"
FUEL = "Vehicle.Powertrain.FuelSystem.RelativeLevel"
D1 = "Vehicle.Cabin.Door.Row1.DriverSide"
P1 = "Vehicle.Cabin.Door.Row1.PassengerSide"
D2 = "Vehicle.Cabin.Door.Row2.DriverSide"
P2 = "Vehicle.Cabin.Door.Row2.PassengerSide"
TRUNK = "Vehicle.Body.Trunk.Rear.IsOpen"
HOOD = "Vehicle.Body.Hood.IsOpen"


def record(kind="state", seq=7, ts=T, signals=None, quality=None, age=None, stream="s1", boot=2):
    r = {"vid": "VIN1", "topic": f"vehicles/VIN1/{kind}", "kind": kind, "verified": True,
         "seq": seq, "boot": boot, "kid": "kid-1", "stream": stream, "ts": int(ts * 1000),
         "signals": signals or {}, "quality": quality or {}, "retained": False}
    if age is not None:
        r["age"] = age
    return r


CLOSED_LOCKED = {RANGE: 423_600, FUEL: 63.4, f"{D1}.IsOpen": False, f"{P1}.IsOpen": False,
                 f"{D2}.IsOpen": False, f"{P2}.IsOpen": False, f"{D1}.IsLocked": True,
                 f"{P1}.IsLocked": True, f"{D1}.Window.Position": 0, f"{P2}.Window.Position": 0,
                 TRUNK: False, HOOD: False}


def test_everything_closed_and_locked_is_one_phrase():
    view = merge(None, record(signals=CLOSED_LOCKED))
    view = merge(view, {"vid": "VIN1", "kind": "status", "status": "online", "verified": False})
    en = answer(view, "en", now=T + 12)
    assert en["text"] == ("As of 12 s ago: about 420 km of range, 63% fuel. "
                          "Everything is closed and locked. The car is online. Signature verified.")
    assert en["ssml"] == ("<speak>As of 12 seconds ago: about 420 km of range, 63% fuel. "
                          "Everything is closed and locked. The car is online. "
                          "Signature verified.</speak>")
    assert (en["range_m"], en["fuel_pct"], en["open"], en["unlocked"], en["unknown"]) == \
        (423_600, 63.4, [], [], [])
    assert (en["as_of"], en["age_s"], en["online"], en["verified"]) == \
        ("2025-11-24T16:00:00Z", 12, True, True)
    assert en["source"] == {"seq": 7, "boot": 2, "kid": "kid-1", "stream": "s1"}
    zh = answer(view, "zh", now=T + 12)
    assert zh["text"] == "数据来自12秒前：续航约420公里，油量63%。全部已关闭并上锁。车辆在线。签名已验证。"
    assert zh["ssml"] is None and zh["lang"] == "zh"


def test_open_unlocked_and_unknown_are_each_named():
    signals = dict(CLOSED_LOCKED, **{f"{D1}.IsOpen": True, f"{P2}.Window.Position": 40,
                                     f"{P1}.IsLocked": False, TRUNK: True, HOOD: None})
    view = merge(None, record(signals=signals, quality={HOOD: "stale"}, age={HOOD: 7200}))
    en = answer(view, "en", now=T + 3 * 3600 + 5)
    assert en["open"] == [f"{D1}.IsOpen", f"{P2}.Window.Position", TRUNK]
    assert en["unlocked"] == [f"{P1}.IsLocked"]
    assert en["unknown"] == [HOOD]
    assert en["text"] == ("As of 3 h ago: about 420 km of range, 63% fuel. Open: driver's door, "
                          "rear passenger-side window (40%), trunk. Unlocked: front passenger door. "
                          "Unknown: hood (no recent data). Signature verified.")
    zh = answer(view, "zh", now=T + 3 * 3600 + 5)
    assert zh["text"] == ("数据来自3小时前：续航约420公里，油量63%。打开：主驾车门、后排副驾侧车窗（40%）、"
                          "后备箱。未上锁：副驾车门。未知：引擎盖（无最新数据）。签名已验证。")


def test_a_stale_range_is_unknown_and_says_what_it_was():
    view = merge(None, record(kind="event", seq=3, ts=T, signals={RANGE: 300_000}))
    view = merge(view, record(seq=4, ts=T + 3600, signals={RANGE: None, f"{D1}.IsOpen": False},
                              quality={RANGE: "stale"}, age={RANGE: 3500, f"{D1}.IsOpen": 1}))
    en = answer(view, "en", now=T + 3600 + 60)
    assert en["range_m"] == 300_000          # the last valid range, with the signal unknown
    assert en["unknown"] == [RANGE]
    assert en["text"] == ("As of 1 min ago. Everything is closed. Unknown: range (no recent data; "
                          "last known 300 km (1 h ago)). Signature verified.")
    assert "未知：续航（无最新数据，最后已知300公里（1小时前））" in answer(view, "zh", now=T + 3660)["text"]


def test_an_invalid_door_is_not_guessed_closed():
    view = merge(None, record(signals={f"{D1}.IsOpen": None, f"{P1}.IsOpen": False},
                              quality={f"{D1}.IsOpen": "invalid"}))
    en = answer(view, "en", now=T)
    assert en["open"] == [] and en["unknown"] == [f"{D1}.IsOpen"]
    assert en["text"] == ("As of 0 s ago. Nothing is reported open. "
                          "Unknown: driver's door (no valid reading). Signature verified.")


def test_a_late_older_message_never_rolls_the_state_back():
    newer = record(kind="event", seq=9, ts=T + 10, signals={f"{D1}.IsOpen": False})
    older = record(kind="event", seq=8, ts=T + 5, signals={f"{D1}.IsOpen": True})
    view = merge(merge(None, newer), older)
    assert view.readings[f"{D1}.IsOpen"].value is False
    assert view.source.seq == 9
    assert answer(view, now=T + 10)["open"] == []


def test_state_values_are_dated_by_their_age_not_the_signing_time():
    # The event at T+10 saw the door open; a state signed later says "closed" as of T+2
    # (its last frame was 8 s before signing): the event is newer for that signal.
    event = record(kind="event", seq=5, ts=T + 10, signals={f"{D1}.IsOpen": True})
    state = record(seq=6, ts=T + 10.5, signals={f"{D1}.IsOpen": False, FUEL: 50},
                   age={f"{D1}.IsOpen": 8.5, FUEL: 0.5})
    view = merge(merge(None, event), state)
    assert view.readings[f"{D1}.IsOpen"].value is True
    assert view.readings[f"{D1}.IsOpen"].as_of == T + 10
    assert view.readings[FUEL].value == 50 and view.source.seq == 6


def test_a_new_stream_replaces_an_old_one_by_time_not_seq():
    old = record(kind="event", seq=500, ts=T, signals={f"{D1}.IsOpen": True}, stream="old")
    new = record(kind="event", seq=1, ts=T + 60, signals={f"{D1}.IsOpen": False}, stream="new")
    view = merge(merge(None, old), new)
    assert view.readings[f"{D1}.IsOpen"].value is False
    assert view.source.stream == "new" and view.source.seq == 1


@pytest.mark.parametrize("metres, km", [(0, 0), (99_400, 99), (99_600, 100), (104_900, 100),
                                        (105_000, 110), (423_600, 420), (1_234_567, 1230)])
def test_range_rounding(metres, km):
    assert range_km(metres) == km


@pytest.mark.parametrize("seconds, en, zh", [(59, "59 s ago", "59秒前"), (60, "1 min ago", "1分钟前"),
                                             (3 * 3600, "3 h ago", "3小时前"),
                                             (86400, "1 day ago", "1天前"),
                                             (5 * 86400 + 7, "5 days ago", "5天前")])
def test_ages_are_said(seconds, en, zh):
    view = merge(None, record(signals={FUEL: 10}))
    assert answer(view, "en", now=T + seconds)["text"].startswith(f"As of {en}: 10% fuel.")
    assert answer(view, "zh", now=T + seconds)["text"].startswith(f"数据来自{zh}：油量10%。")


def test_offline_says_it_is_the_last_report():
    view = merge(merge(None, record(signals={FUEL: 10})),
                 {"vid": "VIN1", "kind": "status", "status": "offline", "verified": False})
    assert answer(view, now=T)["online"] is False
    assert "The car is offline; this is its last report." in answer(view, now=T)["text"]


def test_nothing_verified_means_no_answer():
    only_status = merge(None, {"vid": "VIN1", "kind": "status", "status": "online"})
    with pytest.raises(NoAnswer):
        answer(only_status)
    rejected = {"vid": "VIN1", "kind": "state", "verified": False, "rejected": "bad signature"}
    assert merge(only_status, rejected) == only_status
    with pytest.raises(ValueError):
        answer(merge(None, record(signals={FUEL: 1})), "fr")
