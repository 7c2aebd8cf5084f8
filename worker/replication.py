"""Waiting for replicas: what makes a buffer write survive a failover.

Redis replicates asynchronously: a master that dies after a write but
before its replica copied it takes the write with it, and the replica that
is promoted never saw it. `WAIT numreplicas timeout` blocks until that many
replicas acknowledged every write the same connection made before it, so
each write that must survive is followed, on its own connection, by a WAIT
for `EVENT_BUFFER_MIN_REPLICAS` (1 by default on a cluster, 0 otherwise: no
WAIT is sent). Fewer confirmations within `EVENT_BUFFER_REPLICA_TIMEOUT_MS`
raise `NotReplicatedError`.

Which writes wait, and why (worker/apply.py, worker/flusher.py):

- **The apply of a batch.** Its ingest task must not succeed before the
  batch is on a replica: the task is retried instead (transient), and its
  batch markers skip the batch on the retry, which WAITs again after
  refreshing the markers (a write of its own: WAIT counts the writes of its
  connection, and a retry's fresh connection has made none).
- **A claim, before its rows go to ClickHouse.** Rows inserted under a claim
  the promoted replica never saw would be claimed again there under a new
  id, with new dedup tokens: inserted twice. A re-driven claim is written
  too (claim.lua counts the re-drive) so the WAIT covers it.
- **A chunk's halving**, recorded in the claim before its halves are written.
- **The ack.** Losing it is safe: the promoted replica hands the claim out
  again and the re-drive's chunks carry the same tokens, which ClickHouse
  drops (events:saved and the flush stats may then count the claim twice).
  Its WAIT is for the truth of what is reported: an ack not yet on a
  replica stops the shard's flush with `NotReplicatedError` (logged and
  counted as a flush error), and the shard's next claim waits for replicas
  like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.errors import NotReplicatedError
from worker.replies import number
from worker.settings import Settings
from worker.topology import Client, Node, on_node


@dataclass(frozen=True)
class Replicas:
    """How many replicas must confirm a write, and how long a WAIT for them may block."""

    wanted: int = 0
    timeout_ms: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> Replicas:
        return cls(settings.effective_min_replicas, settings.replica_timeout_ms)

    @property
    def waits(self) -> bool:
        return self.wanted > 0

    def wait_command(self) -> tuple[Any, ...]:
        return ("WAIT", self.wanted, self.timeout_ms)

    def check(self, confirmed: object, what: str, node: str) -> None:
        """Raise NotReplicatedError unless WAIT's reply counts enough replicas."""
        count = number(confirmed)
        if count < self.wanted:
            raise NotReplicatedError(what, node=node, wanted=self.wanted, confirmed=count)

    def run(
        self,
        client: Client,
        key: str,
        call: Callable[[Any], Any],
        what: str,
        wrote: Callable[[Any], bool] = lambda reply: True,
    ) -> Any:
        """The reply of `call(target)`, which sends one command (or script) to `target`.

        Without replicas wanted, `target` is the client itself. Otherwise it
        is a pipeline on one connection of the master serving `key`, and a
        WAIT follows the command on that connection: NotReplicatedError when
        too few replicas confirmed (the command has run on the master all
        the same), unless `wrote(reply)` says the command wrote nothing.
        """
        if not self.waits:
            return call(client)

        def on(node: Node) -> Any:
            with node.redis.pipeline(transaction=False) as pipe:
                call(pipe)
                pipe.execute_command(*self.wait_command())  # type: ignore[no-untyped-call]
                reply, confirmed = pipe.execute()
            if wrote(reply):
                self.check(confirmed, what, node.name)
            return reply

        return on_node(client, key, on)
