"""Fault-injection suite: real processes, real faults, exactly-once checked in ClickHouse.

See `tests/faults/harness.py` for the machinery and `tests/faults/conftest.py`
for the summary table printed at the end of a run.
"""
