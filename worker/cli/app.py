"""The command line: the parser, dispatch to a command, one-line errors and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console

from worker import runtime
from worker.cli.common import ERROR_PREFIX, CliError, mask, one_line, version
from worker.cli.demo import cmd_demo
from worker.cli.dlq import add_dlq_parser
from worker.cli.flush_cmd import cmd_flush
from worker.cli.forget import add_forget_parser
from worker.cli.import_cmd import add_import_parser
from worker.cli.metrics_cmd import cmd_metrics
from worker.cli.migrate import add_migrate_arguments, cmd_migrate
from worker.cli.query import cmd_query
from worker.cli.run import cmd_run
from worker.cli.status import cmd_status
from worker.cli.watch import cmd_watch
from worker.errors import NotReplicatedError
from worker.lock import LockLostError
from worker.settings import Settings, SettingsError
from worker.sinks import SinkError


def _status(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    return (cmd_watch if args.watch else cmd_status)(args, settings, console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbuffer",
        description="Analytics events buffered in Redis, flushed into ClickHouse by Celery.",
    )
    parser.add_argument("--version", action="version", version=f"eventbuffer {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run Redis, ingest + flush workers and Beat locally",
        description=(
            "Run the whole stack in the foreground until Ctrl-C: Redis (the one at "
            "REDIS_URL if it answers, else a private redis-server on that address, data in "
            "./data/redis), the events table in ClickHouse (CLICKHOUSE_URL; embedded by "
            "default, data in ./data/clickhouse), two ingest workers, a flush worker and "
            "Celery Beat (logs in ./data/logs). One stack per directory and per Redis. "
            "Every setting is an environment variable: see the README's Configuration."
        ),
    )
    run.set_defaults(handler=cmd_run)

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the ClickHouse table (versioned migrations)"
    )
    migrate.add_argument(
        "--cluster",
        metavar="NAME",
        help="create it ON CLUSTER NAME: Replicated local tables and a Distributed table",
    )
    add_migrate_arguments(migrate)
    migrate.set_defaults(handler=cmd_migrate)

    flush = commands.add_parser("flush", help="drain the buffer into ClickHouse now")
    flush.set_defaults(handler=cmd_flush)

    status = commands.add_parser("status", help="show the buffer's state")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print one JSON object")
    shown.add_argument(
        "--watch", action="store_true", help="live view, refreshed every second (Ctrl-C stops)"
    )
    status.add_argument(
        "--interval", type=float, default=1.0, help="--watch: seconds between refreshes (1)"
    )
    status.add_argument(
        "--iterations", type=int, default=0, help="--watch: stop after N refreshes (0: never)"
    )
    status.set_defaults(handler=_status)

    metrics = commands.add_parser(
        "metrics", help="print the Prometheus metrics once (Redis gauges, worker counters)"
    )
    metrics.set_defaults(handler=cmd_metrics)

    query = commands.add_parser("query", help="run SQL against ClickHouse")
    query.add_argument("sql", help="the statement; - reads it from stdin")
    query.add_argument("--write", action="store_true", help="allow statements that change data")
    query.add_argument(
        "--format", choices=("table", "json", "tsv"), default="table", help="output format"
    )
    query.set_defaults(handler=cmd_query)

    demo = commands.add_parser("demo", help="send demo traffic and wait until it has landed")
    demo.add_argument("--sessions", type=int, default=50, help="sessions to simulate (50)")
    demo.add_argument("--seed", type=int, default=None, help="random seed for repeatable traffic")
    demo.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the events to land (60)"
    )
    demo.set_defaults(handler=cmd_demo)

    add_dlq_parser(commands)
    add_forget_parser(commands)
    add_import_parser(commands)
    return parser


def fail(message: str, code: int) -> int:
    print(f"{ERROR_PREFIX}{one_line(message)}", file=sys.stderr)
    return code


def quiet_library_logs() -> None:
    """The CLI reports failures as one line itself: libraries say only what is worse.

    Without a handler, Python prints warnings (clickhouse-driver's "Failed to
    connect", with its traceback) to stderr before the CLI's own line.
    """
    for name in ("clickhouse_driver", "worker"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    # No markup or emoji codes: project ids, paths and query results are shown verbatim.
    console = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)
    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        runtime.configure(settings)
        return int(args.handler(args, settings, console))
    except SettingsError as exc:
        return fail(f"bad setting: {exc}", 2)
    except CliError as exc:
        return fail(str(exc), exc.code)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        where = mask(runtime.settings().redis_url) if settings else "REDIS_URL"
        return fail(f"cannot reach Redis at {where}: {exc}", 1)
    except RedisError as exc:
        return fail(f"Redis error: {exc}", 1)
    except RedisClusterException as exc:  # not a RedisError: the cluster client's own
        where = mask(settings.redis_url) if settings else "REDIS_URL"
        return fail(f"Redis Cluster at {where}: {exc}", 1)
    except NotReplicatedError as exc:
        return fail(f"{exc}; try again once the master has its replicas", 1)
    except BrokerError as exc:
        where = mask(settings.effective_broker_url) if settings else "the broker"
        return fail(f"cannot reach the Celery broker at {where}: {exc}", 1)
    except SinkError as exc:
        where = f" (CLICKHOUSE_URL={mask(settings.clickhouse_url)})" if settings else ""
        return fail(f"{exc}{where}", 1)
    except LockLostError as exc:
        return fail(f"flush stopped: {exc}", 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except OSError as exc:  # e.g. a data directory that cannot be created
        return fail(str(exc), 1)
    finally:
        runtime.reset()
