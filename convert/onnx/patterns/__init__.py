"""The BatchNorm fold pattern families on ONNX graphs, one module per family."""
