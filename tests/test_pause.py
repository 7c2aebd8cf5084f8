"""The ingest pause's timing and logging (`worker/pause.py`), on a fake clock.

Behaviour with real workers and a real full Redis is in tests/test_full_redis.py.
"""

from __future__ import annotations

import logging

import pytest

from worker.pause import MAX_WAIT_S, Pause, ShutdownRequested, wait_s

OOM = RuntimeError("OOM command not allowed when used memory > 'maxmemory'.")


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def pause(t: FakeTime, stopping: bool = False) -> Pause:
    return Pause(clock=t.clock, sleep=t.sleep, stopping=lambda: stopping, quiet_s=60)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records]


def test_waits_grow_to_a_cap_with_jitter() -> None:
    for attempt in range(12):
        w = wait_s(attempt)
        assert 0.5 * min(MAX_WAIT_S, 2**attempt) <= w <= min(MAX_WAIT_S, 2**attempt)


def test_one_line_when_paused_and_one_when_resumed(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    p = pause(t)
    with caplog.at_level(logging.INFO, logger="worker.ingestion"):
        for attempt in range(5):
            p.wait("b1", OOM, attempt)
        assert p.paused and t.slept >= 0.5 * (1 + 2 + 4 + 8 + 10)
        p.succeeded()
        p.succeeded()
    assert lines(caplog) == ["ingest paused", "ingest resumed"]
    assert not p.paused


def test_brief_pauses_after_a_resume_are_counted_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = FakeTime()
    p = pause(t)
    with caplog.at_level(logging.INFO, logger="worker.ingestion"):
        p.wait("b1", OOM, 0)
        p.succeeded()
        for _ in range(3):  # Redis at the edge: refused, taken, refused ...
            p.wait("b2", OOM, 0)
            p.succeeded()
        assert lines(caplog) == ["ingest paused", "ingest resumed"]
        # A pause that lasts is announced, with the brief ones before it.
        started = t.now
        attempt = 0
        while t.now - started < 60:
            p.wait("b3", OOM, attempt)
            attempt += 1
        p.wait("b3", OOM, attempt)
        p.succeeded()
    assert lines(caplog) == ["ingest paused", "ingest resumed", "ingest paused", "ingest resumed"]
    assert "3 brief pause(s) before this one" in caplog.records[2].getMessage()


def test_a_pause_long_after_the_last_resume_is_announced_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = FakeTime()
    p = pause(t)
    with caplog.at_level(logging.INFO, logger="worker.ingestion"):
        p.wait("b1", OOM, 0)
        p.succeeded()
        t.now += 61
        p.wait("b2", OOM, 0)
    assert lines(caplog) == ["ingest paused", "ingest resumed", "ingest paused"]


def test_a_stopping_worker_stops_waiting() -> None:
    t = FakeTime()
    with pytest.raises(ShutdownRequested):
        pause(t, stopping=True).wait("b1", OOM, 3)
    assert t.slept == 0


def test_another_error_right_after_a_resume_is_announced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = FakeTime()
    p = pause(t)
    with caplog.at_level(logging.INFO, logger="worker.ingestion"):
        p.wait("b1", OOM, 0)
        p.succeeded()
        p.wait("b2", ConnectionError("failover"), 0)
    assert lines(caplog) == ["ingest paused", "ingest resumed", "ingest paused"]
    assert "ConnectionError: failover" in caplog.records[2].getMessage()


def test_a_new_cause_within_a_pause_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    p = pause(t)
    with caplog.at_level(logging.INFO, logger="worker.ingestion"):
        p.wait("b1", ConnectionError("master down"), 0)
        p.wait("b1", ConnectionError("master down"), 1)
        p.wait("b1", RuntimeError("not replicated"), 2)
        p.wait("b1", RuntimeError("not replicated"), 3)
        p.succeeded()
    assert lines(caplog) == ["ingest paused", "ingest still paused, now", "ingest resumed"]
