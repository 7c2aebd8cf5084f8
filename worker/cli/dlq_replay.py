"""`eventbuffer dlq replay`: apply the dead letters that validate now, then remove them.

With `--file`, the corrected versions from a JSONL file replace the dead
letters of their ids. Letters that still fail, or cannot be read, are
reported and stay; the others are replayed (worker/replay.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
from rich.console import Console

from worker import runtime
from worker.cli.common import CliError, confirm, progress_bar
from worker.cli.dlq_pick import PROGRESS_MIN_ENTRIES, chosen, picked, scope, which
from worker.deadletters import StoredDeadLetter, safe_text
from worker.events import Limits
from worker.replay import canonical_id, plan_replay, replay
from worker.settings import Settings

# Entries that cannot be replayed are listed up to this many.
SHOW_INVALID = 10


def read_fixes(path: Path) -> dict[str, bytes]:
    """Corrected events by canonical id, from a JSONL file; CliError for any bad line."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", 2) from None
    fixes: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise CliError(f"{path}:{number}: not valid JSON: {exc}", 2) from None
        except RecursionError:
            raise CliError(f"{path}:{number}: nested too deeply to decode", 2) from None
        event_id = canonical_id(obj.get("id")) if isinstance(obj, dict) else None
        if event_id is None:
            raise CliError(
                f"{path}:{number}: each line must be an event object with its UUID `id` "
                "(the id of the dead letter it corrects)",
                2,
            )
        if event_id in fixes:
            raise CliError(f"{path}:{number}: id {event_id} appears twice", 2)
        fixes[event_id] = line.strip()
    if not fixes:
        raise CliError(f"{path} holds no events", 2)
    return fixes


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    fixes = read_fixes(args.file) if args.file is not None else None
    buffer = runtime.buffer()
    picks = picked(args, settings)
    letters = list(chosen(args, settings)) if picks is None else picks
    what = scope(args) if picks is None else which(picks)
    plan = plan_replay(letters, Limits.from_settings(settings, buffer.clock), fixes)

    if fixes is not None and plan.unmatched_ids:
        ids = ", ".join(plan.unmatched_ids[:3]) + (", …" if len(plan.unmatched_ids) > 3 else "")
        console.print(
            f"{len(plan.unmatched_ids):,} event(s) of {args.file} match no dead letter "
            f"({what}): {ids}",
            markup=False,
        )
    if plan.invalid:
        verb = "corrected version still fails" if fixes is not None else "still fail"
        console.print(f"{len(plan.invalid):,} dead letter(s) {verb} validation and stay:")
        report(console, [(item.letter, item.error) for item in plan.invalid])
    # Picked one by one, each letter is expected to be replayed: one that is not is a failure.
    missed = 1 if picks is not None and (plan.invalid or len(plan.ready) < len(picks)) else 0
    if not plan.ready:
        console.print(f"Nothing to replay ({what}: {len(letters):,} dead letters).", markup=False)
        return missed

    count = len(plan.ready)
    if not args.yes:
        confirm(
            console,
            f"Replay {count:,} dead letter(s) ({what}) into the buffer? [y/N] ",
            "y",
            "replay dead letters",
        )
    with progress_bar(console, disable=count < PROGRESS_MIN_ENTRIES) as bar:
        task = bar.add_task("replaying", total=count, unit="entries")
        result = replay(buffer, plan.ready, lambda n: bar.advance(task, n))
    applied = count - len(result.failed)
    earlier = (
        f" ({result.already_applied:,} had been applied by an interrupted replay)"
        if result.already_applied
        else ""
    )
    console.print(
        f"Replayed {applied:,} dead letter(s) into the buffer{earlier}; removed "
        f"{result.removed:,} from the dead letters. They reach ClickHouse with the next flush."
    )
    if result.failed:
        console.print(f"{len(result.failed):,} dead letter(s) failed to replay and stay:")
        report(console, [(item.letter, item.error) for item in result.failed])
        missed = 1
    if result.invalid_events:
        console.print(
            f"{result.invalid_events:,} event(s) of the replayed batches failed validation: "
            "each is a dead letter of its own now (eventbuffer dlq list --reason invalid_event)."
        )
    if result.removed < applied:
        console.print(
            f"{applied - result.removed:,} were gone from the dead letters already "
            "(removed by another replay or purge meanwhile)."
        )
    return missed


def report(console: Console, problems: list[tuple[StoredDeadLetter, str]]) -> None:
    """One line per dead letter that stays, with why (the first SHOW_INVALID of them)."""
    for letter, error in problems[:SHOW_INVALID]:
        console.print(
            f"  shard {letter.shard} #{letter.index} ({safe_text(letter.reason.encode(), 30)}): "
            f"{safe_text(error.encode(), 200)} [id {letter.id}]",
            markup=False,
        )
    if len(problems) > SHOW_INVALID:
        console.print(f"  … and {len(problems) - SHOW_INVALID:,} more")
