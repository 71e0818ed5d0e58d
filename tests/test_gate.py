"""Chapter 04: the router's top-k selection against transformers' Qwen3MoeTopKRouter, and expert_load."""

import dataclasses

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from minisgl.moe.gate import Router, expert_load, select_experts
from minisgl.weights import StateDictSource


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_experts_matches_transformers_router(tiny_config, norm_topk_prob, dtype):
    # With hidden size = num_experts and an identity router weight, the router's logits are its input:
    # select_experts sees exactly the random logits transformers' router sees.
    config = dataclasses.replace(tiny_config, norm_topk_prob=norm_topk_prob, hidden_size=tiny_config.num_experts)
    reference = Qwen3MoeTopKRouter(Qwen3MoeConfig(**config.to_hf_dict())).to(dtype)
    reference.weight.data.copy_(torch.eye(config.num_experts))
    logits = (3 * torch.randn(64, config.num_experts, generator=torch.Generator().manual_seed(0))).to(dtype)
    with torch.no_grad():
        ref_logits, ref_weights, ref_ids = reference(logits)
    assert torch.equal(ref_logits, logits)
    weights, ids = select_experts(logits, config.num_experts_per_tok, norm_topk_prob)
    assert weights.dtype == dtype and ids.shape == (64, config.num_experts_per_tok)
    assert torch.equal(ids, ref_ids)
    assert (weights.float() - ref_weights.float()).abs().max().item() == 0.0
    sums = weights.float().sum(-1)
    if norm_topk_prob:
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    else:  # the k weights keep the softmax's denominator over all experts, so they sum to less than one
        assert (sums <= 1 + (1e-2 if dtype == torch.bfloat16 else 1e-6)).all() and sums.min() < 0.9


def test_router_loads_and_routes_like_transformers(tiny_config):
    reference = Qwen3MoeTopKRouter(Qwen3MoeConfig(**tiny_config.to_hf_dict()))
    reference.weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    router = Router(tiny_config.hidden_size, tiny_config.num_experts, torch.float32)
    router.load(StateDictSource({"mlp.gate.weight": reference.weight.detach()}), "mlp.gate.weight")
    x = torch.randn(10, tiny_config.hidden_size)
    with torch.no_grad():
        ref_logits, ref_weights, ref_ids = reference(x)
    weights, ids = select_experts(router(x), tiny_config.num_experts_per_tok, tiny_config.norm_topk_prob)
    assert torch.equal(router(x), ref_logits) and torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)


def test_expert_load():
    ids = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_load(ids, 6).tolist() == [2, 1, 0, 3, 0, 0]
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(50)])
    load = expert_load(ids, 16)
    assert load.shape == (16,) and load.sum().item() == 200
    assert load.tolist() == [(ids == e).sum().item() for e in range(16)]
    assert expert_load(torch.empty(0, 4, dtype=torch.long), 16).tolist() == [0] * 16
