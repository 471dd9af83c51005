"""agent.can.codec against cantools: random signal layouts, random payloads, same raw values."""

from __future__ import annotations

import math
import pickle

import pytest
from cantools.database.can import Message, Signal
from cantools.database.conversion import BaseConversion
from hypothesis import given, settings, strategies as st

from agent.can.codec import RawDecoder, SignalLayout


def _motorola_bits(start: int, length: int) -> list[int]:
    bits, position = [], start
    for _ in range(length):
        bits.append(position)
        position = position - 1 if position % 8 else position + 15
    return bits


@st.composite
def layouts(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 12, 64]))
    floats = [n for n in (32, 64) if n <= 8 * size]
    kind = draw(st.sampled_from(["int", "int", "float"] if floats else ["int"]))
    little = draw(st.booleans())
    length = draw(st.sampled_from(floats)) if kind == "float" \
        else draw(st.integers(1, min(64, 8 * size)))
    if little:
        start = draw(st.integers(0, 8 * size - length))
    else:
        candidates = [s for s in range(8 * size)
                      if all(0 <= b < 8 * size for b in _motorola_bits(s, length))]
        start = draw(st.sampled_from(candidates))
    signed = kind == "int" and draw(st.booleans())
    return size, SignalLayout("S", start, length, little, signed, kind == "float")


@settings(max_examples=400, deadline=None)
@given(case=layouts(), data=st.data())
def test_raw_values_are_cantools_raw_values(case, data):
    size, layout = case
    signal = Signal("S", layout.start, layout.length,
                    byte_order="little_endian" if layout.little_endian else "big_endian",
                    is_signed=layout.signed,
                    conversion=BaseConversion.factory(is_float=layout.is_float))
    message = Message(0x123, "M", size, [signal], strict=False)
    payload = data.draw(st.binary(min_size=size, max_size=size))
    theirs = message.decode_simple(payload, False, False)["S"]
    ours = RawDecoder([layout], size)(payload)["S"]
    assert type(ours) is type(theirs)
    assert ours == theirs or (isinstance(ours, float) and math.isnan(ours) and math.isnan(theirs))


def test_known_values_both_byte_orders_signed_and_float():
    layouts_ = [SignalLayout("le12", 0, 12, True, False, False),
                SignalLayout("be8s", 23, 8, False, True, False),      # byte 2, Motorola
                SignalLayout("f32", 32, 32, True, False, True)]
    payload = bytes([0x34, 0x12, 0xF6, 0x00]) + bytes.fromhex("0000c03f")   # f32 1.5, LE
    assert RawDecoder(layouts_, 8)(payload) == {"le12": 0x234, "be8s": -10, "f32": 1.5}


def test_a_larger_fd_frame_decodes_its_first_bytes_and_a_short_one_is_refused():
    decoder = RawDecoder([SignalLayout("x", 0, 16, True, False, False)], 2)
    assert decoder(bytes([1, 2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9])) == {"x": 0x0201}
    with pytest.raises(ValueError):
        decoder(b"\x01")


def test_a_layout_outside_the_payload_or_an_odd_float_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        RawDecoder([SignalLayout("x", 60, 8, True, False, False)], 8)
    with pytest.raises(ValueError, match="float of 24 bits"):
        RawDecoder([SignalLayout("x", 0, 24, True, False, True)], 8)


def test_a_decoder_pickles():
    decoder = RawDecoder([SignalLayout("x", 7, 16, False, True, False)], 2)
    again = pickle.loads(pickle.dumps(decoder))
    assert again(b"\xff\xfe") == decoder(b"\xff\xfe") == {"x": -2}
