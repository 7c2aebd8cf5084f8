"""Which dead letters a `dlq` command acts on, and those picks in words.

`--shard` and `--reason` choose many (`chosen`); `--index` and `--id` pick
single letters (`picked`): an index is a position in its shard's list, an id
a digest of the letter's bytes, which does not shift as entries before it go.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from worker import runtime
from worker.cli.common import CliError
from worker.deadletters import StoredDeadLetter, iter_dead_letters, read_dead_letter, safe_text
from worker.settings import Settings

# Replays and purges from this many entries up get a progress bar.
PROGRESS_MIN_ENTRIES = 500


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


def which(letters: list[StoredDeadLetter]) -> str:
    """Dead letters picked by --index/--id, in words, for prompts and reports."""
    named = ", ".join(f"shard {letter.shard} #{letter.index} {letter.id}" for letter in letters[:3])
    return named + (f" and {len(letters) - 3:,} more" if len(letters) > 3 else "")


def by_reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{safe_text(r.encode(), 30)} {n:,}" for r, n in counts.items())
