"""The decoder's filters become the socket's kernel filter (CAN_RAW_FILTER) on a real vcan."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import can
import pytest

from agent.can.source import BusSource
from agent.config import CanConfig
from agent.signals.vehicle import load_vehicle

ROOT = Path(__file__).resolve().parents[2]
CAN_EFF_FLAG = 0x80000000          # linux/can.h
SOL_CAN_RAW = 101                  # SOL_CAN_BASE + CAN_RAW
CAN_RAW_FILTER = 1

pytestmark = pytest.mark.vcan


def kernel_filters(sock: socket.socket) -> set[tuple[int, int]]:
    raw = sock.getsockopt(SOL_CAN_RAW, CAN_RAW_FILTER, 8 * 64)
    values = struct.unpack(f"={len(raw) // 4}I", raw)
    return set(zip(values[0::2], values[1::2]))


def test_kernel_filter_on_the_socket_holds_exactly_the_mapped_ids():
    decoder = load_vehicle(ROOT / "config" / "demo.yaml").decoder()
    source = BusSource(CanConfig(interface="socketcan", channel="vcan0"), decoder.can_filters())
    sender = can.Bus(interface="socketcan", channel="vcan0")
    try:
        bus = source.bus
        assert bus is not None and bus._is_filtered      # in the kernel, not in python-can
        # The mapped messages of the demo vehicle, written down from dbc/demo_vehicle.dbc:
        # BodyStatus 688, WindowStatus 968, Cluster 976 (11-bit: mask 0x7FF, and CAN_EFF_FLAG
        # in the mask so a 29-bit frame of the same number fails), AmbientConditions
        # 0x18FF50E5 (29-bit: CAN_EFF_FLAG in id and mask).
        expected = {(0x2B0, 0x7FF | CAN_EFF_FLAG), (0x3C8, 0x7FF | CAN_EFF_FLAG),
                    (0x3D0, 0x7FF | CAN_EFF_FLAG),
                    (0x18FF50E5 | CAN_EFF_FLAG, 0x1FFFFFFF | CAN_EFF_FLAG)}
        assert kernel_filters(bus.socket) == expected
        sender.send(can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False))
        sender.send(can.Message(arbitration_id=0x3D0, data=bytes(8), is_extended_id=True))
        sender.send(can.Message(arbitration_id=0x3D0, data=bytes(8), is_extended_id=False))
        got = []
        while (msg := bus.recv(0.5)) is not None:
            got.append((msg.arbitration_id, msg.is_extended_id))
        assert got == [(0x3D0, False)]
    finally:
        source.close()
        sender.shutdown()
