"""eventbuffer: analytics events buffered in Redis, written to ClickHouse in safe batches.

`app` is the Celery application, so `celery -A worker worker` and
`celery -A worker beat` work.
"""

from worker.celery_app import app

__all__ = ["app"]
