"""bnfold: fold BatchNorm exactly into neighbouring layers, export ONNX, serve it (KServe V2).

The root package holds what the converter and the service share: the package
format (`bnfold.package_format`) and the `bnfold` command (`bnfold.cli`). It
imports neither torch nor a web framework. The halves live in `bnfold.convert`,
`bnfold.service` and `bnfold.models` (folders convert/, service/, models/).
"""
