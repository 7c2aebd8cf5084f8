"""The events of the `forget` tests' people: alice (forgotten) and bob (kept), of
project p1, each with a device of their own."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.dates import iso


def person_event(name: str, ms: int, who: str, session: str = "", **fields: Any) -> dict[str, Any]:
    """One event of `who` at `ms` (epoch ms), with an id of its own; in `session` if given."""
    event: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "project_id": "p1",
        "name": name,
        "created_at": iso(ms),
        "profile_id": who,
        "device_id": f"dev-{who}",
        **fields,
    }
    if session:
        event["session_id"] = session
    return event
