"""`eventbuffer dlq list|show|replay|purge`: look at dead letters, bring fixed ones back, drop them.

Dead letters stay in Redis until an operator acts: `list` and `show` read
them, `replay` applies the entries that now validate (or their corrected
versions from a JSONL file, matched by event id) and removes exactly those,
`purge` removes the chosen entries for good. Replay and purge ask first
unless `--yes`; with no terminal to ask on, they refuse.

Each dead letter can be picked alone, by its index in its shard's list or
by its id (a digest of its bytes, which does not shift as entries before it
go; `dlq list` shows both), whatever it holds: showing one decodes at most
`--bytes` of it and falls back to its raw bytes, escaped; a letter that
cannot be read for a replay is reported and the others are replayed.

Picking letters: worker/cli/dlq_pick.py; `replay`: worker/cli/dlq_replay.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from worker import runtime
from worker.cli.common import CliError, confirm, progress_bar
from worker.cli.dlq_pick import (
    PROGRESS_MIN_ENTRIES,
    by_reasons,
    check_shard,
    chosen,
    letter_at,
    letters_of_ids,
    picked,
    scope,
    which,
)
from worker.cli.dlq_replay import cmd_dlq_replay
from worker.cli.status import ago, iso
from worker.deadletters import (
    REASONS,
    StoredDeadLetter,
    reason_counts,
    remove_dead_letters,
    safe_text,
)
from worker.settings import Settings

# `dlq show` prints this many bytes of a payload unless told otherwise.
SHOW_BYTES = 65536
# `dlq show` decodes a payload up to this size to say whether it is JSON.
DECODE_MAX_BYTES = 16 << 20


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
            help=f"only this reason: {', '.join(REASONS)} (all)",
        )

    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    filters(listing)
    listing.add_argument(
        "--limit", type=int, default=20, metavar="N", help="show at most this many (20; 0 = all)"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(handler=cmd_dlq_list)

    def picks(parser: argparse.ArgumentParser, what: str) -> None:
        parser.add_argument(
            "--index",
            type=int,
            action="append",
            default=None,
            metavar="I",
            help=f"{what} only the dead letter at this index of --shard (repeatable)",
        )
        parser.add_argument(
            "--id",
            action="append",
            default=None,
            metavar="ID",
            help=f"{what} only the dead letter of this id, as `dlq list` shows it (repeatable)",
        )

    show = actions.add_parser("show", help="one dead letter: its full header and payload")
    show.add_argument(
        "index", type=int, nargs="?", default=None, help="its index, as `dlq list` shows it"
    )
    show.add_argument("--id", default=None, metavar="ID", help="or its id, as `dlq list` shows it")
    show.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="N",
        help="the shard whose list holds it (0 for an index; all for an id)",
    )
    show.add_argument(
        "--bytes",
        type=int,
        default=SHOW_BYTES,
        metavar="N",
        help=f"show at most this many bytes of the payload ({SHOW_BYTES}; 0 = all)",
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
    picks(again, "replay")
    again.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    again.set_defaults(handler=cmd_dlq_replay)

    purge = actions.add_parser("purge", help="delete dead letters for good")
    filters(purge)
    picks(purge, "purge")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(handler=cmd_dlq_purge)


# -- list and show ------------------------------------------------------------------


def letter_data(
    letter: StoredDeadLetter, preview: int | None = None, payload: bool = True
) -> dict[str, Any]:
    header = letter.header
    data = {
        "shard": letter.shard,
        "index": letter.index,
        "id": letter.id,
        "reason": letter.reason,
        "source": header.source if header else "",
        "field": header.field if header else "",
        "at_ms": header.at if header else None,
        "at": when(header.at) if header else None,
        "claim": header.claim if header else "",
        "error": header.error if header else "",
        "payload_bytes": len(letter.payload),
    }
    if payload:
        data["payload"] = safe_text(letter.payload, preview)
    return data


def when(ms: int) -> str | None:
    """The ISO time of a header's `at`; None when no date can hold it."""
    try:
        return iso(ms)
    except (OverflowError, OSError, ValueError):
        return None


