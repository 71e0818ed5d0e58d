"""The MoE block of chapter 05: route, dispatch to the experts' owners, compute, combine, and sum over TP."""

# %% auto #0
__all__ = ['MoEBlock']

import torch
from torch import nn

from minisgl.batch import ForwardBatch
from minisgl.config import ModelConfig
from minisgl.distributed import ParallelContext
from minisgl.moe.experts import LocalExperts
from minisgl.moe.gate import Router
from minisgl.ops import Ops, reference_ops
from minisgl.weights import WeightSource


class MoEBlock(nn.Module):
    """Qwen3MoeSparseMoeBlock over a tp x ep grid.

    Experts are split over the EP group (which experts) and over the TP group (which slice of each
    expert's intermediate dimension). ep_size = 1 is plain tensor parallelism: nothing moves."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype=None, ops: Ops | None = None):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.num_experts, self.ctx, self.tp_group = config.num_experts, ctx, ctx.tp_group
        self.ops = ops or reference_ops()
        self.gate = Router(config.hidden_size, config.num_experts, dtype, ctx.device)
        self.experts = LocalExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                    ctx.ep_rank, ctx.ep_size, ctx.tp_rank, ctx.tp_size, dtype, ctx.device)

    @property
    def ops(self) -> Ops:
        return self._ops

    @ops.setter
    def ops(self, ops: Ops) -> None:
        "New operations bring their own way of moving rows between the EP ranks."
        self._ops = ops
        ctx = self.ctx
        self.exchange = ops.exchange(self.num_experts, ctx.ep_rank, ctx.ep_size, ctx.ep_group)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        "x: [tokens, hidden], identical on the ranks of this TP group -> [tokens, hidden]."
        weights, ids = self.ops.route(x, self.gate.weight, self.top_k, self.norm_topk_prob)
        rows, state = self.exchange.dispatch(x, ids, batch)        # rows for this rank's experts
        y, row_of_pair = self.ops.experts(rows, self.experts)      # partial: my intermediate slice
        y, row_of_pair = self.exchange.combine(y, row_of_pair, state)   # back where tokens live
        out = self.ops.weighted_sum(y, weights, row_of_pair)      # [tokens, hidden]
        return self.ops.all_reduce(out, self.tp_group)            # the slices' partial sums

    def load(self, source: WeightSource, prefix: str) -> None:
        "`prefix` is e.g. 'model.layers.0.mlp'."
        self.gate.load(source, f"{prefix}.gate.weight")
        self.experts.load(source, f"{prefix}.experts")
