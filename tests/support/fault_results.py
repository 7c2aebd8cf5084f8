"""The fault suite's results: one row per scenario, and the JSON report rewritten at once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ScenarioResult:
    """One row of the summary table (and of the JSON report)."""

    scenario: str
    sent: int
    landed: int
    missing: int
    duplicated: int
    recovery_s: float | None
    wrong_durations: int = 0
    unexpected: int = 0
    faults: str = ""
    asserted: str = "missing=0 dup=0"
    note: str = ""


RESULTS: list[ScenarioResult] = []


REPORT: dict[str, Path | None] = {"path": None}


def record(result: ScenarioResult) -> ScenarioResult:
    """Keep a scenario's row for the summary, and rewrite the JSON report at once."""
    RESULTS.append(result)
    path = REPORT["path"]
    if path is not None:
        path.write_text(json.dumps([asdict(r) for r in RESULTS], indent=2))
    return result
