"""Scale and block layouts of other libraries and of cuBLAS/CUTLASS (placeholder)."""
