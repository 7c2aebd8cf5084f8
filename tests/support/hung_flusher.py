"""A flusher process whose INSERT the test catches in the act, to freeze ClickHouse under it.

    python tests/support/hung_flusher.py REDIS_URL CLICKHOUSE_URL BATCH CHUNK
        --lock-ttl S --connect-timeout S --insert-timeout S --stall S
        [--sink-insert-timeout S] [--gate-write N]

Runs one `process_buffer` of the production `Flusher` with those settings,
writing through a real `NativeSink`. In its N-th write (1-based), once the
server has started the INSERT (clickhouse-driver sent the query and received
the table's sample block) and before the rows are sent, it prints
{"inserting": token} and waits for a line on stdin: the test freezes the
ClickHouse server (SIGSTOP) meanwhile, so the server is frozen in the middle
of the INSERT, and the rows go into it.

`--sink-insert-timeout` gives the sink another insert timeout than the
settings do (a long one: an INSERT whose timeout does not fire, as inside
embedded chDB, where a call cannot be abandoned), so that only the lock's
stall bound can free the shard.

stdout gets {"write": token} after each write that returned, then one
{"flush": FlushResult} per shard; exit status 3 when a shard's flush stopped on
a lost lock, 2 when it failed otherwise (a ClickHouse error), else 0.
Logging goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis as redis_lib

from tests.support.sinks import DelegatingSink
from worker.errors import LockLostError
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks.native import NativeSink

EXIT_FAILED = 2
EXIT_LOCK_LOST = 3


def emit(**item: Any) -> None:
    print(json.dumps(item), flush=True)


class GatedSink(DelegatingSink):
    """A real NativeSink whose `gate`-th write announces itself between the INSERT's
    query and its rows, and waits for the test there."""

    inner: NativeSink

    def __init__(self, inner: NativeSink, gate: int) -> None:
        super().__init__(inner)
        self.gate = gate
        self.writes = 0

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.writes += 1
        if self.writes == self.gate:
            self._gate_rows(token)
        self.inner.write(rows, token)
        emit(write=token)

    def _gate_rows(self, token: str) -> None:
        # The client exists from the first write on (the gate is a later one); its
        # send_data sends the rows of an INSERT whose query the server has started.
        client = self.inner._client
        assert client is not None, "the gated write must not be the first"
        send_data = client.send_data

        def gated(*args: Any, **kwargs: Any) -> Any:
            client.send_data = send_data
            emit(inserting=token)
            sys.stdin.readline()
            return send_data(*args, **kwargs)

        client.send_data = gated


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("clickhouse_url")
    parser.add_argument("batch", type=int)
    parser.add_argument("chunk", type=int)
    parser.add_argument("--lock-ttl", type=int, required=True)
    parser.add_argument("--connect-timeout", type=int, required=True)
    parser.add_argument("--insert-timeout", type=int, required=True)
    parser.add_argument("--stall", type=int, required=True)
    parser.add_argument("--sink-insert-timeout", type=float)
    parser.add_argument("--gate-write", type=int, default=0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    settings = Settings.from_env(
        {
            "REDIS_URL": args.redis_url,
            "CLICKHOUSE_URL": args.clickhouse_url,
            "EVENT_BUFFER_BATCH_SIZE": str(args.batch),
            "EVENT_BUFFER_CHUNK_SIZE": str(args.chunk),
            "EVENT_BUFFER_LOCK_TTL_S": str(args.lock_ttl),
            "EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S": str(args.connect_timeout),
            "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S": str(args.insert_timeout),
            "EVENT_BUFFER_FLUSH_STALL_S": str(args.stall),
        }
    )
    insert_timeout = args.sink_insert_timeout or settings.clickhouse_insert_timeout_s

    def sink() -> GatedSink:
        native = NativeSink(
            settings.clickhouse_url,
            settings.clickhouse_table,
            connect_timeout_s=settings.clickhouse_connect_timeout_s,
            insert_timeout_s=insert_timeout,
        )
        return GatedSink(native, args.gate_write)

    client = redis_lib.Redis.from_url(settings.redis_url)
    code = 0
    for result in Flusher(client, settings, sink).process_buffer().shards:
        emit(flush=result.as_dict())
        if isinstance(result.error, LockLostError):
            code = EXIT_LOCK_LOST
        elif result.error is not None:
            code = code or EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
