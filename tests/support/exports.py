"""Generated exports for the import tests and benchmark, with the answer they must give.

`generate_export` writes a realistic eventbuffer NDJSON export over several
gzip files: sessions of screen_views (some ended by a session_end), regular
events between them, a few events without `id`, every line in a random file
and the files' lines shuffled, so a session is spread over files in no
order. Every event carries a unique `properties.n`, so the test can find
each one in ClickHouse whatever id it got. `expected` holds, per `n`, the
duration the live path's rule gives it (worker/importer/durations.py,
computed here independently: sort each session, walk it).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.dates import BASE_MS

DAY_MS = 86_400_000


@dataclass
class Export:
    files: list[Path]
    events: int
    expected: dict[str, int] = field(default_factory=dict)  # n -> duration
    projects: tuple[str, ...] = ("shop", "blog")


def _events(count: int, rng: random.Random) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    n = 0
    session = 0
    while n < count:
        session += 1
        project = "shop" if session % 3 else "blog"
        start = BASE_MS - rng.randrange(60) * DAY_MS + rng.randrange(DAY_MS)
        at = start
        length = rng.randrange(1, 30)
        ended = rng.random() < 0.3
        for step in range(length):
            if n >= count:
                break
            at += rng.randrange(1, 120_000)
            name = "screen_view" if rng.random() < 0.7 else rng.choice(["click", "signup"])
            if step == length - 1 and ended:
                name = "session_end"
            event: dict[str, Any] = {
                "project_id": project,
                "name": name,
                "session_id": f"s-{session}",
                "profile_id": f"u-{session % 997}",
                "path": f"/page/{rng.randrange(40)}",
                "created_at": at,
                "properties": {"n": str(n), "plan": rng.choice(["free", "pro"])},
            }
            if rng.random() < 0.8:
                event["id"] = str(_uuid(rng))
            events.append(event)
            n += 1
    return events


def _uuid(rng: random.Random) -> str:
    import uuid

    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def expected_durations(events: list[dict[str, Any]]) -> dict[str, int]:
    """n -> duration: per session, by created_at, a view gets the gap to the next view
    (a session_end between keeps its own, 0), the last view 0; other events 0."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    result: dict[str, int] = {}
    for event in events:
        result[event["properties"]["n"]] = 0
        if event["name"] in ("screen_view", "session_end"):
            by_session.setdefault(event["session_id"], []).append(event)
    for members in by_session.values():
        members.sort(key=lambda e: e["created_at"])
        pending: dict[str, Any] | None = None
        for event in members:
            if event["name"] == "screen_view":
                if pending is not None:
                    result[pending["properties"]["n"]] = event["created_at"] - pending["created_at"]
                pending = event
            else:
                pending = None
    return result


def generate_export(
    directory: Path, count: int, files: int = 4, seed: int = 7, gz: bool = True
) -> Export:
    rng = random.Random(seed)
    events = _events(count, rng)
    shards: list[list[str]] = [[] for _ in range(files)]
    for event in events:
        shards[rng.randrange(files)].append(json.dumps(event, separators=(",", ":")))
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    for index, lines in enumerate(shards):
        rng.shuffle(lines)
        path = directory / f"day-{index:02d}.ndjson{'.gz' if gz else ''}"
        data = ("\n".join(lines) + "\n").encode()
        if gz:
            with gzip.open(path, "wb", compresslevel=1) as out:
                out.write(data)
        else:
            path.write_bytes(data)
        paths.append(path)
    rng.shuffle(paths)  # a shell glob in any order
    return Export(paths, len(events), expected_durations(events))
