"""The benchmark harness: `python -m bench` (or `make bench`, `make bench-short`).

It runs against a stack's real services (its own database `swarm_bench`), the app as real
uvicorn processes and the device simulator as a separate process, prints a table and writes JSON
to bench-results/. `docs/performance.md` explains every figure.
"""
