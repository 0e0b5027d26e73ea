"""Sprox benchmarks (see bench/README.md). A package so `python -m bench.upstream` works
and so pytest puts the repository root on sys.path, making `tests.servers` importable."""
