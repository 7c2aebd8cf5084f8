"""Fault-injection suite: real processes, real faults, exactly-once checked in ClickHouse.

See `tests/support/fault_stack.py` for the machinery and `tests/faults/conftest.py`
for the summary table printed at the end of a run.
"""
