# The eventbuffer image: the Celery worker, Beat and the `eventbuffer` CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md beat_schedule.py ./
COPY worker ./worker
COPY tasks ./tasks
COPY lua_scripts ./lua_scripts
RUN pip install --no-cache-dir . && useradd --system --home /app eventbuffer

USER eventbuffer
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
