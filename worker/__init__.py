"""eventbuffer: analytics events buffered in Redis, written to ClickHouse in safe batches.

`app` is the Celery application, so `celery -A worker worker` and
`celery -A worker beat` work. Importing it reads no environment: Celery
configures it from the settings on first use.
"""

from worker.celery_app import app

__all__ = ["app"]
