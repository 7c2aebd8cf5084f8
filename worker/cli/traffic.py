"""Realistic demo traffic: visits to three sites, with screen_views, clicks, signups."""

from __future__ import annotations

import random
import uuid
from typing import Any

from worker.cli.common import version

DEMO_PROJECTS = {
    "demo-shop": ["/", "/products", "/products/espresso-grinder", "/cart", "/checkout"],
    "demo-blog": ["/", "/posts/buffering-events", "/posts/clickhouse-tips", "/about"],
    "demo-docs": ["/docs", "/docs/install", "/docs/api", "/docs/faq", "/changelog"],
}
DEMO_DEVICE_FIELDS = ("device", "os", "os_version", "browser", "browser_version", "brand", "model")
DEMO_DEVICES = [
    ("desktop", "Mac OS", "14.4", "Chrome", "123.0", "Apple", "Macintosh"),
    ("desktop", "Windows", "11", "Edge", "122.0", "", ""),
    ("desktop", "Linux", "", "Firefox", "124.0", "", ""),
    ("mobile", "iOS", "17.4", "Mobile Safari", "17.4", "Apple", "iPhone"),
    ("mobile", "Android", "14", "Chrome", "123.0", "Samsung", "Galaxy S23"),
    ("tablet", "iPadOS", "17.3", "Safari", "17.3", "Apple", "iPad"),
]
DEMO_REFERRER_FIELDS = ("referrer", "referrer_name", "referrer_type")
DEMO_REFERRERS = [
    ("", "", ""),
    ("https://www.google.com/", "Google", "search"),
    ("https://duckduckgo.com/", "DuckDuckGo", "search"),
    ("https://news.ycombinator.com/", "Hacker News", "social"),
    ("https://www.linkedin.com/", "LinkedIn", "social"),
]
DEMO_PLACE_FIELDS = ("country", "city", "region")
DEMO_PLACES = [
    ("US", "New York", "New York"),
    ("US", "San Francisco", "California"),
    ("DE", "Berlin", "Berlin"),
    ("SE", "Stockholm", "Stockholm County"),
    ("GB", "London", "England"),
    ("FR", "Paris", "Île-de-France"),
    ("JP", "Tokyo", "Tokyo"),
    ("BR", "São Paulo", "São Paulo"),
    ("IN", "Bengaluru", "Karnataka"),
]
DEMO_BUTTONS = ["add_to_cart", "subscribe", "search", "share", "copy_code"]
DEMO_PLANS = ["free", "pro", "team"]


def demo_session(
    rng: random.Random, run_id: str, now_ms: int, profiles: int
) -> list[dict[str, Any]]:
    """One visit: screen_views seconds apart, maybe clicks and a signup, then a session_end."""
    project = rng.choice(list(DEMO_PROJECTS))
    profile = f"visitor-{rng.randrange(profiles):04d}"
    device = rng.choice(DEMO_DEVICES)
    base = {
        "project_id": project,
        "session_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "profile_id": profile,
        "device_id": f"{profile}-{device[0]}",
        "origin": f"https://{project.removeprefix('demo-')}.example.com",
        **dict(zip(DEMO_DEVICE_FIELDS, device, strict=True)),
        **dict(zip(DEMO_REFERRER_FIELDS, rng.choice(DEMO_REFERRERS), strict=True)),
        **dict(zip(DEMO_PLACE_FIELDS, rng.choice(DEMO_PLACES), strict=True)),
        "sdk_name": "eventbuffer-demo",
        "sdk_version": version().split()[0],
    }

    def event(name: str, at: int, path: str, **properties: str) -> dict[str, Any]:
        tags = {"demo_run": run_id, **properties}
        return {**base, "name": name, "path": path, "created_at": at, "properties": tags}

    events: list[dict[str, Any]] = []
    at = now_ms - rng.randrange(60_000, 30 * 60_000)
    path = "/"
    for _view in range(rng.randint(2, 6)):
        path = rng.choice(DEMO_PROJECTS[project])
        events.append(event("screen_view", at, path, title=path.strip("/") or "home"))
        gap = rng.randint(3_000, 45_000)
        if rng.random() < 0.4:
            click_at = at + rng.randint(500, gap - 500)
            events.append(event("button_click", click_at, path, button=rng.choice(DEMO_BUTTONS)))
        at += gap
    if rng.random() < 0.2:
        events.append(
            event("signup", at - 1_000, path, plan=rng.choice(DEMO_PLANS), method="email")
        )
    events.append(event("session_end", at, path))
    return events


def demo_events(
    rng: random.Random, sessions: int, run_id: str, now_ms: int
) -> list[dict[str, Any]]:
    profiles = max(2, sessions * 2 // 3)  # some visitors come back
    return [e for _ in range(sessions) for e in demo_session(rng, run_id, now_ms, profiles)]
