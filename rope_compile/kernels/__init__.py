"""Triton kernels of the fused ops beyond the first (one kernel and its launcher per file)."""
