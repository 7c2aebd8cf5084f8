"""Helpers the tests and the benchmarks share: servers, processes, polling, traffic."""