def plain(text: str) -> Text:
    """Text that rich prints as it is: content is never read as markup (`[/x]` would raise)."""
    return Text(text)


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
        console.print(f"No dead letters ({scope(args)}).", markup=False)
        return 0
    now = runtime.buffer().clock.now_ms()
    table = Table(title=f"Dead letters ({scope(args)})")
    for column in ("shard", "index"):
        table.add_column(column, justify="right")
    table.add_column("id", no_wrap=True)
    # The reason and the time are short words a reader scans for: never broken mid-word
    # (at 80 columns the error and payload columns give way instead).
    table.add_column("reason", no_wrap=True)
    table.add_column("field", overflow="fold")
    table.add_column("when", no_wrap=True)
    for column in ("error", "payload"):
        table.add_column(column, overflow="fold", ratio=1)
    for letter in shown:
        header = letter.header
        table.add_row(
            str(letter.shard),
            str(letter.index),
            letter.id,
            plain(safe_text(letter.reason.encode(), 30)),
            plain(safe_text(header.field.encode(), 30) if header else ""),
            ago(header.at, now) if header else "?",
            plain(safe_text(header.error.encode(), 60) if header else ""),
            plain(safe_text(letter.payload, 60)),
        )
    console.print(table)
    more = f"; showing the first {len(shown):,} (--limit)" if len(shown) < len(letters) else ""
    console.print(f"{len(letters):,} dead letters: {by_reasons(counts)}{more}.", markup=False)
    return 0


def cmd_dlq_show(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    if args.bytes < 0:
        raise CliError("--bytes must be 0 (all) or more", 2)
    if (args.index is None) == (args.id is None):
        raise CliError("give the dead letter's index or its --id (one of them)", 2)
    if args.id is not None:
        [letter] = letters_of_ids(args, settings, [args.id])
    else:
        shard_no = 0 if args.shard is None else check_shard(args, settings)
        letter = letter_at(shard_no, args.index)
    data = letter_data(letter, payload=False)
    width = max(len(key) for key in data)
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key == "at" and letter.header:
            text += f" ({ago(letter.header.at, runtime.buffer().clock.now_ms())})"
        # Header values come from events (ids, errors quoting input): shown escaped.
        console.print(f"{key:<{width}}  {safe_text(text.encode())}", markup=False)
    size = len(letter.payload)
    shown = letter.payload if args.bytes == 0 else letter.payload[: args.bytes]
    cut = f"; the first {len(shown):,} shown (--bytes)" if len(shown) < size else ""
    kind = payload_kind(letter.payload)
    console.print(f"payload ({size:,} bytes, {kind}{cut}):", markup=False, highlight=False)
    # One line however long (the terminal wraps it): copied, it is the payload as it was.
    text = safe_text(shown) + ("…" if cut else "")
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    return 0


def payload_kind(payload: bytes) -> str:
    """What a payload is, in a few words: decoding it is bounded, and never raises."""
    if len(payload) > DECODE_MAX_BYTES:
        return f"not decoded: over {DECODE_MAX_BYTES:,} bytes"
    try:
        msgspec.json.decode(payload)
    except RecursionError:
        return "JSON nested too deeply to decode"
    except msgspec.ValidationError as exc:  # an integer out of range
        return f"JSON that cannot be decoded: {safe_text(str(exc).encode(), 80)}"
    except msgspec.DecodeError:
        return "not JSON"
    return "JSON"


# -- purge --------------------------------------------------------------------------


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    picks = picked(args, settings)
    letters = list(chosen(args, settings)) if picks is None else picks
    what = scope(args) if picks is None else which(picks)
    if not letters:
        console.print(f"No dead letters ({what}): nothing to purge.", markup=False)
        return 0
    count = len(letters)
    if not args.yes:
        console.print(
            f"{count:,} dead letters ({what}): {by_reasons(reason_counts(letters))}.",
            markup=False,
        )
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
    console.print(f"Purged {removed:,} dead letters ({what}){gone}.", markup=False)
    return 0
