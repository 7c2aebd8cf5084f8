"""Sessions for sources that have none: per device or profile, a new one after 30 idle minutes.

Mixpanel's export (and Amplitude's events without a `session_id`) carry no
session. Like OpenPanel's importer, the events of one actor (a device, else
a profile) are taken in `created_at` order and cut where two neighbours are
more than `SESSION_GAP_MS` apart. A session's id is derived from its actor
and its first event's time, so a re-import derives the same ids.
"""

from __future__ import annotations

from worker.importer.rows import stable_id

SESSION_GAP_MS = 30 * 60 * 1000

# The state's group of an event: its session ("S" + id) or its actor ("A" + ...).
GIVEN = "S"
DERIVED = "A"


def session_group(session_id: str) -> str:
    return GIVEN + session_id


def actor_group(project_id: str, actor: str) -> str:
    return f"{DERIVED}{project_id}\x1f{actor}"


class SessionCutter:
    """Feed one actor's events in created order; says which derived session each is in."""

    def __init__(self, group: str, gap_ms: int = SESSION_GAP_MS) -> None:
        self.group = group
        self.gap_ms = gap_ms
        self.session = ""
        self.last_ms: int | None = None

    def feed(self, ms: int) -> tuple[str, bool]:
        """(the event's session id, whether it starts a new session)."""
        new = self.last_ms is None or ms - self.last_ms > self.gap_ms
        if new:
            self.session = stable_id("session", self.group, ms)
        self.last_ms = ms
        return self.session, new
