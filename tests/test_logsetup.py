"""Service logging: journald priorities, VIN masking, the per-message rate limit."""

from __future__ import annotations

import io
import logging

import pytest

from agent.service import logsetup


@pytest.fixture
def captured():
    yield io.StringIO()
    logsetup.configure()            # back to a plain handler on the real stderr


def test_journal_lines_carry_the_priority_and_no_timestamp(captured, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:42")
    logsetup.configure("debug", stream=captured)
    log = logging.getLogger("car_agent.x")
    log.error("bad")
    log.warning("careful")
    log.info("fine\nsecond line")
    log.debug("detail")
    assert captured.getvalue().splitlines() == [
        "<3>car_agent.x: bad", "<4>car_agent.x: careful", "<6>car_agent.x: fine",
        "<6>second line", "<7>car_agent.x: detail"]


def test_plain_lines_start_with_a_utc_time(captured, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logsetup.configure("info", stream=captured)
    logging.getLogger("car_agent.x").info("hello")
    line = captured.getvalue().strip()
    assert line.endswith("INFO car_agent.x: hello")
    assert line[4] == "-" and line[10] == "T" and line[19] == "Z"


def test_vin_is_masked_everywhere_in_the_message(captured, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logsetup.configure("info", vehicle_id="WVWZZZ1JZXW000001", mask=True, stream=captured)
    logging.getLogger("car_agent.x").info("vehicle %s on vehicles/%s/state", "WVWZZZ1JZXW000001",
                                          "WVWZZZ1JZXW000001")
    text = captured.getvalue()
    assert "WVWZZZ1JZXW000001" not in text
    assert "vehicle *************0001 on vehicles/*************0001/state" in text


def test_mask_keeps_a_short_id_recognisable_but_hidden():
    assert logsetup.mask_vin("VIN1") == "***1"
    assert logsetup.mask_vin("WVWZZZ1JZXW000001") == "*" * 13 + "0001"


def test_a_flood_of_one_message_is_cut_after_the_burst_and_counted(captured, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logsetup.configure("info", burst=5, window_s=3600, stream=captured)
    log = logging.getLogger("car_agent.x")
    for i in range(1000):
        log.warning("bad frame %d", i)
    log.warning("another message")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 6
    assert lines[4].endswith("bad frame 4") and lines[5].endswith("another message")
    assert logsetup.rate_limit.suppressed == 995
