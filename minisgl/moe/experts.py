"""The experts one rank owns, computed as two grouped GEMMs over tokens sorted by expert."""

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import divide
from ..layers.mlp import silu_and_mul
from ..weights import Shard, WeightSource


def expert_slice(num_experts: int, ep_rank: int, ep_size: int) -> range:
    "The global ids of the experts EP rank `ep_rank` owns: a contiguous block of num_experts / ep_size."
    if num_experts % ep_size:
        raise ValueError(f"num_experts ({num_experts}) is not divisible by ep_size ({ep_size})")
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    # CUDA grouped_mm runs bfloat16 on Hopper and newer; the CPU one takes float32 too.
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = x[rows of expert e] @ w[e].T, for x [rows, in] sorted by expert, w [experts, out, in].

    One grouped_mm call where torch has it; otherwise one matmul per expert (never per token)."""
    if x.shape[0] == 0:
        return x.new_empty(0, w.shape[1])
    if _grouped_mm_supported(x):
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # end row of each expert's block
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            torch.matmul(x[start:start + n], w[e].t(), out=out[start:start + n])
            start += n
    return out


class LocalExperts(nn.Module):
    """This rank's experts: `num_experts / ep_size` of them, each cut to `intermediate / tp_size` columns.

    Cutting every expert's intermediate dimension is the MLP's column/row split again: gate/up by
    rows, down by columns. The output is therefore a partial sum over the TP group."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, ep_rank: int = 0,
                 ep_size: int = 1, tp_rank: int = 0, tp_size: int = 1, dtype=None, device=None):
        super().__init__()
        self.experts = expert_slice(num_experts, ep_rank, ep_size)
        self.num_local_experts = len(self.experts)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.intermediate_per_rank = divide(intermediate_size, tp_size, "moe_intermediate_size")
        self.tp_rank = tp_rank
        i = self.intermediate_per_rank
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * i, hidden_size, dtype=dtype, device=device),
                                requires_grad=False)  # [gate shard; up shard] of each expert
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, i, dtype=dtype, device=device),
                               requires_grad=False)   # down shard of each expert

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        "x: [rows, hidden] sorted by local expert; tokens_per_expert: [num_local_experts]."
        gate_up = grouped_gemm(x, self.w13, tokens_per_expert)             # [rows, 2 * intermediate / tp]
        return grouped_gemm(silu_and_mul(gate_up), self.w2, tokens_per_expert)  # [rows, hidden], partial

    def load(self, source: WeightSource, prefix: str) -> None:
        "`prefix` is e.g. 'model.layers.0.mlp.experts'; expert e's tensors are '{prefix}.{e}.gate_proj.weight'..."
        h, full_i, i = self.hidden_size, self.intermediate_size, self.intermediate_per_rank
        rows = Shard(0, self.tp_rank * i, i)
        cols = Shard(1, self.tp_rank * i, i)
        for local, e in enumerate(self.experts):
            self.w13[local, :i].copy_(source.read(f"{prefix}.{e}.gate_proj.weight", (full_i, h), rows))
            self.w13[local, i:].copy_(source.read(f"{prefix}.{e}.up_proj.weight", (full_i, h), rows))
            self.w2[local].copy_(source.read(f"{prefix}.{e}.down_proj.weight", (h, full_i), cols))
