"""The benchmark suite still imports and parses: it is run by hand, so nothing else notices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.run import BENCHMARKS, build_parser, configure, runners

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_imports_and_is_registered() -> None:
    table = runners()
    assert list(table) == list(BENCHMARKS)
    assert all(callable(run) for run in table.values())


def test_quick_options_are_configured() -> None:
    args = build_parser().parse_args(["--quick"])
    configure(args)
    assert args.quick and args.rounds == 3
    assert args.stage_rates == {}


def test_an_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown benchmark(s): nonsense" in done.stdout
