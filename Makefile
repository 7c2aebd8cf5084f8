# `make bench`: the benchmarks (never part of the tests). ARGS passes options, e.g.
#   make bench ARGS="--only apply,flush --rounds 3"
PYTHON ?= python3

.PHONY: bench bench-quick

bench:
	$(PYTHON) -m benchmarks $(ARGS)

bench-quick:
	$(PYTHON) -m benchmarks --quick $(ARGS)
