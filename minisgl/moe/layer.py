"""The MoE block: route, dispatch to the experts' owners, compute, combine, and sum over TP."""

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed import ParallelContext, all_reduce
from ..weights import WeightSource
from .dispatch import AllToAllDispatcher
from .experts import LocalExperts
from .gate import Router, select_experts


class MoEBlock(nn.Module):
    """Qwen3MoeSparseMoeBlock over a tp x ep grid.

    Experts are split over the EP group (which experts) and over the TP group (which slice of each
    expert's intermediate dimension). ep_size = 1 is plain tensor parallelism: the all_to_alls vanish."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype=None):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.tp_group = ctx.tp_group
        self.gate = Router(config.hidden_size, config.num_experts, dtype, ctx.device)
        self.dispatcher = AllToAllDispatcher(config.num_experts, ctx.ep_rank, ctx.ep_size, ctx.ep_group)
        self.experts = LocalExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                    ctx.ep_rank, ctx.ep_size, ctx.tp_rank, ctx.tp_size, dtype, ctx.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        "x: [tokens, hidden], identical on the ranks of this TP group -> [tokens, hidden]."
        topk_weights, topk_ids = select_experts(self.gate(x), self.top_k, self.norm_topk_prob)  # [tokens, top_k]
        expert_in, tokens_per_expert, state = self.dispatcher.dispatch(x, topk_ids)
        expert_out = self.experts(expert_in, tokens_per_expert)  # partial: this rank's intermediate slice
        out = self.dispatcher.combine(expert_out, state, topk_weights)
        return all_reduce(out, self.tp_group)  # the slices' partial sums make the full expert outputs

    def load(self, source: WeightSource, prefix: str) -> None:
        "`prefix` is e.g. 'model.layers.0.mlp'."
        self.gate.load(source, f"{prefix}.gate.weight")
        self.experts.load(source, f"{prefix}.experts")
