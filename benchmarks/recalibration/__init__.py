"""The recalibration benchmark's parts; benchmarks/recalibration_bench.py is its entry point.

Data flows one way: `shifts` builds the shifted digits (held-out images for accuracy,
training images, unlabeled, for recalibration); `packages` builds the benchmark's
repository and drives `bnfold recalibrate` through its command line only (`--json`);
`torch_reference` computes the anchor (torch.optim.swa_utils.update_bn) and torch
references of bnfold's two methods; `runs` puts these together into accuracy rows and
ResNet-18 timings; `drift` starts `bnfold serve` and reads the drift endpoint before
and after a roll-forward; `results` holds what one run measured, and `report` renders
only those results (the BENCHMARKS.md section and the plot).
"""
