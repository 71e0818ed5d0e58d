"""Megatron-style tensor parallelism: split the first matrix by columns, the second by rows, sum once."""

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce
from ..weights import Shard, WeightSource


def divide(size: int, parts: int, what: str) -> int:
    "`size // parts`, or a ValueError naming both numbers."
    if size % parts:
        raise ValueError(f"{what} ({size}) is not divisible by tp_size ({parts})")
    return size // parts


def _empty(rows: int, cols: int, dtype, device) -> nn.Parameter:
    # Inference only: no gradients, and the values come from a WeightSource.
    return nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    "y[:, shard] = x @ W[shard, :].T: each rank owns `out_features / tp_size` output rows; no communication."

    def __init__(self, in_features: int, out_features: int, tp_rank: int = 0, tp_size: int = 1,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.out_per_rank = divide(out_features, tp_size, "out_features")
        self.weight = _empty(self.out_per_rank, in_features, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # [tokens, out_features / tp_size]

    def load(self, source: WeightSource, name: str) -> None:
        rows = Shard(0, self.tp_rank * self.out_per_rank, self.out_per_rank)
        self.weight.copy_(source.read(name, (self.out_features, self.in_features), rows))


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel matrices that read the same input (gate and up), stacked into one GEMM.

    The local weight is [shard of W_0; shard of W_1; ...], so the output splits back into parts."""

    def __init__(self, in_features: int, out_features: list[int], tp_rank: int = 0, tp_size: int = 1,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, list(out_features)
        self.tp_rank = tp_rank
        self.out_per_rank = [divide(n, tp_size, "out_features") for n in out_features]
        self.weight = _empty(sum(self.out_per_rank), in_features, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # [tokens, sum(out_features) / tp_size]

    def load(self, source: WeightSource, names: list[str]) -> None:
        parts = self.weight.split(self.out_per_rank)
        for part, name, full_rows, rows in zip(parts, names, self.out_features, self.out_per_rank):
            part.copy_(source.read(name, (full_rows, self.in_features), Shard(0, self.tp_rank * rows, rows)))


def kv_heads_for_rank(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(first KV head, count) a rank needs for its query heads.

    With tp_size <= num_kv_heads each rank owns num_kv_heads / tp_size heads; beyond that each KV
    head is replicated on tp_size / num_kv_heads consecutive ranks (Qwen3-30B-A3B: 4 KV heads, tp 8
    puts head i on ranks 2i and 2i+1)."""
    if tp_size <= num_kv_heads:
        per_rank = divide(num_kv_heads, tp_size, "num_key_value_heads")
        return tp_rank * per_rank, per_rank
    if tp_size % num_kv_heads:
        raise ValueError(f"tp_size ({tp_size}) exceeds num_key_value_heads ({num_kv_heads}) "
                         f"and is not a multiple of it, so KV heads cannot be replicated evenly")
    return tp_rank // (tp_size // num_kv_heads), 1


class QKVParallelLinear(nn.Module):
    "q, k and v projections in one column-parallel GEMM, split by heads: [q heads | k heads | v heads]."

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 tp_rank: int = 0, tp_size: int = 1, dtype=None, device=None):
        super().__init__()
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_local_heads = divide(num_heads, tp_size, "num_attention_heads")
        self.q_head_start = tp_rank * self.num_local_heads
        self.kv_head_start, self.num_local_kv_heads = kv_heads_for_rank(num_kv_heads, tp_rank, tp_size)
        self.output_sizes = [self.num_local_heads * head_dim, self.num_local_kv_heads * head_dim,
                             self.num_local_kv_heads * head_dim]
        self.weight = _empty(sum(self.output_sizes), hidden_size, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # [tokens, (local q heads + 2 * local kv heads) * head_dim]

    def load(self, source: WeightSource, q_name: str, k_name: str, v_name: str) -> None:
        q, k, v = self.weight.split(self.output_sizes)
        d = self.head_dim
        q.copy_(source.read(q_name, (self.num_heads * d, self.hidden_size),
                            Shard(0, self.q_head_start * d, self.num_local_heads * d)))
        kv_rows = Shard(0, self.kv_head_start * d, self.num_local_kv_heads * d)
        k.copy_(source.read(k_name, (self.num_kv_heads * d, self.hidden_size), kv_rows))
        v.copy_(source.read(v_name, (self.num_kv_heads * d, self.hidden_size), kv_rows))


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[:, shard] @ W[:, shard].T: each rank owns `in_features / tp_size` input columns.

    Its input is a column-parallel layer's output, already split the right way, so the only
    communication of the pair is the all-reduce here."""

    def __init__(self, in_features: int, out_features: int, tp_rank: int = 0, tp_size: int = 1,
                 tp_group=None, reduce_results: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_group, self.reduce_results = tp_rank, tp_group, reduce_results
        self.in_per_rank = divide(in_features, tp_size, "in_features")
        self.weight = _empty(out_features, self.in_per_rank, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # [tokens, out_features], this rank's share of the sum
        return all_reduce(partial, self.tp_group) if self.reduce_results else partial

    def load(self, source: WeightSource, name: str) -> None:
        cols = Shard(1, self.tp_rank * self.in_per_rank, self.in_per_rank)
        self.weight.copy_(source.read(name, (self.out_features, self.in_features), cols))
