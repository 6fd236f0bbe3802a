"""Benchmarks for gateway-extproc: overhead, streaming, routing cost, routing quality and
Kubernetes scale. Never part of `make test`.

`make bench` (= `.venv/bin/python -m bench`) runs all of them and rewrites
docs/BENCHMARKS.md; `python -m bench NAME...` runs a subset and replaces only those
sections; `--quick` is a short smoke run whose figures are marked as such. Every load loop
is bounded in count and in time and talks to loopback only.
"""
