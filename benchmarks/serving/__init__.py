"""The serving benchmark's parts; benchmarks/serve_bench.py is its entry point.

Data flows one way: `harness` starts servers and reads their processes, `load` drives
them, `in_process` and `profiling` measure the limit and the time's parts, `runs` puts
these together into the `results` of one run, and `report` renders only those results.
"""
