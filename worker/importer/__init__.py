"""`eventbuffer import`: history from exports, straight into ClickHouse, exactly once.

Modules: `options` (what an import is asked), `readers/` (one per export
format), `sources` (plain or gzip files), `rows` (the one use of the event
model), `import_state` (the resumable state on disk), `reading` (the first pass),
`sessions` (sessions derived by a 30-minute gap), `durations` (the durations
pass), `writer` (a chunk's check and token), `inserting` (the last pass),
`isolation` (that pass in child processes, for embedded ClickHouse),
`runner` (the three passes, the summary).
"""

from worker.importer.runner import ImportError_, ImportOptions, ImportSummary, run_import

__all__ = ["ImportError_", "ImportOptions", "ImportSummary", "run_import"]
