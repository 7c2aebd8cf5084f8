"""eventbuffer: analytics events buffered in Redis, written to ClickHouse in safe batches.

Importing this package has no side effects: the Celery application lives
in `worker.celery` (where `celery -A worker worker` and `celery -A worker
beat` find it), and only code that needs it imports it. A producer app can
import `worker.producer` without creating or configuring eventbuffer's app.
"""
