"""The whole Redis keyspace of eventbuffer, in one place.

Every key of a shard starts with the hash tag `{<prefix>:<shard>}`, so all
keys one Lua script touches live in one Redis Cluster slot. Values that come
from events (session, profile, project ids, batch ids) are percent-encoded
before they become part of a key: `{`, `}`, `:`, `%` and spaces can never
change the hash tag or make two different ids share a key.

Per shard:

    {p:N}:queue                 LIST    JSON rows waiting for ClickHouse, oldest first
    {p:N}:claim                 HASH    the open claim: id, count (head of queue), at;
                                        split:<token> for each chunk halved after a rejection
    {p:N}:lock                  STRING  flush lock token, naming its holder (SET NX PX;
                                        worker/lock.py)
    {p:N}:dead                  LIST    dead letters: JSON header, newline, raw payload
    {p:N}:stats                 HASH    last flush: at, rows, dead, claim id, claimed;
                                        running totals rows_total, removed_total
    {p:N}:sessions              ZSET    session id -> when its last view was set (ms)
    {p:N}:backoff               STRING  set while flushes wait after ClickHouse failures (PX)
    {p:N}:failures              STRING  ClickHouse failures in a row (for the doubling delay)
    {p:N}:views                 HASH    session id -> its last screen_view,
                                        "<ms>|<own duration>|<row>"
    {p:N}:profile-views         HASH    "<proj>:<pid>" (escaped) -> a profile's last
                                        screen_view, same format
    {p:N}:visitors:<proj>       ZSET    profile id -> last seen (ms); expires with the window
    {p:N}:visitor-projects      ZSET    project id -> when a visitor of it was last seen on
                                        the shard (ms): the projects with visitors, read
                                        without a SCAN (worker/visitors.py)
    {p:N}:held:<session>        STRING  a session's events held by the reorder window, one
                                        pack of records, appended to (worker/held_pack.py)
    {p:N}:held-kept:<session>   STRING  what stays of a pack a release cut, written and renamed
                                        over the pack in the release's one transaction
                                        (worker/reorder_release.py): never seen outside it
    {p:N}:held-due              ZSET    session id -> earliest deadline of its held events
    {p:N}:closed                HASH    session id -> created ms its session_end closed it at,
                                        for late views (kept EVENT_BUFFER_CLOSED_SESSION_TTL_S)
    {p:N}:closed-at             ZSET    session id -> when it was closed (ms): what to forget
    {p:N}:batch:<id>            STRING  marker of an applied ingest batch: the digest of
                                        its content (with TTL)
    {p:N}:conflict:<id>:<digest>
                                STRING  set when the batch of this id and digest was kept as
                                        a batch_id_conflict dead letter (with TTL)

Deployment-wide:

    <p>:flush-pending           STRING  an early flush was requested (back-pressure)
    <p>:run-owner               STRING  the `eventbuffer run` stack using this Redis (with TTL)
    {<p>:forget}:project:<proj> HASH    `eventbuffer forget`'s tombstones of a project:
                                        "<kind>:<id>" -> "<request ms>|<expiry ms>"
                                        (worker/privacy/tombstones.py; expires with the last)
    {<p>:forget}:projects       HASH    project id -> expiry ms of its latest tombstone

Pub/sub channels (not keys, so they carry no hash tag): `events:received`
and `events:saved`, the names OpenPanel's subscribers listen on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, unquote

CHANNEL_RECEIVED = "events:received"
CHANNEL_SAVED = "events:saved"


@lru_cache(maxsize=8192)
def escape(value: str) -> str:
    """Percent-encode an id so it is inert inside a key name (cached: ids repeat)."""
    return quote(value, safe="")


def glob_escape(text: str) -> str:
    """Escape a key prefix for SCAN MATCH (`*`, `?`, `[`, `]` and `\\` are special)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def shard_for(route_key: str, shards: int) -> int:
    """Stable shard of a routing key (a session id, or the event id without one)."""
    if shards == 1:
        return 0
    return zlib.crc32(route_key.encode("utf-8")) % shards


