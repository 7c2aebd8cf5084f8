"""`eventbuffer dlq list|show|replay|purge`: look at dead letters, bring fixed ones back, drop them.

Dead letters stay in Redis until an operator acts: `list` and `show` read
them, `replay` applies the entries that now validate (or their corrected
versions from a JSONL file, matched by event id) and removes exactly those,
`purge` removes the chosen entries for good. Replay and purge ask first
unless `--yes`; with no terminal to ask on, they refuse.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from worker import runtime
from worker.cli.common import CliError, progress_bar
from worker.cli.status import ago, iso
from worker.deadletters import (
    StoredDeadLetter,
    iter_dead_letters,
    read_dead_letter,
    reason_counts,
    remove_dead_letters,
    safe_text,
)
from worker.events import Limits
from worker.replay import canonical_id, plan_replay, replay
from worker.settings import Settings

# Replays and purges from this many entries up get a progress bar.
PROGRESS_MIN_ENTRIES = 500
# Entries that cannot be replayed are listed up to this many.
SHOW_INVALID = 10


def add_dlq_parser(commands: Any) -> None:
    """Register `dlq` and its actions on the top-level subparsers."""
    dlq = commands.add_parser("dlq", help="list, show, replay or purge dead letters")
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--shard", type=int, default=None, metavar="N", help="only this shard (all)"
        )
        parser.add_argument(
            "--reason",
            default=None,
            metavar="R",
            help="only this reason: invalid_event, invalid_json, rejected_by_clickhouse (all)",
        )

    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    filters(listing)
    listing.add_argument(
        "--limit", type=int, default=20, metavar="N", help="show at most this many (20; 0 = all)"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(handler=cmd_dlq_list)

    show = actions.add_parser("show", help="one dead letter: its full header and payload")
    show.add_argument("index", type=int, help="its index, as `dlq list` shows it")
    show.add_argument(
        "--shard", type=int, default=0, metavar="N", help="the shard whose list holds it (0)"
    )
    show.set_defaults(handler=cmd_dlq_show)

    again = actions.add_parser(
        "replay", help="apply the dead letters that validate now, then remove them"
    )
    filters(again)
    again.add_argument(
        "--file",
        type=Path,
        default=None,
        metavar="FIXED.jsonl",
        help="JSONL of corrected events: replay only the dead letters of their ids, fixed",
    )
    again.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    again.set_defaults(handler=cmd_dlq_replay)

    purge = actions.add_parser("purge", help="delete dead letters for good")
    filters(purge)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(handler=cmd_dlq_purge)


# -- selection ----------------------------------------------------------------------


def chosen(args: argparse.Namespace, settings: Settings) -> Iterator[StoredDeadLetter]:
    """The dead letters `--shard` and `--reason` pick, shard by shard, oldest first."""
    redis = runtime.redis_client()
    keyspace = runtime.buffer().keyspace
    shards = keyspace.all() if args.shard is None else [keyspace.shard(check_shard(args, settings))]
    for shard in shards:
        yield from iter_dead_letters(redis, shard, args.reason)


def check_shard(args: argparse.Namespace, settings: Settings) -> int:
    shard = int(args.shard)
    if not 0 <= shard < settings.shards:
        raise CliError(
            f"no shard {shard}: EVENT_BUFFER_SHARDS={settings.shards} "
            f"(shards 0 to {settings.shards - 1})",
            2,
        )
    return shard


def scope(args: argparse.Namespace) -> str:
    """`--shard`/`--reason` in words, for prompts and reports."""
    where = "all shards" if args.shard is None else f"shard {args.shard}"
    return where if args.reason is None else f"{where}, reason {args.reason}"


def stdin_is_interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def confirm(console: Console, question: str, expected: str, action: str) -> None:
    """Ask on the terminal; raise CliError unless the answer is `expected` (or y/yes)."""
    if not stdin_is_interactive():
        raise CliError(f"refusing to {action} without --yes: stdin is not a terminal to ask on", 2)
    try:
        answer = console.input(question).strip().lower()
    except EOFError:
        answer = ""
    if answer not in (expected.lower(), *(("y", "yes") if expected == "y" else ())):
        raise CliError("not confirmed: nothing was changed", 1)


# -- list and show ------------------------------------------------------------------


def letter_data(letter: StoredDeadLetter, preview: int | None = None) -> dict[str, Any]:
    header = letter.header
    return {
        "shard": letter.shard,
        "index": letter.index,
        "reason": letter.reason,
        "source": header.source if header else "",
        "field": header.field if header else "",
        "at_ms": header.at if header else None,
        "at": iso(header.at) if header else None,
        "claim": header.claim if header else "",
        "error": header.error if header else "",
        "payload_bytes": len(letter.payload),
        "payload": safe_text(letter.payload, preview),
    }


def cmd_dlq_list(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    if args.limit < 0:
        raise CliError("--limit must be 0 (all) or more", 2)
    letters = list(chosen(args, settings))
    limit = args.limit or len(letters)
    shown = letters[:limit]
    counts = reason_counts(letters)
    if args.json:
        data = {
            "total": len(letters),
            "by_reason": counts,
            "entries": [letter_data(letter) for letter in shown],
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    if not letters:
        console.print(f"No dead letters ({scope(args)}).")
        return 0
    now = runtime.buffer().clock.now_ms()
    table = Table(title=f"Dead letters ({scope(args)})")
    for column in ("shard", "index"):
        table.add_column(column, justify="right")
    for column in ("reason", "field", "when", "error", "payload"):
        table.add_column(column, overflow="fold")
    for letter in shown:
        header = letter.header
        table.add_row(
            str(letter.shard),
            str(letter.index),
            letter.reason,
            safe_text(header.field.encode(), 30) if header else "",
            ago(header.at, now) if header else "?",
            safe_text(header.error.encode(), 60) if header else "",
            safe_text(letter.payload, 60),
        )
    console.print(table)
    by_reason = ", ".join(f"{reason} {count:,}" for reason, count in counts.items())
    more = f"; showing the first {len(shown):,} (--limit)" if len(shown) < len(letters) else ""
    console.print(f"{len(letters):,} dead letters: {by_reason}{more}.")
    return 0


def cmd_dlq_show(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    shard_no = check_shard(args, settings)
    if args.index < 0:
        raise CliError("the index must be 0 or more, as `eventbuffer dlq list` shows it", 2)
    shard = runtime.buffer().keyspace.shard(shard_no)
    letter = read_dead_letter(runtime.redis_client(), shard, args.index)
    if letter is None:
        total = int(runtime.redis_client().llen(shard.dead))
        raise CliError(f"no dead letter at index {args.index} of shard {shard_no} (it has {total})")
    data = letter_data(letter)
    width = max(len(key) for key in data)
    for key, value in data.items():
        if key == "payload":
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if key == "at" and letter.header:
            text += f" ({ago(letter.header.at, runtime.buffer().clock.now_ms())})"
        # Header values come from events (ids, errors quoting input): shown escaped.
        console.print(f"{key:<{width}}  {safe_text(text.encode())}")
    try:
        msgspec.json.decode(letter.payload)
        kind = "JSON"
    except msgspec.DecodeError:
        kind = "not JSON"
    console.print(f"payload ({len(letter.payload):,} bytes, {kind}):")
    console.print(safe_text(letter.payload))
    return 0


# -- replay -------------------------------------------------------------------------


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
    letters = list(chosen(args, settings))
    plan = plan_replay(letters, Limits.from_settings(settings, buffer.clock), fixes)

    if fixes is not None and plan.unmatched_ids:
        ids = ", ".join(plan.unmatched_ids[:3]) + (", …" if len(plan.unmatched_ids) > 3 else "")
        console.print(
            f"{len(plan.unmatched_ids):,} event(s) of {args.file} match no dead letter "
            f"({scope(args)}): {ids}"
        )
    if plan.invalid:
        what = "corrected version still fails" if fixes is not None else "still fail"
        console.print(f"{len(plan.invalid):,} dead letter(s) {what} validation and stay:")
        for item in plan.invalid[:SHOW_INVALID]:
            letter = item.letter
            console.print(
                f"  shard {letter.shard} #{letter.index} ({letter.reason}): "
                f"{safe_text(item.error.encode(), 200)}"
            )
        if len(plan.invalid) > SHOW_INVALID:
            console.print(f"  … and {len(plan.invalid) - SHOW_INVALID:,} more")
    if not plan.ready:
        console.print(f"Nothing to replay ({scope(args)}: {len(letters):,} dead letters).")
        return 0

    count = len(plan.ready)
    if not args.yes:
        confirm(
            console,
            f"Replay {count:,} dead letter(s) ({scope(args)}) into the buffer? [y/N] ",
            "y",
            "replay dead letters",
        )
    with progress_bar(console, disable=count < PROGRESS_MIN_ENTRIES) as bar:
        task = bar.add_task("replaying", total=count, unit="entries")
        result = replay(buffer, plan.ready, lambda n: bar.advance(task, n))
    earlier = (
        f" ({result.already_applied:,} had been applied by an interrupted replay)"
        if result.already_applied
        else ""
    )
    console.print(
        f"Replayed {count:,} dead letter(s) into the buffer{earlier}; removed "
        f"{result.removed:,} from the dead letters. They reach ClickHouse with the next flush."
    )
    if result.invalid_events:
        console.print(
            f"{result.invalid_events:,} event(s) of the replayed batches failed validation: "
            "each is a dead letter of its own now (eventbuffer dlq list --reason invalid_event)."
        )
    if result.removed < count:
        console.print(
            f"{count - result.removed:,} were gone from the dead letters already "
            "(removed by another replay or purge meanwhile)."
        )
    return 0


# -- purge --------------------------------------------------------------------------


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    letters = list(chosen(args, settings))
    if not letters:
        console.print(f"No dead letters ({scope(args)}): nothing to purge.")
        return 0
    count = len(letters)
    if not args.yes:
        by_reason = ", ".join(f"{r} {n:,}" for r, n in reason_counts(letters).items())
        console.print(f"{count:,} dead letters ({scope(args)}): {by_reason}.")
        confirm(
            console,
            f"Delete them for good? Type {count} to confirm: ",
            str(count),
            "purge dead letters",
        )
    with progress_bar(console, disable=count < PROGRESS_MIN_ENTRIES) as bar:
        task = bar.add_task("purging", total=count, unit="entries")
        buffer = runtime.buffer()
        removed = remove_dead_letters(
            buffer.scripts, buffer.keyspace, letters, lambda n: bar.advance(task, n)
        )
    gone = f" ({count - removed:,} were gone already)" if removed < count else ""
    console.print(f"Purged {removed:,} dead letters ({scope(args)}){gone}.")
    return 0
