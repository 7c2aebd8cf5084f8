"""Acknowledgements of the reliable transport (worker/broker/transport.py), by delivery tag.

kombu settles a message by its delivery tag; the transport's consumer
(worker/broker/broker_consumer.py) settles it by the seq of the fetch that
took it. `QoS` keeps, for each tag delivered, that seq and the list it came
from, so an ack deletes the message's key, a reject with requeue puts it back
behind its queue, and a channel closing (or the process exiting) gives back
everything it still holds.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import OutOfMemoryError

log = logging.getLogger("worker.broker")


class QoS(kombu_redis.QoS):
    """Acks by delivery tag: each tag maps to the seq (and source) of the fetch that took it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: dict[str, list[tuple[int, str]]] = {}

    def expect(self, delivery_tag: str, seq: int, source: str) -> None:
        """The message about to be delivered with this tag is the consumer's `seq`."""
        self._held.setdefault(delivery_tag, []).append((seq, source))

    def _take(self, delivery_tag: str) -> tuple[int, str] | None:
        held = self._held.get(delivery_tag)
        if not held:
            return None
        taken = held.pop(0)  # a tag delivered twice (a redelivered copy) is held twice
        if not held:
            self._held.pop(delivery_tag, None)
        return taken

    def append(self, message: Any, delivery_tag: str) -> None:
        # In memory only: broker_fetch.lua has the message in the consumer's keeping already.
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        taken = self._take(delivery_tag)
        if taken is not None:
            self.channel.reliable.ack(taken[0])
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        taken = self._take(delivery_tag)
        if taken is not None:
            seq, source = taken
            if requeue:  # behind what is queued, as stock kombu does
                self.channel.reliable.requeue(seq, source, front=False)
            else:
                self.channel.reliable.ack(seq)
        virtual.QoS.ack(self, delivery_tag)

    def forget(self, delivery_tag: str, seq: int) -> None:
        """Drop what is known of message `seq` (parked instead of settled through kombu)."""
        held = self._held.get(delivery_tag)
        if held is None:
            return
        held[:] = [entry for entry in held if entry[0] != seq]
        if not held:
            self._held.pop(delivery_tag, None)
            if delivery_tag in self._delivered:
                virtual.QoS.ack(self, delivery_tag)  # out of the prefetch count

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """kombu's sweep of messages a stock worker left unacknowledged; skipped while the
        broker is full (its mutex is a SET NX, refused then), not fatal at start-up."""
        try:
            super().restore_visible(*args, **kwargs)
        except OutOfMemoryError:
            log.debug("broker full: kombu's unacked sweep skipped")

    def restore_unacked(self, client: Any = None) -> None:
        self._flush()
        self.channel.reliable.restore_all(deregister=False)
        self._held.clear()
        self._delivered.clear()

    def restore_unacked_once(self, stderr: Any = None) -> None:
        """At channel close (or exit): give back everything the consumer still holds."""
        self._on_collect.cancel()
        self._flush()
        state = self._delivered
        if getattr(state, "restored", False):
            return
        try:
            self.channel.close_consumer(
                restore=self.restore_at_shutdown and self.channel.do_restore
            )
        finally:
            state.clear()
            self._held.clear()
            state.restored = True  # type: ignore[attr-defined]
