"""Frames -> signal updates: the mapping bound to the DBC, precomputed per frame id.

Everything that can be decided before the first frame is decided in :class:`Decoder`'s
constructor (which frame ids matter, the raw decoders of :mod:`agent.can.codec`, which signals
feed which VSS path and how to convert them), so the per-frame path is a dict lookup, a length
check, shifts and masks and a few arithmetic operations per mapped signal. A built decoder holds
no cantools object and pickles: the daemon gets it from a start-up process that loaded the DBCs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from agent.can.codec import RawDecoder, SignalLayout
from agent.can.keys import EXTENDED_KEY, frame_key
from agent.errors import ConfigError
from agent.signals.model import INVALID, VALID, Mapping, SignalSpec

if TYPE_CHECKING:   # the daemon's decoder comes pickled: it must not import cantools
    import can
    from cantools.database.can import Message, Signal

    from agent.can.dbc import VehicleDatabase

#: A converter turns a raw signal value into (published value, quality).
Converter = Callable[[Any], "tuple[Any, str]"]
#: Multiplexer conditions: ((multiplexer signal, raw values selecting the page), ...), outermost
#: first. Empty for a signal outside any multiplexed page.
Guard = "tuple[tuple[str, frozenset[int]], ...]"
_NOT_FOUND = object()
_NO_UPDATES: tuple = ()
# CAN FD payload sizes: a message of length n arrives in the next size up.
FD_SIZES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)


def frame_size(length: int) -> int:
    """The size of the frame a message of ``length`` bytes travels in (CAN FD above 8)."""
    return next((size for size in FD_SIZES if size >= length), length)


@dataclass
class DecodeCounters:
    """Per-run counters: every frame lands in exactly one bucket besides ``frames``."""

    frames: int = 0
    decoded: int = 0
    error_frames: int = 0
    wrong_length: int = 0
    unchanged: int = 0
    unmapped: int = 0
    remote_frames: int = 0
    undecodable: int = 0
    unknown_page: int = 0     # a multiplexer value naming no page (the rest is published)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def summary(self) -> str:
        """``N frames, N decoded, N error frames, ...``: every bucket, named."""
        buckets = ", ".join(f"{count} {name.replace('_', ' ')}"
                            for name, count in self.__dict__.items() if name != "frames")
        return f"{self.frames} frames, {buckets}"


class _Plan:
    """What to do with one frame id: flat decoders for the mapped signals, page by page."""

    __slots__ = ("lengths", "steps", "pages", "targets", "feeds", "plain", "feed", "last_data")

    def __init__(self, message: Message) -> None:
        self.lengths = frozenset((message.length, frame_size(message.length)))
        self.steps: list[tuple[Guard, Callable]] = []       # outer pages first
        self.pages: tuple[tuple[str, frozenset[int]], ...] = ()  # each multiplexer: its pages
        self.targets: list[tuple[int, str, Guard, Converter]] = []
        self.feeds: list[tuple[Guard, int]] = []
        self.plain = True                   # no multiplexer: one flat decoder
        self.feed = -1                      # staleness feed of a plain message
        self.last_data: bytes | None = None


def _holds(guard: Guard, values: dict) -> bool:
    for name, allowed in guard:
        if values.get(name) not in allowed:
            return False
    return True


class Decoder:
    """Decodes frames into ``(signal index, value, quality)`` updates.

    ``paths[i]`` is the VSS path of signal index ``i``. Freshness is tracked per *feed* (a
    frame id, or one page of a multiplexed frame id) so that :meth:`expired` can report signals
    whose frames stopped arriving. A signal on a page is decoded when every multiplexer on its
    chain (extended multiplexing: ``SG_MUL_VAL_``) has the value selecting that page.
    """

    def __init__(self, vdb: VehicleDatabase, mapping: Mapping) -> None:
        self.counters = DecodeCounters()
        self.paths: tuple[str, ...] = tuple(spec.path for spec in mapping.signals)
        self.specs = mapping.signals
        self._plans: dict[int, _Plan] = {}
        self.feed_timeouts: list[float | None] = []
        self.feed_signals: list[list[int]] = []
        self.feed_names: list[str] = []
        self.mux_values: list[int | None] = []   # per signal index: the mux page it reads
        self.notes: list[str] = []               # what check-config should tell the user
        feed_ids: dict[tuple[int, Guard], int] = {}
        wanted: dict[int, dict[str, Signal]] = {}

        for index, spec in enumerate(mapping.signals):
            where = f"{mapping.file}: signals.{spec.path}"
            message = vdb.find(spec.message)
            if message is None:
                shown = _shown(spec.message) if isinstance(spec.message, str) \
                    else f"{spec.message:#x}"
                raise ConfigError(f"{where}.message: no message {shown} in "
                                  f"{', '.join(str(f) for f in vdb.files)}")
            try:
                signal = message.get_signal_by_name(spec.signal)
            except KeyError:
                names = ", ".join(s.name for s in message.signals[:12])
                raise ConfigError(f"{where}.signal: message {message.name} has no signal "
                                  f"{spec.signal!r} (it has: {names})") from None
            key = frame_key(message.frame_id, message.is_extended_frame)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = _Plan(message)
                wanted[key] = {}
                if message.length > 8:
                    kind = "CAN FD" if message.is_fd else "CAN FD (not marked FD in the DBC)"
                    self.notes.append(f"{message.name} ({message.length} bytes) needs {kind}: "
                                      f"it travels in {frame_size(message.length)}-byte frames")
            mux_value = _mux_value(spec, message, signal, where)
            self.mux_values.append(mux_value)
            guard = _chain(message, signal, wanted[key])
            if mux_value is not None:
                guard = guard[:-1] + ((signal.multiplexer_signal, frozenset((mux_value,))),)
            feed = feed_ids.get((key, guard))
            if feed is None:
                feed = feed_ids[(key, guard)] = len(self.feed_timeouts)
                self.feed_timeouts.append(None)
                self.feed_signals.append([])
                page = ",".join(f"{name}={_shown_values(allowed)}" for name, allowed in guard)
                self.feed_names.append(f"{message.name}[{page}]" if page else message.name)
                if guard:
                    plan.feeds.append((guard, feed))
                else:
                    plan.feed = feed
            self.feed_signals[feed].append(index)
            timeout = _timeout_s(spec, message, mapping, guard)
            current = self.feed_timeouts[feed]
            if timeout is not None and (current is None or timeout < current):
                self.feed_timeouts[feed] = timeout
            plan.targets.append((index, signal.name, guard, _converter(spec, signal, where)))

        self._feed_plans: dict[int, _Plan] = {}
        for key, plan in self._plans.items():
            _bind(vdb.by_key[key], plan, wanted[key], vdb.source.get(key))
            if plan.feed >= 0:
                self._feed_plans[plan.feed] = plan
        self.feed_seen: list[float | None] = [None] * len(self.feed_timeouts)
        self._started: float | None = None
        self._expired: list[bool] = [False] * len(self.feed_timeouts)

    # -- what the source needs --------------------------------------------------------------
    @property
    def frame_keys(self) -> list[int]:
        return sorted(self._plans)

    def can_filters(self) -> list[dict]:
        """python-can filters (kernel filters on socketcan) for exactly the mapped frame ids."""
        filters = []
        for key in self.frame_keys:
            extended = bool(key & EXTENDED_KEY)
            filters.append({
                "can_id": key & 0x1FFFFFFF,
                "can_mask": 0x1FFFFFFF if extended else 0x7FF,
                "extended": extended,
            })
        return filters

    # -- the hot path -----------------------------------------------------------------------
    def decode(self, msg: can.Message) -> tuple | list:
        """Updates carried by one frame; an empty tuple when it carries none (counted why)."""
        counters = self.counters
        counters.frames += 1
        if msg.is_error_frame:
            counters.error_frames += 1
            return _NO_UPDATES
        plan = self._plans.get(
            msg.arbitration_id | EXTENDED_KEY if msg.is_extended_id else msg.arbitration_id
        )
        if plan is None:
            counters.unmapped += 1
            return _NO_UPDATES
        if msg.is_remote_frame:
            counters.remote_frames += 1
            return _NO_UPDATES
        data = msg.data
        if len(data) not in plan.lengths:
            counters.wrong_length += 1
            return _NO_UPDATES
        t = msg.timestamp
        if plan.plain:
            self.feed_seen[plan.feed] = t
            if data == plan.last_data:
                counters.unchanged += 1
                return _NO_UPDATES
            payload = bytes(data)   # also a private copy: the source may reuse its buffer
            try:
                raw = plan.steps[0][1](payload)
            except ValueError:      # shorter than the DBC says (a CAN FD size in between)
                counters.undecodable += 1
                return _NO_UPDATES
            counters.decoded += 1
            plan.last_data = payload
            updates = []
            for index, name, _guard, convert in plan.targets:
                value = raw.get(name, _NOT_FOUND)
                if value is not _NOT_FOUND:
                    updates.append((index, *convert(value)))
            return updates
        payload = bytes(data)
        raw = {}
        try:
            for guard, decode in plan.steps:
                if _holds(guard, raw):
                    raw.update(decode(payload))
        except ValueError:
            counters.undecodable += 1
            return _NO_UPDATES
        for name, pages in plan.pages:
            value = raw.get(name, _NOT_FOUND)
            if value is not _NOT_FOUND and value not in pages:
                counters.unknown_page += 1
                break
        else:
            counters.decoded += 1
        if plan.feed >= 0:
            self.feed_seen[plan.feed] = t
        for guard, feed in plan.feeds:
            if _holds(guard, raw):
                self.feed_seen[feed] = t
        updates = []
        for index, name, guard, convert in plan.targets:
            if guard and not _holds(guard, raw):
                continue
            value = raw.get(name, _NOT_FOUND)
            if value is not _NOT_FOUND:
                updates.append((index, *convert(value)))
        return updates

    def repeated(self, key: int, data: bytes, t: float) -> bool:
        """Whether a data frame of frame key ``key`` repeats the last payload decoded for its
        message, not multiplexed: then it is counted and timed as :meth:`decode` would
        (unchanged) and True; False: it has to go through :meth:`decode`."""
        plan = self._plans.get(key)
        if plan is None or not plan.plain or data != plan.last_data:
            return False
        counters = self.counters
        counters.frames += 1
        counters.unchanged += 1
        self.feed_seen[plan.feed] = t
        return True

    def expired(self, now: float) -> list[int]:
        """Signal indices whose feed has gone silent for longer than its timeout.

        Reported once per silence; a feed reports again only after it was seen again.
        Feeds never seen count from the first call.
        """
        if self._started is None:
            self._started = now
        out: list[int] = []
        seen = self.feed_seen
        for feed, timeout in enumerate(self.feed_timeouts):
            if timeout is None:
                continue
            last = seen[feed]
            if last is None:
                last = self._started
            if now - last > timeout:
                if not self._expired[feed]:
                    self._expired[feed] = True
                    out.extend(self.feed_signals[feed])
                    plan = self._feed_plans.get(feed)
                    if plan is not None:
                        # The same payload resuming after a silence must be decoded again.
                        plan.last_data = None
            elif self._expired[feed]:
                self._expired[feed] = False
        return out

    def describe(self) -> list[str]:
        """One line per feed: what is decoded from where, and its stale timeout."""
        lines = []
        for feed, name in enumerate(self.feed_names):
            timeout = self.feed_timeouts[feed]
            shown = "never stale" if timeout is None else f"stale after {timeout:g} s"
            paths = ", ".join(self.paths[i] for i in self.feed_signals[feed])
            lines.append(f"{name} ({shown}): {paths}")
        return lines


def _shown(text: str) -> str:
    """User text in an error message, on one line."""
    return text if text.isprintable() else repr(text)


def _shown_values(values: frozenset[int]) -> str:
    return "|".join(map(str, sorted(values)))


def _chain(message: Message, signal: Signal, wanted: dict[str, Signal]) -> Guard:
    """The multiplexer conditions under which ``signal`` is in a frame, outermost first; the
    signal and every multiplexer on its chain are added to ``wanted``."""
    wanted[signal.name] = signal
    if signal.multiplexer_signal is None:
        return ()
    mux = message.get_signal_by_name(signal.multiplexer_signal)
    return _chain(message, mux, wanted) + ((mux.name, frozenset(signal.multiplexer_ids or ())),)


def _bind(message: Message, plan: _Plan, wanted: dict[str, Signal], source: Any) -> None:
    """The flat decoders of ``plan``: one per group of wanted signals under the same
    multiplexer conditions, so a page whose value names no page costs only its own signals.
    Mapped signals that can never decode (overlapping, beyond the message) fail here."""
    where = f"{source}: " if source is not None else ""
    _check_layout(message, wanted, where)
    for signal in message.signals:
        # Top-level multiplexers decide every page: decoding them too lets a frame whose
        # value names no page be counted as such (unless they cannot decode: left out).
        if signal.is_multiplexer and signal.multiplexer_signal is None \
                and signal.name not in wanted:
            try:
                _check_layout(message, {**wanted, signal.name: signal}, where)
            except ConfigError:
                continue
            wanted[signal.name] = signal
    groups: dict[Guard, list[Signal]] = {}
    for signal in wanted.values():
        groups.setdefault(_chain(message, signal, {}), []).append(signal)
    for guard in sorted(groups, key=len):
        try:
            flat = RawDecoder([SignalLayout.of(s) for s in groups[guard]], message.length)
            flat(bytes(message.length))
        except ValueError as exc:
            names = ", ".join(s.name for s in groups[guard])
            raise ConfigError(f"{where}message {message.name}: signals {names} cannot be "
                              f"decoded: {_one_line(exc)}") from None
        plan.steps.append((guard, flat))
    muxes = [s for s in wanted.values() if s.is_multiplexer]
    plan.plain = not muxes
    plan.pages = tuple((mux.name, _pages(message, mux)) for mux in muxes)


def _pages(message: Message, mux: Signal) -> frozenset[int]:
    """The values of ``mux`` that name a page (as cantools decodes them: a page's signals'
    multiplexer ids, and the value table's values)."""
    pages = {i for s in message.signals if s.multiplexer_signal == mux.name
             for i in (s.multiplexer_ids or ())}
    pages.update(int(v) for v in (mux.choices or {}))
    return frozenset(pages)


def _bits(signal: Signal) -> set[int]:
    """The payload bits of a signal, as byte * 8 + bit (bit 0 = least significant)."""
    if signal.byte_order == "little_endian":
        return set(range(signal.start, signal.start + signal.length))
    # Motorola: start is the most significant bit; walk down through the bytes.
    bits, position = set(), signal.start
    for _ in range(signal.length):
        bits.add(position)
        position = position - 1 if position % 8 else position + 15
    return bits


def _check_layout(message: Message, wanted: dict[str, Signal], where: str) -> None:
    size = message.length * 8
    signals = list(wanted.values())
    for signal in signals:
        if any(not 0 <= bit < size for bit in _bits(signal)):
            raise ConfigError(f"{where}message {message.name}: signal {signal.name} "
                              f"({signal.start}|{signal.length}) does not fit in its "
                              f"{message.length} bytes: it can never decode")
    guards = {s.name: dict(_chain(message, s, {})) for s in signals}
    for i, one in enumerate(signals):
        for other in signals[i + 1:]:
            a, b = guards[one.name], guards[other.name]
            if any(name in b and not a[name] & b[name] for name in a):
                continue      # on different pages: never in the same frame
            if _bits(one) & _bits(other):
                raise ConfigError(f"{where}message {message.name}: signals {one.name} and "
                                  f"{other.name} overlap: they can never both decode")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _mux_value(spec: SignalSpec, message: Message, signal: Signal, where: str) -> int | None:
    """The raw multiplexer value selecting the page this mapping reads, or None if unpaged."""
    pages = signal.multiplexer_ids
    if not pages:
        if spec.mux is not None:
            raise ConfigError(f"{where}.mux: signal {signal.name} of {message.name} is not "
                              "multiplexed; remove `mux`")
        return None
    if spec.mux is None:
        if len(pages) == 1:
            return pages[0]
        raise ConfigError(f"{where}.mux: signal {signal.name} is on several pages of "
                          f"{message.name} ({signal.multiplexer_signal} = "
                          f"{', '.join(map(str, pages))}); say which with `mux`")
    value: int | None = spec.mux if isinstance(spec.mux, int) else None
    if value is None:
        mux_signal = message.get_signal_by_name(signal.multiplexer_signal)
        for raw, name in (mux_signal.choices or {}).items():
            if str(name) == spec.mux:
                value = int(raw)
        if value is None:
            raise ConfigError(f"{where}.mux: {spec.mux!r} is not a value of "
                              f"{signal.multiplexer_signal}")
    if value not in pages:
        raise ConfigError(f"{where}.mux: signal {signal.name} is not on page {value} of "
                          f"{message.name} (pages: {', '.join(map(str, pages))})")
    return value


def _timeout_s(spec: SignalSpec, message: Message, mapping: Mapping,
               guard: Guard) -> float | None:
    if spec.timeout_ms is not None:
        return spec.timeout_ms / 1000.0
    if message.cycle_time:
        cycle = message.cycle_time / 1000.0
        for mux, _values in guard:
            # Each page comes once per round of its multiplexer's pages (at every level).
            pages = {p for s in message.signals if s.multiplexer_signal == mux
                     for p in (s.multiplexer_ids or ())}
            cycle *= max(1, len(pages))
        return cycle * mapping.stale_factor
    if mapping.default_timeout_ms is not None:
        return mapping.default_timeout_ms / 1000.0
    return None


def _decimals_for(resolution: float) -> int:
    """Fewest decimals that represent multiples of ``resolution`` exactly (0.4 -> 1, 0.25 -> 2)."""
    resolution = abs(resolution)
    if resolution == 0:
        return 6
    for decimals in range(10):
        if abs(round(resolution, decimals) - resolution) < 1e-9 * max(1.0, resolution):
            return decimals
    return 9


def _converter(spec: SignalSpec, signal: Signal, where: str) -> Converter:
    """Precompute the conversion from a raw value to (published value, quality)."""
    invalid = frozenset(spec.invalid)

    if spec.values is not None:
        table: dict[Any, Any] = {}
        choices = signal.choices or {}
        for key, published in spec.values:
            if isinstance(key, int):
                table[key] = published
                continue
            raws = [int(raw) for raw, name in choices.items() if str(name) == key]
            if not raws:
                known = ", ".join(str(n) for n in choices.values()) or "none"
                raise ConfigError(f"{where}.values.{_shown(key)}: not a value of {signal.name} "
                                  f"(its value table: {known})")
            for raw in raws:
                table[raw] = published

        return ChoiceConverter(invalid, table)

    factor = signal.scale
    base = signal.offset
    lo = signal.minimum
    hi = signal.maximum
    if lo == 0 and hi == 0:  # DBC convention for "no range given"
        lo = hi = None
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    scale = spec.scale
    offset = spec.offset
    if spec.decimals is not None:
        decimals: int | None = spec.decimals
    elif signal.is_float:
        decimals = None
    else:
        decimals = _decimals_for(factor * scale)
    # Tolerance for float noise at the range edges (raw 250 * 0.4 = 100.00000000000001).
    return NumberConverter(invalid, factor, base, lo, hi, abs(factor) * 1e-6, scale, offset,
                           decimals)


class ChoiceConverter:
    """A raw value through the mapping's ``values`` table; anything else is invalid."""

    __slots__ = ("invalid", "table")

    def __init__(self, invalid: frozenset, table: dict) -> None:
        self.invalid = invalid
        self.table = table

    def __call__(self, raw: Any) -> tuple[Any, str]:
        if raw in self.invalid:
            return None, INVALID
        published = self.table.get(raw, _NOT_FOUND)
        if published is _NOT_FOUND:
            return None, INVALID
        return published, VALID


class NumberConverter:
    """A raw value scaled by the DBC, range-checked, then by the mapping, and rounded."""

    __slots__ = ("invalid", "factor", "base", "lo", "hi", "scale", "offset", "decimals",
                 "as_int")

    def __init__(self, invalid: frozenset, factor: float, base: float, lo: float, hi: float,
                 slack: float, scale: float, offset: float, decimals: int | None) -> None:
        self.invalid = invalid
        self.factor = factor
        self.base = base
        self.lo = lo - slack
        self.hi = hi + slack
        self.scale = scale
        self.offset = offset
        self.decimals = decimals
        self.as_int = decimals == 0

    def __call__(self, raw: Any) -> tuple[Any, str]:
        if raw in self.invalid:
            return None, INVALID
        physical = raw * self.factor + self.base
        if physical != physical or physical < self.lo or physical > self.hi:
            return None, INVALID  # NaN, or outside the DBC's declared range
        published = physical * self.scale + self.offset
        if published in (math.inf, -math.inf):
            return None, INVALID
        if self.as_int:
            return int(round(published)), VALID
        if self.decimals is not None:
            return round(published, self.decimals), VALID
        return published, VALID
