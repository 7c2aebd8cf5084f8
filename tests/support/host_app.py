"""A producer app that uses eventbuffer only as a library, as a host application would.

Its own Celery app, broker (`HOST_BROKER_URL`) and task; it imports the
producer client at module level. Run as `celery -A tests.support.host_app worker`.
"""

from __future__ import annotations

import os

from celery import Celery

from worker.producer import EventProducer

app = Celery("host", broker=os.environ["HOST_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], result_backend=None)


@app.task(name="host.track")
def track(project_id: str, created_at: int) -> str:
    """Send one event through eventbuffer's producer, with this app's broker."""
    with EventProducer(app) as producer:
        return producer.send({"project_id": project_id, "name": "signup", "created_at": created_at})
