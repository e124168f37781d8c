"""Benchmarks for fastpipe's data path and training step, run as `python -m benchmarks SUBCOMMAND`.

Subcommands: loaders, autotune, compare, train-step, convert. Each writes a report folder
(JSON, CSV, Markdown, plots) with a `machine` block; `make bench` runs the pytest-benchmark suite.
"""
