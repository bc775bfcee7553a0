"""The ONNX path of the converter: torch-free, from an .onnx file to a package."""
