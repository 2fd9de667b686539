"""Placeholder; the Triton kernels are being written."""
