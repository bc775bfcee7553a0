"""The PyTorch path of the converter: torch.fx tracing, folding, export."""
