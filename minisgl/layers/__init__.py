"""Tensor-parallel building blocks: linear layers, the dense MLP, norms, rotary, attention, vocab."""
