"""Run the benchmarks, print the table, write the JSON.

    python -m benchmarks [--only apply,standard,ingest,transport,flush,e2e,reorder,memory,outage,
        forget,import,scale]
        [--rounds N] [--quick] [--outage-s S] [--outage-rate R] [--outage-redis full,unlimited]
    python benchmarks/run.py ...
    make bench

Speed is measured as ratios within one run: eventbuffer's path and its
baseline alternate on the same data, several rounds, and medians are
compared. PASS/MISS is printed next to each target; nothing asserts on
timing, and the exit status is non-zero only when a benchmark crashed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.support import (
    PROCESSES,
    Result,
    install_signal_handlers,
    log,
    print_table,
    skipped,
    write_json,
)

BENCHMARKS = (
    "apply", "standard", "ingest", "transport", "flush", "e2e", "reorder", "memory", "outage",
    "forget",
    "import",
    "scale",
)  # fmt: skip
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per benchmark (default 5, quick 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer events and rounds, 10 s end to end"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="end-to-end seconds (default 60, quick 10)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help=(
            "end-to-end offered events/s (default: 50%% of the pipeline's capacity "
            "from this run's ingest and flush figures, else 10000)"
        ),
    )
    parser.add_argument(
        "--e2e-fraction",
        type=float,
        default=None,
        help=(
            "end-to-end offered rate as a fraction of the standard interface's rate measured "
            "in the same run (the standard benchmark's, else measured first); --rate wins"
        ),
    )
    parser.add_argument(
        "--e2e-flush-workers",
        type=int,
        default=1,
        help="end-to-end solo flush workers on the server run, one shard each (default 1)",
    )
    parser.add_argument(
        "--producer-batch-ms",
        type=int,
        default=None,
        help="end-to-end producer timer, ms (default: EVENT_BUFFER_MICRO_BATCH_MS's default, 10)",
    )
    parser.add_argument(
        "--e2e-backends",
        default="chdb,server",
        help="end-to-end ClickHouse: chdb (embedded), server (ClickHouse 26.x), or both (default)",
    )
    parser.add_argument(
        "--e2e-reorder-window",
        type=int,
        default=None,
        help="end-to-end EVENT_BUFFER_REORDER_WINDOW_MS, ms (default: the setting's default)",
    )
    parser.add_argument(
        "--outage-s",
        type=float,
        default=None,
        help="outage: seconds ClickHouse is down (default 60, quick 20)",
    )
    parser.add_argument(
        "--outage-rate",
        type=float,
        default=1000.0,
        help="outage: events/s the producer offers throughout (default 1000)",
    )
    parser.add_argument(
        "--outage-redis",
        default="full,unlimited",
        help=(
            "outage: full (maxmemory reached half-way through the outage), unlimited "
            "(no maxmemory: the backlog all in the buffer), or both (default)"
        ),
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})"
    )
    return parser


def configure(args: argparse.Namespace) -> None:
    """Fill in the sizes that depend on --quick."""
    quick = args.quick
    if args.rounds is None:
        args.rounds = 3 if quick else 5
    if args.duration is None:
        args.duration = 10.0 if quick else 60.0
    args.apply_events = 10_000 if quick else 20_000
    args.ingest_events = 20_000 if quick else 40_000
    args.standard_events = 30_000 if quick else 100_000
    args.flush_rows = 20_000 if quick else 100_000
    if args.outage_s is None:
        args.outage_s = 20.0 if quick else 60.0
    # Rates measured alone in this run (producer, ingest, flush), set by those
    # benchmarks; e2e offers half of the pipeline they make (bench_e2e.capacity).
    args.stage_rates = {}


def runners() -> dict[str, Callable[[argparse.Namespace], list[Result]]]:
    from benchmarks import (
        bench_apply,
        bench_e2e,
        bench_flush,
        bench_forget,
        bench_import,
        bench_ingest,
        bench_memory,
        bench_outage,
        bench_reorder,
        bench_scale,
        bench_standard,
        bench_transport,
    )

    return {
        "apply": bench_apply.run,
        "standard": bench_standard.run,
        "ingest": bench_ingest.run,
        "transport": bench_transport.run,
        "flush": bench_flush.run,
        "e2e": bench_e2e.run,
        "reorder": bench_reorder.run,
        "memory": bench_memory.run,
        "outage": bench_outage.run,
        "forget": bench_forget.run,
        "import": bench_import.run,
        "scale": bench_scale.run,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        return 2
    configure(args)
    install_signal_handlers()
    table = runners()
    results: list[Result] = []
    crashed = False
    started = time.monotonic()
    try:
        for name in BENCHMARKS:
            if name not in selected:
                continue
            log(f"== {name} ==")
            try:
                results.extend(table[name](args))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken benchmark must not hide the others
                crashed = True
                traceback.print_exc()
                last = (str(exc).strip().splitlines() or [""])[-1]
                results.append(skipped(name, f"crashed: {type(exc).__name__}: {last}"))
            finally:
                PROCESSES.stop_all()
    except KeyboardInterrupt:
        log("interrupted: stopping every process this run started")
        PROCESSES.stop_all()
        return 130
    finally:
        PROCESSES.stop_all()
    print_table(results)
    saved = {k: v for k, v in vars(args).items() if k != "json"}
    write_json(args.json, results, saved)
    log(f"figures written to {args.json}; total {time.monotonic() - started:.0f} s")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
