"""The reliable Redis transport: a task stays in Redis from publish until its ack.

- `transport.py`: kombu's Redis transport with reliable fetch (consumer side only).
- `broker_consumer.py`: a consumer's in-flight messages, its heartbeat, recovery of dead
  consumers (`BrokerConsumer`).
- `broker_scripts.py`: the typed wrappers of `lua_scripts/broker_*.lua`.
- `broker_keys.py`: the transport's keys in the broker Redis.
- `selection.py`: eventbuffer's workers consume with it (EVENT_BUFFER_BROKER_TRANSPORT).
- `holdings.py`: what live and dead consumers hold, and the parked messages
  (`eventbuffer status`, `--watch`, the metrics).
"""
