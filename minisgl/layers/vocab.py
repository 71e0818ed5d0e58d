"""The embedding and the LM head, each split by vocabulary rows over the TP group."""

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather, all_reduce
from ..weights import Shard, WeightSource


class _VocabShard(nn.Module):
    "Rows [start, end) of a [vocab, hidden] matrix; the last rank's shard is zero-padded to equal size."

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int, tp_size: int, tp_group, dtype, device):
        super().__init__()
        self.vocab_size, self.hidden_size, self.tp_group = vocab_size, hidden_size, tp_group
        self.rows_per_rank = -(-vocab_size // tp_size)
        self.start = min(tp_rank * self.rows_per_rank, vocab_size)
        self.end = min(self.start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, source: WeightSource, name: str) -> None:
        rows = self.end - self.start
        self.weight[:rows].copy_(source.read(name, (self.vocab_size, self.hidden_size), Shard(0, self.start, rows)))


class VocabParallelEmbedding(_VocabShard):
    "Each rank looks up the ids in its rows, zeros for the rest; the all-reduce fills in every row."

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(ids, self.weight)  # [tokens, hidden]
        mine = (ids >= self.start) & (ids < self.end)
        local = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        return all_reduce(local * mine[:, None].to(local.dtype), self.tp_group)  # [tokens, hidden]


class ParallelLMHead(_VocabShard):
    "Each rank scores its vocabulary rows; an all-gather gives every rank the full logits."

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)  # [n, vocab / tp_size]
        return all_gather(local, self.tp_group, dim=-1)[:, :self.vocab_size]  # [n, vocab]
