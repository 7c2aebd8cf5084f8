"""`eventbuffer metrics`: one scrape, printed in the Prometheus text format.

The buffer's gauges are read from Redis now (as a worker's endpoint does).
Counters and histograms live in the workers' processes: they are included
when `PROMETHEUS_MULTIPROC_DIR` names the directory the workers count in.
The output suits node_exporter's textfile collector or a quick look.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prometheus_client import generate_latest
from rich.console import Console

from worker import metrics, runtime
from worker.cli.common import mask
from worker.settings import Settings

#: Where `eventbuffer run` has its workers count (run from the directory holding data/).
RUN_METRICS_DIR = Path("data") / "metrics"


def cmd_metrics(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    path = metrics.multiprocess_dir()
    if path is None and RUN_METRICS_DIR.is_dir():
        # The stack of this directory: its workers' counters, as its endpoint serves them.
        path = str(RUN_METRICS_DIR.resolve())
        os.environ[metrics.MULTIPROC_ENV] = path
    if path is not None and not os.path.isdir(path):
        print(
            f"eventbuffer: warning: {metrics.MULTIPROC_ENV}={path} is not a directory: "
            "worker counters are not included",
            file=sys.stderr,
        )
    collector = metrics.RedisCollector(settings, runtime.redis_client)
    registry = metrics.build_registry(settings, this_process=False, collector=collector)
    sys.stdout.write(generate_latest(registry).decode())
    sys.stdout.flush()
    if not collector.up:
        print(
            f"eventbuffer: error: cannot reach Redis at {mask(settings.redis_url)}",
            file=sys.stderr,
        )
        return 1
    return 0
