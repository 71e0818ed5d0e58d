"""The dense SwiGLU MLP as one column-parallel / row-parallel pair: one all-reduce per MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import WeightSource
from .linear import MergedColumnParallelLinear, RowParallelLinear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    "SwiGLU's elementwise half: silu(gate) * up, for gate and up stacked on the last dimension."
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DenseMLP(nn.Module):
    "down(silu(gate(x)) * up(x)), with gate/up split by columns and down by rows over the TP group."

    def __init__(self, hidden_size: int, intermediate_size: int, tp_rank: int = 0, tp_size: int = 1,
                 tp_group=None, dtype=None, device=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, tp_rank, tp_size,
                                                       dtype, device)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp_rank, tp_size, tp_group,
                                           dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # [tokens, hidden], summed over TP

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate_up_proj.load(source, [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"])
        self.down_proj.load(source, f"{prefix}.down_proj.weight")
