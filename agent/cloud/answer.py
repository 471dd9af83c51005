"""The owner's answer: how far the car can go, what is open or unlocked, and how old that is.

One function, :func:`answer`, turns a :class:`~agent.cloud.view.VehicleView` (verified data only)
into the JSON contract that ``status --json``, ``GET /v1/vehicles/{vid}/answer`` and a voice skill
use::

    {"vid", "text", "ssml", "lang", "as_of", "age_s", "online", "range_m", "fuel_pct",
     "open": [VSS paths], "unlocked": [VSS paths], "unknown": [VSS paths], "verified": true,
     "source": {"seq", "boot", "kid", "stream"}}

Rules: range in km, rounded to 10 km at or above 100 km; a signal that is invalid or stale is
said to be unknown, with why (and what it was when last known), never guessed and never
dropped; everything closed is said in one phrase; the age of the data is always said. English
(``en``, with SSML for Alexa-style skills) and Simplified Chinese (``zh``, plain text: Chinese
voice platforms take no SSML).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from agent.cloud.checks import iso_utc
from agent.cloud.view import Reading, VehicleView

LANGS = ("en", "zh")
RANGE = "Vehicle.Powertrain.FuelSystem.Range"
FUEL = "Vehicle.Powertrain.FuelSystem.RelativeLevel"

_DOOR = re.compile(r"Vehicle\.Cabin\.Door\.Row(\d+)\.(DriverSide|PassengerSide)\."
                   r"(IsOpen|IsLocked|Window\.Position)")
_LIDS = {
    "Vehicle.Body.Trunk.Rear.IsOpen": ("trunk", "后备箱"),
    "Vehicle.Body.Trunk.Front.IsOpen": ("front trunk", "前备箱"),
    "Vehicle.Body.Hood.IsOpen": ("hood", "引擎盖"),
}
SUNROOF = "Vehicle.Cabin.Sunroof.Position"
# Order in which parts are listed: doors, windows, lids, sunroof.
_RANK = {"door": 0, "window": 1, "lid": 2, "sunroof": 3, "lock": 4}


class NoAnswer(Exception):
    """Nothing verified can be said about the vehicle (no signed message yet)."""


@dataclass(frozen=True)
class _Part:
    path: str
    kind: str          # door, window, lid, sunroof, lock
    names: tuple[str, str]   # en, zh


def _part(path: str) -> _Part | None:
    m = _DOOR.fullmatch(path)
    if m:
        row, side, leaf = int(m.group(1)), m.group(2), m.group(3)
        driver = side == "DriverSide"
        thing = "window" if leaf == "Window.Position" else "door"
        zh_thing = "车窗" if thing == "window" else "车门"
        if row == 1:
            en = f"driver's {thing}" if driver else f"front passenger {thing}"
            zh = ("主驾" if driver else "副驾") + zh_thing
        else:
            where = "rear" if row == 2 else f"row {row}"
            en = f"{where} {'driver' if driver else 'passenger'}-side {thing}"
            zh = ("后排" if row == 2 else f"第{row}排") + ("主驾侧" if driver else "副驾侧") + zh_thing
        kind = "lock" if leaf == "IsLocked" else thing
        return _Part(path, kind, (en, zh))
    if path in _LIDS:
        return _Part(path, "lid", _LIDS[path])
    if path == SUNROOF:
        return _Part(path, "sunroof", ("sunroof", "天窗"))
    return None


def _ago(seconds: float, lang: str, spoken: bool = False) -> str:
    s = max(0, int(seconds))
    for size, en_unit, en_word, zh_unit in ((86400, "d", "day", "天"), (3600, "h", "hour", "小时"),
                                            (60, "min", "minute", "分钟"), (1, "s", "second", "秒")):
        if s >= size or size == 1:
            n = s // size
            if lang == "zh":
                return f"{n}{zh_unit}前"
            if spoken or size == 86400:
                return f"{n} {en_word}{'' if n == 1 else 's'} ago"
            return f"{n} {en_unit} ago"
    raise AssertionError("unreachable")


def range_km(metres: float) -> int:
    """Kilometres as said to the owner: to 10 km at or above 100 km, else to 1 km."""
    km = metres / 1000.0
    if km >= 100:
        return int(km / 10 + 0.5) * 10
    return int(km + 0.5)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Words:
    """The phrases of one language."""

    def __init__(self, lang: str, spoken: bool) -> None:
        self.lang = lang
        self.spoken = spoken

    def ago(self, seconds: float) -> str:
        return _ago(seconds, self.lang, self.spoken)

    def join(self, items: list[str]) -> str:
        return "、".join(items) if self.lang == "zh" else ", ".join(items)

    def why(self, reading: Reading, now: float, last_known: str | None) -> str:
        if self.lang == "zh":
            why = "无最新数据" if reading.quality == "stale" else "传感器无有效值"
            return f"{why}，最后已知{last_known}" if last_known else why
        why = "no recent data" if reading.quality == "stale" else "no valid reading"
        return f"{why}; last known {last_known}" if last_known else why


def answer(view: VehicleView, lang: str = "en", now: float | None = None) -> dict[str, Any]:
    """The answer for ``view`` in ``lang`` (``en`` or ``zh``) at wall time ``now``.

    :raises NoAnswer: the view holds no verified message.
    :raises ValueError: an unknown language.
    """
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}")
    if view.source is None:
        raise NoAnswer(f"no verified state for {view.vid}")
    now = time.time() if now is None else now
    readings = view.readings
    open_paths: list[str] = []
    unlocked: list[str] = []
    unknown = [p for p in (RANGE, FUEL) if p in readings and not readings[p].valid]
    parts = sorted((p for p in map(_part, readings) if p is not None),
                   key=lambda p: (_RANK[p.kind], p.path))
    for part in parts:
        reading = readings[part.path]
        if not reading.valid:
            unknown.append(part.path)
        elif part.kind in ("window", "sunroof"):
            if (_number(reading.value) or 0.0) > 0:
                open_paths.append(part.path)
        elif part.kind == "lock":
            if reading.value is False:
                unlocked.append(part.path)
        elif reading.value is True:
            open_paths.append(part.path)
    range_m = _last_valid_number(readings.get(RANGE))
    fuel = _last_valid_number(readings.get(FUEL))
    age_s = max(0, int(now - view.as_of))
    result: dict[str, Any] = {
        "vid": view.vid,
        "lang": lang,
        "as_of": iso_utc(view.as_of, "seconds"),
        "age_s": age_s,
        "online": view.online,
        "range_m": range_m,
        "fuel_pct": None if fuel is None else round(fuel, 1),
        "open": open_paths,
        "unlocked": unlocked,
        "unknown": unknown,
        "verified": True,
        "source": view.source.as_dict(),
    }
    by_path = {p.path: p for p in parts}
    facts = (view, by_path, open_paths, unlocked, unknown, range_m, fuel, now)
    result["text"] = _say(_Words(lang, spoken=False), *facts)
    result["ssml"] = (f"<speak>{escape(_say(_Words(lang, spoken=True), *facts))}</speak>"
                      if lang == "en" else None)
    return result


def _last_valid_number(reading: Reading | None) -> int | float | None:
    """The last valid value of a numeric signal, as the car sent it (None if never valid)."""
    if reading is None or _number(reading.value) is None:
        return None
    return reading.value


def _say(w: _Words, view: VehicleView, parts: dict[str, _Part], open_paths: list[str],
         unlocked: list[str], unknown: list[str], range_m: float | None, fuel: float | None,
         now: float) -> str:
    zh = w.lang == "zh"
    readings = view.readings
    i = 1 if zh else 0

    def name(path: str) -> str:
        return parts[path].names[i]

    def last_known(path: str) -> str | None:
        reading = readings[path]
        if reading.valid_as_of is None or reading.value is None:
            return None
        if path == RANGE:
            value = f"{range_km(reading.value)} km" if not zh else f"{range_km(reading.value)}公里"
        elif path == FUEL:
            value = f"{round(reading.value)}%"
        else:
            value = _state_word(parts[path], reading.value, zh)
        return f"{value} ({w.ago(now - reading.valid_as_of)})" if not zh else \
            f"{value}（{w.ago(now - reading.valid_as_of)}）"

    def unknown_text(path: str) -> str:
        why = w.why(readings[path], now, last_known(path))
        label = {RANGE: ("range", "续航"), FUEL: ("fuel level", "油量")}.get(path)
        label_text = label[i] if label else name(path)
        return f"{label_text}（{why}）" if zh else f"{label_text} ({why})"

    sentences: list[str] = []
    age = w.ago(now - view.as_of)
    figures = []
    if range_m is not None and RANGE not in unknown:
        figures.append(f"续航约{range_km(range_m)}公里" if zh else
                       f"about {range_km(range_m)} km of range")
    if fuel is not None and FUEL not in unknown:
        figures.append(f"油量{round(fuel)}%" if zh else f"{round(fuel)}% fuel")
    if zh:
        sentences.append(f"数据来自{age}" + (f"：{'，'.join(figures)}。" if figures else "。"))
    else:
        sentences.append(f"As of {age}" + (f": {', '.join(figures)}." if figures else "."))

    openings_unknown = [p for p in unknown if p in parts and parts[p].kind != "lock"]
    locks_known = any(p.kind == "lock" for p in parts.values())
    locks_unknown = [p for p in unknown if p in parts and parts[p].kind == "lock"]
    if open_paths:
        items = [_with_position(name(p), readings[p], parts[p], zh) for p in open_paths]
        sentences.append(f"打开：{w.join(items)}。" if zh else f"Open: {w.join(items)}.")
    elif openings_unknown:
        sentences.append("没有已知打开的部位。" if zh else "Nothing is reported open.")
    elif any(p.kind != "lock" for p in parts.values()):
        all_locked = locks_known and not unlocked and not locks_unknown
        if zh:
            sentences.append("全部已关闭并上锁。" if all_locked else "全部已关闭。")
        else:
            sentences.append("Everything is closed and locked." if all_locked
                             else "Everything is closed.")
    if unlocked:
        items = [name(p) for p in unlocked]
        sentences.append(f"未上锁：{w.join(items)}。" if zh else f"Unlocked: {w.join(items)}.")
    if unknown:
        items = [unknown_text(p) for p in unknown]
        sentences.append(f"未知：{w.join(items)}。" if zh else f"Unknown: {w.join(items)}.")
    if view.online is True:
        sentences.append("车辆在线。" if zh else "The car is online.")
    elif view.online is False:
        sentences.append("车辆离线，以上为最后一次上报。" if zh
                         else "The car is offline; this is its last report.")
    sentences.append("签名已验证。" if zh else "Signature verified.")
    return ("" if zh else " ").join(sentences)


def _with_position(label: str, reading: Reading, part: _Part, zh: bool) -> str:
    if part.kind in ("window", "sunroof"):
        pct = round(_number(reading.value) or 0.0)
        return f"{label}（{pct}%）" if zh else f"{label} ({pct}%)"
    return label


def _state_word(part: _Part, value: Any, zh: bool) -> str:
    if part.kind in ("window", "sunroof"):
        pct = round(_number(value) or 0.0)
        if pct <= 0:
            return "关闭" if zh else "closed"
        return f"打开{pct}%" if zh else f"open {pct}%"
    if part.kind == "lock":
        return ("已上锁" if value else "未上锁") if zh else ("locked" if value else "unlocked")
    return ("打开" if value else "关闭") if zh else ("open" if value else "closed")
