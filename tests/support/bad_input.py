"""Shared by the bad-input tests (tests/test_bad_input*.py): an injected clock, event builders."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.clock import ManualClock
from tests.support.dates import NOON_MS
from worker.events import Limits
from worker.keys import ShardKeys

NOW = NOON_MS  # the injected "now" (30 days ago: a fixed date would age out)
DAY = 86_400_000
CLOCK = ManualClock(NOW)
LIMITS = Limits(clock=CLOCK)
SHARD = ShardKeys("eventbuffer", 0)


def ev(**fields: Any) -> dict[str, Any]:
    return {"project_id": "p", "name": "x", "created_at": NOW, **fields}


def nested(depth: int, leaf: Any = "v") -> dict[str, Any]:
    node: Any = leaf
    for _ in range(depth):
        node = {"k": node}
    return node  # type: ignore[no-any-return]


def good(n: int) -> dict[str, Any]:
    """A valid event whose id is the UUID of `n`."""
    return ev(id=str(uuid.UUID(int=n)), name=f"good-{n}")
