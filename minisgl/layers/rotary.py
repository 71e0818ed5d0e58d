"""Rotary position embedding: rotate each (i, i + d/2) pair of q and k by position * theta^(-2i/d)."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    "cos/sin tables for every position up to `max_positions`, computed once and shared by all layers."

    def __init__(self, head_dim: int, rope_theta: float, max_positions: int, device=None):
        super().__init__()
        # The same float32 arithmetic as transformers, so float32 results agree to the last bit.
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
                                         / head_dim))
        angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)  # [positions, d/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        "q: [tokens, heads, d], k: [tokens, kv_heads, d], positions: [tokens]."
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # [tokens, 1, d/2]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    "Rotate the pairs (x[i], x[i + d/2]); the 'rotate_half' layout Qwen's checkpoints are trained with."
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
