"""Fused GPU kernels (Triton) and their plain PyTorch references."""
