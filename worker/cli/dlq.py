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
from rich.text import Text

from worker import runtime
from worker.cli.common import CliError, progress_bar
from worker.cli.status import ago, iso
from worker.deadletters import (
    REASONS,
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


# -- selection ----------------------------------------------------------------------


def chosen(args: argparse.Namespace, settings: Settings) -> Iterator[StoredDeadLetter]:
    """The dead letters `--shard` and `--reason` pick, shard by shard, oldest first."""
    redis = runtime.redis_client()
    keyspace = runtime.buffer().keyspace
    shards = keyspace.all() if args.shard is None else [keyspace.shard(check_shard(args, settings))]
    for shard in shards:
        yield from iter_dead_letters(redis, shard, args.reason)


def picked(args: argparse.Namespace, settings: Settings) -> list[StoredDeadLetter] | None:
    """The dead letters `--index` and `--id` pick, or None when neither is given.

    CliError when one of them names no dead letter (or an id names letters
    of several shards: then `--shard` picks one), or `--reason` is given too.
    """
    indexes, ids = args.index or [], args.id or []
    if not indexes and not ids:
        return None
    if args.reason is not None:
        raise CliError("--reason picks many dead letters: give it without --index/--id", 2)
    letters: dict[tuple[int, int], StoredDeadLetter] = {}
    if indexes:
        shard_no = index_shard(args, settings, "--index")
        for index in indexes:
            letter = letter_at(shard_no, index)
            letters[letter.shard, letter.index] = letter
    for letter in letters_of_ids(args, settings, ids):
        letters[letter.shard, letter.index] = letter
    return sorted(letters.values(), key=lambda letter: (letter.shard, letter.index))


def index_shard(args: argparse.Namespace, settings: Settings, option: str) -> int:
    """The shard an index refers to: `--shard`, or 0 when it is the only one."""
    if args.shard is not None:
        return check_shard(args, settings)
    if settings.shards > 1:
        raise CliError(
            f"{option} needs --shard: indexes are per shard "
            f"(EVENT_BUFFER_SHARDS={settings.shards})",
            2,
        )
    return 0


def letter_at(shard_no: int, index: int) -> StoredDeadLetter:
    if index < 0:
        raise CliError("the index must be 0 or more, as `eventbuffer dlq list` shows it", 2)
    shard = runtime.buffer().keyspace.shard(shard_no)
    letter = read_dead_letter(runtime.redis_client(), shard, index)
    if letter is None:
        total = int(runtime.redis_client().llen(shard.dead))
        raise CliError(f"no dead letter at index {index} of shard {shard_no} (it has {total})")
    return letter


def letters_of_ids(
    args: argparse.Namespace, settings: Settings, ids: list[str]
) -> list[StoredDeadLetter]:
    """The one dead letter of each id (in `--shard`, or in any shard), read in one pass."""
    wanted = {text.strip().lower(): text for text in ids}
    redis = runtime.redis_client()
    keyspace = runtime.buffer().keyspace
    shards = keyspace.all() if args.shard is None else [keyspace.shard(check_shard(args, settings))]
    found: dict[str, list[StoredDeadLetter]] = {key: [] for key in wanted}
    for shard in shards:
        for letter in iter_dead_letters(redis, shard):
            if letter.id in found:
                found[letter.id].append(letter)
    where = "any shard" if args.shard is None else f"shard {args.shard}"
    for key, matches in found.items():
        shown = safe_text(wanted[key].encode(), 40)
        if not matches:
            raise CliError(f"no dead letter of id {shown} in {where}")
        if len(matches) > 1:
            shards_text = ", ".join(str(letter.shard) for letter in matches)
            raise CliError(
                f"id {shown} names dead letters of shards {shards_text}: give --shard", 2
            )
    return [letter for matches in found.values() for letter in matches]


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


def which(letters: list[StoredDeadLetter]) -> str:
    """Dead letters picked by --index/--id, in words, for prompts and reports."""
    named = ", ".join(f"shard {letter.shard} #{letter.index} {letter.id}" for letter in letters[:3])
    return named + (f" and {len(letters) - 3:,} more" if len(letters) > 3 else "")


def by_reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{safe_text(r.encode(), 30)} {n:,}" for r, n in counts.items())


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
