"""The peer benchmark's parts; benchmarks/peers_bench.py is its entry point.

bnfold against the servers a user would pick instead (MLServer, KServe's ModelServer,
PyTriton), each installed in a virtualenv of its own outside the repository
(`environments`), serving the same model.onnx files through an adapter in `adapters/`
(run by that virtualenv's interpreter, never imported here). `servers` says how each is
started and reads its process tree, `checks` proves each answers right before any load,
`runs` drives the interleaved load with the serving benchmark's own generators
(benchmarks/serving/load.py), and `report` renders only the saved `results`.
"""
