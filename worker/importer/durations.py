"""The durations pass: screen_view durations as the live path gives them, over the whole export.

The live path (worker/apply.py, lua_scripts/release_held.lua) takes a
session's views and session_ends in `created_at` order: a view gets the gap
to the session's next view; a view followed by a session_end, or by nothing,
keeps its own duration (0 unless the event carried one; history is
complete, so nothing waits in Redis for a later view). The importer does the
same after reading every file, in the state's session order (worker/
importer/state.py), whatever the order of lines and files. For sources
without sessions it derives them here too (worker/importer/sessions.py).

An event seen twice (same session, same time, same id: overlapping exports)
counts once: the repeat is marked a duplicate and not inserted.

The pass commits at session boundaries with the last session done, so a
killed import redoes at most the sessions since its last commit.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.importer.import_state import ImportState, gc_paused
from worker.importer.rows import KIND_SCREEN_VIEW, KIND_SESSION_END
from worker.importer.sessions import DERIVED, SessionCutter

PAGE_ROWS = 20_000
COMMIT_ROWS = 50_000


class _Walk:
    """The walk through one group: durations, derived sessions, repeats."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.cutter = SessionCutter(group) if group.startswith(DERIVED) else None
        self.pending: tuple[int, int, int] | None = None  # a view: rowid, ms, own duration
        self.last: tuple[int, str] | None = None  # (ms, id) of the previous event

    def feed(
        self,
        rowid: int,
        ms: int,
        event_id: str,
        kind: str,
        own: int,
        updates: dict[int, list[int | str | None]],
    ) -> None:
        if self.last == (ms, event_id):
            updates[rowid] = [None, None, 1]
            return
        self.last = (ms, event_id)
        if self.cutter is not None:
            session, new = self.cutter.feed(ms)
            if new:
                self.pending = None
            updates[rowid] = [None, session, 0]
        if kind == KIND_SCREEN_VIEW:
            if self.pending is not None:
                view, view_ms, view_own = self.pending
                gap = max(0, ms - view_ms)
                if gap != view_own:
                    change = updates.setdefault(view, [None, None, 0])
                    change[0] = gap
            self.pending = (rowid, ms, own)
        elif kind == KIND_SESSION_END:
            self.pending = None


def compute_durations(state: ImportState, advance: Callable[[int], None]) -> None:
    """Walk every session (and actor) of the state once, storing durations and sessions."""
    with gc_paused():
        _walk_all(state, advance)


def _walk_all(state: ImportState, advance: Callable[[int], None]) -> None:
    walked = state.get("walked") or ""
    after: tuple[str, int, str, str, int, int] = (
        (walked, 2**62, "\uffff", "\uffff", 2**62, 2**62) if walked else ("", -1, "", "", -1, -1)
    )
    walk: _Walk | None = None
    updates: dict[int, list[int | str | None]] = {}
    seen = 0
    while page := state.session_page(after, PAGE_ROWS):
        for rowid, group, ms, event_id, kind, own in page:
            if walk is None or group != walk.group:
                if walk is not None and seen >= COMMIT_ROWS:
                    _commit(state, updates, walk.group)
                    advance(seen)
                    updates, seen = {}, 0
                walk = _Walk(group)
            walk.feed(rowid, ms, event_id, kind, own, updates)
            seen += 1
        last = page[-1]
        after = (last[1], last[2], last[3], last[4], last[5], last[0])
    if walk is not None:
        _commit(state, updates, walk.group)
    advance(seen)


def _commit(state: ImportState, updates: dict[int, list[int | str | None]], walked: str) -> None:
    state.apply_updates(
        ((rowid, change[0], change[1], change[2]) for rowid, change in updates.items()),  # type: ignore[misc]
        walked,
    )