@dataclass(frozen=True)
class ShardKeys:
    """Key names of one buffer shard (the fixed ones computed once)."""

    prefix: str
    shard: int
    tag: str = field(init=False, compare=False)
    queue: str = field(init=False, compare=False)
    claim: str = field(init=False, compare=False)
    lock: str = field(init=False, compare=False)
    dead: str = field(init=False, compare=False)
    stats: str = field(init=False, compare=False)
    sessions: str = field(init=False, compare=False)
    views: str = field(init=False, compare=False)
    profile_views: str = field(init=False, compare=False)
    backoff: str = field(init=False, compare=False)
    failures: str = field(init=False, compare=False)
    held_due: str = field(init=False, compare=False)
    closed: str = field(init=False, compare=False)
    closed_at: str = field(init=False, compare=False)
    visitor_projects: str = field(init=False, compare=False)
    held_generation: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError("the key prefix must not contain '{' or '}'")
        tag = "{" + f"{self.prefix}:{self.shard}" + "}"
        names = {
            "tag": tag,
            "queue": f"{tag}:queue",
            "claim": f"{tag}:claim",
            "lock": f"{tag}:lock",
            "dead": f"{tag}:dead",
            "stats": f"{tag}:stats",
            "sessions": f"{tag}:sessions",
            "views": f"{tag}:views",
            "profile_views": f"{tag}:profile-views",
            "backoff": f"{tag}:backoff",
            "failures": f"{tag}:failures",
            "held_due": f"{tag}:held-due",
            "closed": f"{tag}:closed",
            "closed_at": f"{tag}:closed-at",
            "visitor_projects": f"{tag}:visitor-projects",
            # incremented by every release of held events (worker/reorder_release.py)
            "held_generation": f"{tag}:held-gen",
        }
        for name, value in names.items():
            object.__setattr__(self, name, value)

    def held(self, session_id: str) -> str:
        """A session's events held by the reorder window."""
        return f"{self.tag}:held:{escape(session_id)}"

    def held_kept(self, session_id: str) -> str:
        """What stays of a session's pack cut by a release, until renamed over the pack."""
        return f"{self.tag}:held-kept:{escape(session_id)}"

    def visitors(self, project_id: str) -> str:
        return f"{self.tag}:visitors:{escape(project_id)}"

    def visitors_pattern(self) -> str:
        return glob_escape(self.visitors("")) + "*"

    def project_of_visitors_key(self, key: str) -> str:
        return unquote(key.rsplit(":", 1)[1])

    @staticmethod
    def profile_field(project_id: str, profile_id: str) -> str:
        """A profile's field in `profile_views`: both ids escaped, so ":" is unambiguous."""
        return f"{escape(project_id)}:{escape(profile_id)}"

    def batch(self, batch_id: str) -> str:
        return f"{self.tag}:batch:{escape(batch_id)}"

    def conflict(self, batch_id: str, digest: str) -> str:
        """Set when a batch of this id and digest was kept as a batch_id_conflict dead letter."""
        return f"{self.tag}:conflict:{escape(batch_id)}:{escape(digest)}"


@dataclass(frozen=True)
class Keyspace:
    """All shards of one deployment."""

    prefix: str
    shards: int
    _shards: tuple[ShardKeys, ...] = field(init=False, repr=False, compare=False)

    @property
    def flush_pending(self) -> str:
        """Set while an ingest-triggered `process_buffer` waits in the queue."""
        return f"{self.prefix}:flush-pending"

    @property
    def run_owner(self) -> str:
        """The `eventbuffer run` stack using this Redis (worker/cli/stack_lock.py)."""
        return f"{self.prefix}:run-owner"

    @property
    def forget_tag(self) -> str:
        """The hash tag of the tombstones' keys: one slot, so one script sets both."""
        return "{" + f"{self.prefix}:forget" + "}"

    @property
    def tombstoned_projects(self) -> str:
        """Projects that have tombstones (worker/privacy/tombstones.py)."""
        return f"{self.forget_tag}:projects"

    def tombstones(self, project_id: str) -> str:
        """One project's tombstones (worker/privacy/tombstones.py)."""
        return f"{self.forget_tag}:project:{escape(project_id)}"

    def __post_init__(self) -> None:
        shards = tuple(ShardKeys(self.prefix, n) for n in range(self.shards))
        object.__setattr__(self, "_shards", shards)

    def shard(self, n: int) -> ShardKeys:
        return self._shards[n]

    def all(self) -> list[ShardKeys]:
        return list(self._shards)

    def route(self, route_key: str) -> ShardKeys:
        return self.shard(shard_for(route_key, self.shards))
