"""agent.can.source.BusSource: the decoder's filters reach the bus it opens.

On python-can's ``virtual`` interface the filters are applied by python-can; on socketcan the
same list becomes the socket's kernel filter (``CAN_RAW_FILTER``), which tests/guest reads back
from the socket on a real vcan.
"""

from __future__ import annotations

import itertools

import can

from agent.can.source import BusSource
from agent.config import CanConfig
from coredata import BODY_ID, CLUSTER_ID, demo_decoder

_channels = itertools.count()


def open_pair() -> tuple[BusSource, can.BusABC, list[dict]]:
    """A BusSource with the demo decoder's filters and a sender on the same virtual channel."""
    channel = f"h5-source-{next(_channels)}"
    filters = demo_decoder().can_filters()
    source = BusSource(CanConfig(interface="virtual", channel=channel), filters)
    sender = can.Bus(interface="virtual", channel=channel)
    return source, sender, filters


def test_the_decoders_filters_are_the_buses_filters():
    source, sender, filters = open_pair()
    try:
        assert source.bus is not None
        assert source.bus.filters == filters
        ids = {(f["can_id"], f["extended"]) for f in filters}
        assert {(CLUSTER_ID, False), (BODY_ID, False)} <= ids
    finally:
        source.close()
        sender.shutdown()


def test_frames_the_mapping_does_not_need_never_reach_the_source():
    source, sender, _ = open_pair()
    try:
        unmapped = [can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False),
                    # The cluster's id as a 29-bit id: another frame, filtered out too.
                    can.Message(arbitration_id=CLUSTER_ID, data=bytes(8), is_extended_id=True)]
        mapped = can.Message(arbitration_id=CLUSTER_ID, data=bytes(8), is_extended_id=False)
        for msg in (*unmapped, mapped, unmapped[0]):
            sender.send(msg)
        received = []
        while (msg := source.recv(0.2)) is not None:
            received.append((msg.arbitration_id, msg.is_extended_id))
        assert received == [(CLUSTER_ID, False)]
        assert source.frames == 1
    finally:
        source.close()
        sender.shutdown()
