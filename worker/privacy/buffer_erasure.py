"""Erasing a person from the Redis buffer, one shard at a time, under its flush lock.

Per shard: the rows queued for ClickHouse, the session's and the profile's
last views, the dead letters, and the person's place among the project's
active visitors. Events held by the reorder window are released first (what
every flush does), so they are found where they land; the request waited one
window after its tombstone, so nothing of the person is held any longer.

The entries are found in Python and removed by forget_shard.lua, which
checks each is still where it was read and unchanged. The shard's flush lock
is held throughout: no claim is acknowledged and no rows are read ahead while
rows leave the middle of the queue. Rows of the open claim stay: the
flusher's fence drops them right before its insert (worker/privacy/tombstones.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import cast

import msgspec

from worker import stored_view
from worker.clock import Clock
from worker.deadletters import decode_dead_letter
from worker.errors import LockHeldError
from worker.keys import ShardKeys
from worker.lock import FlushLock, read_lock
from worker.privacy.forget_scripts import Found, ShardRemoval, forget_shard
from worker.privacy.selector import Selector, decode_any
from worker.reorder import release_due
from worker.replies import text
from worker.scripts import Scripts
from worker.settings import Settings
from worker.topology import Client

log = logging.getLogger(__name__)

PAGE = 5000  # entries read per LRANGE / HSCAN
ENTRIES_PER_CALL = 1000  # entries named per forget_shard.lua call
MAX_PASSES = 5  # looks again this often while entries moved under it
LOCK_POLL_S = 0.1
# How long forget waits for a shard's flush lock held by a live flusher (a long flush
# run holds it for its batches; Beat's next tick comes after).
LOCK_WAIT_S = 600.0


def _pages(redis: Client, key: str) -> Iterator[tuple[int, bytes]]:
    start = 0
    while True:
        values = cast(list[bytes], redis.lrange(key, start, start + PAGE - 1))
        for offset, value in enumerate(values):
            yield start + offset, value
        if len(values) < PAGE:
            return
        start += PAGE


def _hash(redis: Client, key: str) -> Iterator[tuple[str, bytes]]:
    for field, value in redis.hscan_iter(key, count=PAGE):
        yield text(field), value


def _view_row(value: bytes) -> bytes:
    """The row of a stored view (worker/stored_view.py, either form); b"" if none."""
    try:
        return stored_view.row_of(value)
    except ValueError:
        return b""


def dead_letter_cut(entry: bytes, selector: Selector, until_ms: int) -> bytes | None:
    """What a dead letter becomes without the person: None when none of it is theirs,
    b"" to remove it whole, else the entry with its batch holding the others only.

    A payload that is one event is theirs or not; a batch (a JSON array) loses
    the person's events; anything else that holds one of their events, or, when
    it is not JSON at all, both their project id and their id as text, goes whole.
    """
    try:
        header, payload = decode_dead_letter(entry)
    except (msgspec.DecodeError, msgspec.ValidationError):
        header, payload = None, entry
    try:
        data = decode_any(payload)
    except (msgspec.DecodeError, RecursionError):
        project = selector.project_id.encode("utf-8", "surrogatepass")
        value = selector.value.encode("utf-8", "surrogatepass")
        return b"" if project in payload and value in payload else None
    if isinstance(data, dict):
        if selector.owns_raw(data, until_ms):
            return b""
        return b"" if _holds(data, selector, until_ms) else None
    if isinstance(data, list) and header is not None:
        kept = [item for item in data if not selector.owns_raw(item, until_ms)]
        if len(kept) == len(data):
            return b"" if _holds(data, selector, until_ms) else None
        if not kept:
            return b""
        return entry.partition(b"\n")[0] + b"\n" + msgspec.json.encode(kept)
    return b"" if _holds(data, selector, until_ms) else None


def _holds(data: object, selector: Selector, until_ms: int) -> bool:
    """Whether one of the person's events is anywhere inside `data` (a task body)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if selector.owns_raw(item, until_ms):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def find(redis: Client, shard: ShardKeys, selector: Selector, until_ms: int) -> Found:
    """The person's entries in `shard`, read now (queue and dead letters by index)."""
    queue = [(i, row) for i, row in _pages(redis, shard.queue) if selector.owns_row(row, until_ms)]
    dead = []
    for index, entry in _pages(redis, shard.dead):
        cut = dead_letter_cut(entry, selector, until_ms)
        if cut is not None:
            dead.append((index, entry, cut))
    views = [
        (session, value)
        for session, value in _hash(redis, shard.views)
        if selector.owns_row(_view_row(value), until_ms)
    ]
    profile_views = [
        (field, value)
        for field, value in _hash(redis, shard.profile_views)
        if selector.owns_row(_view_row(value), until_ms)
    ]
    queue.sort(reverse=True)
    dead.sort(reverse=True)
    return Found(queue, dead, views, profile_views)


def _calls(found: Found) -> Iterator[Found]:
    """`found` cut into script calls; indices descend from call to call, so removing
    one call's entries never moves those of the next."""
    size = ENTRIES_PER_CALL
    longest = max(len(found.queue), len(found.dead), len(found.views), len(found.profile_views))
    for start in range(0, max(longest, 1), size):
        yield Found(
            found.queue[start : start + size],
            found.dead[start : start + size],
            found.views[start : start + size],
            found.profile_views[start : start + size],
        )


def visitor_of(selector: Selector) -> str:
    """The member of the active visitors to drop: visitors are profile ids, and an
    anonymous visitor's profile id is its device id (OpenPanel's convention)."""
    return selector.value if selector.kind in ("profile", "device") else ""


def erase_shard(
    redis: Client,
    shard: ShardKeys,
    selector: Selector,
    until_ms: int,
    settings: Settings,
    clock: Clock,
) -> ShardRemoval:
    """Erase the person from one shard; the caller holds its flush lock."""
    release_due(Scripts(redis), shard, settings, clock)
    total = ShardRemoval()
    visitor = visitor_of(selector)
    for _ in range(MAX_PASSES):
        found = find(redis, shard, selector, until_ms)
        removal = ShardRemoval()
        for part in _calls(found):
            removal.add(forget_shard(redis, shard, selector.project_id, visitor, part))
            visitor = ""  # once is enough
        claimed, removal.claimed_rows = removal.claimed_rows, 0
        total.add(removal)
        total.claimed_rows = claimed  # the claim's rows are found again on every pass
        if not removal.missed:
            break
    return total


def hold_flush_lock(redis: Client, shard: ShardKeys, settings: Settings) -> FlushLock:
    """The shard's flush lock, waited for while a live flusher holds it (a dead one's is
    taken over). Raises LockHeldError after LOCK_WAIT_S."""
    lock = FlushLock(redis, shard.lock, settings.lock_ttl_s, what=f"forget, shard {shard.shard}")
    deadline = time.monotonic() + LOCK_WAIT_S
    while not lock.acquire():
        if time.monotonic() > deadline:
            state = read_lock(redis, shard.lock)
            who = state.describe() if state is not None else "a flusher"
            raise LockHeldError(
                f"shard {shard.shard}: its flush lock is held by {who} past {LOCK_WAIT_S:.0f} "
                "s; run `eventbuffer forget` again (it completes what this one began)",
                shard=shard.shard,
                lock=shard.lock,
                holder=state.who if state is not None else "",
            )
        time.sleep(LOCK_POLL_S)
    return lock
