# The eventbuffer image: the Celery worker, Beat and the `eventbuffer` CLI.
# Reproducible: an exact base tag, and every Python package at the version in
# constraints.txt (regenerate it with `make constraints` after changing the
# dependencies in pyproject.toml).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md beat_schedule.py constraints.txt ./
COPY worker ./worker
COPY tasks ./tasks
COPY lua_scripts ./lua_scripts
# The code stays root's (read-only to the app); /app and its data/ directory
# (embedded ClickHouse, the CLI's state) belong to the user that runs it.
RUN pip install --no-cache-dir --constraint constraints.txt . \
    && pip check \
    && rm -rf build ./*.egg-info \
    && useradd --system --home-dir /app --shell /usr/sbin/nologin eventbuffer \
    && install -d -o eventbuffer -g eventbuffer /app/data \
    && chown eventbuffer:eventbuffer /app

USER eventbuffer
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
