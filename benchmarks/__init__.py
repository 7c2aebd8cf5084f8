"""eventbuffer's benchmarks: `make bench`, `python -m benchmarks` or `python benchmarks/run.py`.

Not part of the test suite: pytest only collects `tests/` (pyproject's
testpaths), and no file here is named like a test module.
"""
