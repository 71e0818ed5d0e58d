"""The router: score every expert for every token, keep the top k, weight them."""

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import WeightSource


class Router(nn.Module):
    "A [num_experts, hidden] linear map, replicated on every rank: every rank routes its own tokens."

    def __init__(self, hidden_size: int, num_experts: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # [tokens, num_experts]

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.copy_(source.read(name, tuple(self.weight.shape)))


def select_experts(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Softmax over all experts (in float32), keep the k largest, renormalise them to sum to 1 only if
    the config says so; as transformers' Qwen3MoeTopKRouter does. Returns (weights, expert ids)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [tokens, num_experts]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)          # [tokens, top_k]
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    "How many (token, slot) pairs chose each expert: the work each expert's owner will do."
    return torch.bincount(topk_ids.flatten(), minlength=num_experts)  # [num_experts]
