"""Malformed input at the producer client: `send()` raises `InvalidEvent` naming the field,
and nothing is queued (the validator itself: tests/test_bad_input.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from tests.support.bad_input import NOW, ev, nested
from tests.support.dates import iso
from worker.celery import create_app
from worker.events import InvalidEvent
from worker.producer import EventProducer
from worker.settings import Settings


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    app = create_app(Settings.from_env({"CELERY_BROKER_URL": "memory://"}))
    yield app
    app.close()


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"name": "x", "created_at": iso(NOW)}, "project_id"),
        (ev(created_at="2999-01-01T00:00:00Z"), "created_at"),
        (ev(created_at=0), "created_at"),
        (ev(properties={1: "int key"}), "properties"),
        (ev(properties={"a": {("t", "k"): 1}}), "properties.a"),
        (ev(properties={"big": "x" * 70_000}), "properties"),
        (ev(city="\ud83d"), "city"),
        (ev(properties={"a": float("nan")}), "properties.a"),
        (ev(latitude=float("-inf")), "latitude"),
        (ev(properties=nested(20)), "properties.k.k.k.k.k.k.k.k.k"),
    ],
)
def test_the_producer_refuses_bad_events_at_send(
    memory_app: Celery, event: dict[str, Any], field: str
) -> None:
    # The producer validates with the default limits, on the system clock.
    producer = EventProducer(memory_app, settings=Settings(), batch_size=1)
    try:
        with pytest.raises(InvalidEvent) as raised:
            producer.send(event)
        assert raised.value.field == field
        assert producer.stats.pending == 0
    finally:
        producer.close()
