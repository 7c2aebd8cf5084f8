"""`eventbuffer forget`: erase a person's events everywhere they are (worker/privacy).

`--project ID` and one of `--profile`, `--device` or `--session`. Without
`--yes` it asks on the terminal first, and refuses when there is none to ask
on. `--json` prints one object: what was removed where, and the tombstone's
expiry. Running it again completes a request that was interrupted.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from worker import runtime
from worker.cli.common import CliError, clickhouse, confirm, require_embedded_data
from worker.errors import LockHeldError
from worker.privacy.forget_request import forget
from worker.privacy.selector import KINDS, Selector
from worker.settings import Settings


def add_forget_parser(commands: Any) -> None:
    """Register `forget` on the top-level subparsers."""
    parser = commands.add_parser(
        "forget",
        help="erase a person's events: ClickHouse, buffer, dead letters, and later arrivals",
        description=(
            "Erase every event of a project's person created up to now: in ClickHouse, "
            "queued in the buffer, waiting as a last view, under an open claim, in dead "
            "letters; a tombstone drops the ones still on their way for "
            "EVENT_BUFFER_FORGET_TOMBSTONE_DAYS. Recorded in the eventbuffer_forget_audit "
            "table. Safe to run again."
        ),
    )
    parser.add_argument("--project", required=True, metavar="ID", help="the project id")
    person = parser.add_mutually_exclusive_group(required=True)
    for kind in KINDS:
        person.add_argument(f"--{kind}", metavar="ID", help=f"the person's {kind} id")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.set_defaults(handler=cmd_forget)


def cmd_forget(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    kind = next(k for k in KINDS if getattr(args, k) is not None)
    try:
        selector = Selector(args.project, kind, getattr(args, kind))
    except ValueError as exc:
        raise CliError(f"forget: {exc}", 2) from None
    if not args.yes:
        confirm(
            console,
            f"Erase every event of {kind} {selector.value!r} in project "
            f"{selector.project_id!r} created up to now? [y/N] ",
            "y",
            "erase a person's events",
        )
    redis = runtime.redis_client()
    say = (lambda _: None) if args.json else console.print
    require_embedded_data(settings)
    try:
        report = forget(redis, lambda: clickhouse(settings), settings, selector, say=say)
    except LockHeldError as exc:
        raise CliError(str(exc), 1) from None
    data = report.as_dict()
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return 0
    console.print(
        f"Forgot {kind} {selector.value!r} of project {selector.project_id!r} up to "
        f"{data['requested_at']}: {data['clickhouse_rows']} ClickHouse row(s), "
        f"{data['buffer_rows']} queued row(s), {data['claimed_rows']} under an open claim "
        f"(dropped by the flusher before its insert), {data['last_views']} last view(s), "
        f"{data['dead_letters']} dead letter(s), {data['visitors']} active visitor(s). "
        f"Its tombstone drops late events until {data['tombstone_expires_at']}."
    )
    return 0
