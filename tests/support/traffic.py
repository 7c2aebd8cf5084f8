"""Traffic for tests and benchmarks: the fault suite's reference model and a realistic mix.

- `ReferenceTraffic`: complete sessions of a fixed shape, with the expected
  duration of every event (the fault suite checks ClickHouse against it).
- `RealisticTraffic` / `traffic()`: many interleaved sessions of views,
  custom events with nested properties and session_ends, as a site sends
  them (the benchmarks' workload); `mix()` describes a sample of it.

Dates derive from now (`tests.support.dates`), inside the accepted window.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.support.dates import BASE_MS, NOON_MS, iso

VIEWS = 5
EVENTS_PER_SESSION = VIEWS + 2  # the views, one click, the session_end


class ReferenceTraffic:
    """Sessions of the reference model, with the expected duration of every event.

    Every session is `VIEWS` screen_views with known gaps, a click after the
    third view and a session_end; a view's expected duration is the gap to the
    next view of its session; the last view, the click and the session_end
    have 0. Sessions are `tag`-named, their time ranges apart: each starts
    `spacing_ms` after the previous one (5 min by default, so a session's
    views, at most 2.5 min apart, never overlap the next session's; from 30
    days ago, about 62,000 events fit before their dates run into the future
    limit: a longer stream needs a shorter spacing, its sessions overlapping
    in time, which changes no duration).
    """

    def __init__(self, tag: str, project: str = "faults", spacing_ms: int = 300_000) -> None:
        self.tag = tag
        self.project = project
        self.spacing_ms = spacing_ms
        self.sessions = 0
        self.expected: dict[str, int] = {}
        self._lock = threading.Lock()

    def session(self) -> list[dict[str, Any]]:
        with self._lock:
            s = self.sessions
            self.sessions += 1
        sid = f"{self.tag}-s{s}"
        common = {
            "project_id": self.project,
            "session_id": sid,
            "profile_id": f"{self.tag}-u{s % 97}",
        }
        at = BASE_MS + s * self.spacing_ms
        views = []
        for v in range(VIEWS):
            views.append(at)
            at += 1000 * (1 + (s * 7 + v * 13) % 29) + (s * 31 + v * 17) % 1000
        events: list[dict[str, Any]] = []
        expected: dict[str, int] = {}
        for v, created in enumerate(views):
            view = {**common, "id": str(uuid.uuid4()), "name": "screen_view",
                    "created_at": created, "path": f"/page/{v}"}  # fmt: skip
            events.append(view)
            expected[view["id"]] = views[v + 1] - created if v < VIEWS - 1 else 0
            if v == 2:
                click = {**common, "id": str(uuid.uuid4()), "name": "click",
                         "created_at": created + 250, "properties": {"button": "buy"}}  # fmt: skip
                events.append(click)
                expected[click["id"]] = 0
        end = {**common, "id": str(uuid.uuid4()), "name": "session_end",
               "created_at": views[-1] + 5000}  # fmt: skip
        events.append(end)
        expected[end["id"]] = 0
        with self._lock:
            self.expected.update(expected)
        return events


# -- a realistic mix ---------------------------------------------------------------

# A session: 12 screen_views, 7 custom events, then session_end (60% / 35% / 5%).
VIEWS_PER_SESSION = 12
CUSTOM_PER_SESSION = 7
PROJECTS = ["shop", "blog", "docs", "app", "status"]
PATHS = ["/", "/pricing", "/docs", "/blog/launch", "/checkout", "/cart", "/product/42", "/about"]
CUSTOM = ["button_click", "add_to_cart", "search", "signup", "share", "video_play"]
DEVICES = [
    ("desktop", "Mac OS", "14.4", "Chrome", "123.0", "Apple", "Macintosh"),
    ("mobile", "iOS", "17.4", "Safari", "17.4", "Apple", "iPhone"),
    ("mobile", "Android", "14", "Chrome", "122.0", "Samsung", "SM-S918B"),
    ("desktop", "Windows", "11", "Edge", "123.0", "", ""),
]
PLACES = [("SE", "Stockholm", "Stockholm"), ("DE", "Berlin", "Berlin"), ("US", "Austin", "Texas")]
DEVICE_FIELDS = ("device", "os", "os_version", "browser", "browser_version", "brand", "model")
T0_MS = NOON_MS


@dataclass
class _Session:
    base: dict[str, Any]
    plan: list[str]  # event names, in order
    at_ms: int
    position: int = 0
    views_sent: int = 0


class RealisticTraffic:
    """Realistic events: many interleaved sessions of views, custom events and session_end.

    `events(n)` returns event dicts (no `id`: the producer assigns one) in a
    stream where `concurrent` sessions are open at once. `waiting` is how
    many screen_views stay in the buffer as their session's last view after
    applying them (sessions still open at the end), so the buffer's queue
    holds exactly `n - waiting` rows once everything is applied.
    """

    def __init__(self, seed: int = 7, concurrent: int = 400) -> None:
        self.rng = random.Random(seed)
        self.concurrent = concurrent
        self.open: list[_Session] = []
        self.sessions = 0

    def _new_session(self) -> _Session:
        rng = self.rng
        self.sessions += 1
        project = rng.choice(PROJECTS)
        profile = f"u-{rng.randrange(50_000):05d}" if rng.random() < 0.8 else ""
        device = rng.choice(DEVICES)
        country, city, region = rng.choice(PLACES)
        base: dict[str, Any] = {
            "project_id": project,
            "session_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "device_id": f"d-{rng.getrandbits(48):012x}",
            "origin": f"https://{project}.example.com",
            "referrer": "https://www.google.com/",
            "referrer_name": "Google",
            "referrer_type": "search",
            "country": country,
            "city": city,
            "region": region,
            "sdk_name": "web",
            "sdk_version": "1.0.3",
            **dict(zip(DEVICE_FIELDS, device, strict=True)),
        }
        if profile:
            base["profile_id"] = profile
        plan = ["screen_view"] * VIEWS_PER_SESSION + ["custom"] * CUSTOM_PER_SESSION
        rng.shuffle(plan)
        if plan[0] != "screen_view":  # a visit starts with a view
            first = plan.index("screen_view")
            plan[0], plan[first] = plan[first], plan[0]
        plan.append("session_end")
        return _Session(base, plan, T0_MS + rng.randrange(3_600_000))

    def _event(self, session: _Session) -> dict[str, Any]:
        rng = self.rng
        kind = session.plan[session.position]
        session.position += 1
        session.at_ms += rng.randrange(500, 30_000)
        path = rng.choice(PATHS)
        event: dict[str, Any] = {**session.base, "created_at": iso(session.at_ms), "path": path}
        if kind == "screen_view":
            session.views_sent += 1
            event["name"] = "screen_view"
            event["properties"] = {"title": path.strip("/") or "home", "__hash": ""}
        elif kind == "custom":
            event["name"] = rng.choice(CUSTOM)
            event["properties"] = {
                "button": rng.choice(["buy", "next", "close"]),
                "value": rng.randrange(1, 500),
                "utm": {"source": "newsletter", "medium": "email", "campaign": "spring"},
            }
        else:
            event["name"] = "session_end"
        return event

    def next_event(self) -> tuple[dict[str, Any], str, bool]:
        """The next event of the stream, its session id, and whether it ends the session."""
        while len(self.open) < self.concurrent:
            self.open.append(self._new_session())
        index = self.rng.randrange(len(self.open))
        session = self.open[index]
        event = self._event(session)
        ended = session.position == len(session.plan)
        if ended:
            self.open[index] = self.open[-1]
            self.open.pop()
        return event, session.base["session_id"], ended

    def events(self, n: int) -> list[dict[str, Any]]:
        return [self.next_event()[0] for _ in range(n)]

    def end_all(self) -> list[tuple[dict[str, Any], str]]:
        """A session_end, with its session id, for every open session, which closes them."""
        ended = []
        for session in self.open:
            session.position = len(session.plan) - 1
            ended.append((self._event(session), session.base["session_id"]))
        self.open.clear()
        return ended

    @property
    def waiting(self) -> int:
        """Open sessions holding a last view (each keeps exactly one in the buffer)."""
        return sum(1 for s in self.open if s.views_sent)


def traffic(n: int, seed: int = 7) -> tuple[list[dict[str, Any]], int]:
    """`n` events of a fresh stream, and how many views they leave waiting."""
    stream = RealisticTraffic(seed)
    return stream.events(n), stream.waiting


def mix(events: Sequence[Mapping[str, Any]]) -> str:
    total = len(events) or 1
    views = sum(1 for e in events if e["name"] == "screen_view")
    ends = sum(1 for e in events if e["name"] == "session_end")
    sessions = len({e["session_id"] for e in events})
    return (
        f"{len(events):,} events over {sessions:,} sessions: "
        f"{100 * views / total:.0f}% screen_view, "
        f"{100 * (total - views - ends) / total:.0f}% custom, {100 * ends / total:.0f}% session_end"
    )
