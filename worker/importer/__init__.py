"""`eventbuffer import`: history from exports, straight into ClickHouse, exactly once.

Modules: `readers/` (one per export format), `sources` (plain or gzip
files), `rows` (the one use of the event model), `state` (the resumable
state on disk), `sessions` (sessions derived by a 30-minute gap),
`durations` (the durations pass), `writer` (a chunk into ClickHouse once),
`runner` (the three passes).
"""

from worker.importer.runner import ImportError_, ImportOptions, ImportSummary, run_import

__all__ = ["ImportError_", "ImportOptions", "ImportSummary", "run_import"]
