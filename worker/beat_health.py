"""Healthcheck of Celery Beat: has it written its schedule file lately?

Beat rewrites its schedule file (`celery beat --schedule FILE`) each time it
sends a task (the app sets `beat_sync_every = 1`), and its shortest entry is
due every `min(EVENT_BUFFER_FLUSH_INTERVAL_S, EVENT_BUFFER_SWEEP_INTERVAL_S)`
seconds. A file older than two of those intervals plus a margin means Beat's
loop has stopped sending: stuck (on a lock, a hung broker connection, a
SIGSTOP) or dead. The check runs inside the image with the same environment
as Beat, and reads only the file's age: Beat keeps the file open and locked.

    python -m worker.beat_health /tmp/celerybeat-schedule [--max-age SECONDS]

Exit 0 when fresh; 1 with one line on stderr otherwise (Docker shows it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from worker.settings import Settings, SettingsError

MARGIN_S = 5.0


def max_age_s(settings: Settings) -> float:
    """How old the schedule file may get while Beat runs: two ticks of its shortest entry."""
    return 2 * min(settings.flush_interval_s, settings.sweep_interval_s) + MARGIN_S


def schedule_age_s(schedule: Path, now: float | None = None) -> float | None:
    """Seconds since Beat last wrote `schedule`, None if there is no such file.

    The dbm module behind Celery's shelve may add suffixes (`.db`; `.dat`,
    `.dir`, `.bak`): the newest of the file and those counts.
    """
    paths = [schedule, *schedule.parent.glob(f"{schedule.name}.*")]
    mtimes = [p.stat().st_mtime for p in paths if p.is_file()]
    if not mtimes:
        return None
    return (time.time() if now is None else now) - max(mtimes)


def check(schedule: Path, max_age: float) -> str | None:
    """None when Beat is healthy, else why not (one line)."""
    age = schedule_age_s(schedule)
    if age is None:
        return f"Beat has written no schedule file at {schedule} (not started, or another path)"
    if age > max_age:
        return (
            f"Beat last wrote {schedule} {age:.0f} s ago (more than {max_age:.0f} s): "
            "it is stuck or dead"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.beat_health", description=__doc__)
    parser.add_argument("schedule", type=Path, help="Beat's --schedule file")
    parser.add_argument("--max-age", type=float, help="seconds (default: from the intervals)")
    args = parser.parse_args(argv)
    try:
        limit = args.max_age if args.max_age is not None else max_age_s(Settings.from_env())
    except SettingsError as exc:
        print(f"beat healthcheck: bad setting: {exc}", file=sys.stderr)
        return 1
    problem = check(args.schedule, limit)
    if problem is not None:
        print(f"beat healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
