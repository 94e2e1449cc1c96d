"""HTML report: renders results (DataFrames, arrays, metadata); knows nothing of tensors or models."""
