"""Chapter 05: the sharded MoE block against transformers' Qwen3MoeSparseMoeBlock on every layout with
world <= 8, grouped GEMM against its loop, and clear errors for layouts the shapes do not allow."""

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from minisgl.config import ModelConfig, TINY_CONFIG
from minisgl.distributed import ParallelContext, ParallelLayout, run_on_ranks
from minisgl.moe.dispatch import LocalExchange, weighted_sum
from minisgl.moe.experts import LocalExperts, grouped_gemm, grouped_gemm_loop, run_experts
from minisgl.moe.layer import MoEBlock
from minisgl.weights import StateDictSource

PREFIX = "model.layers.0.mlp"
LAYOUTS = [(tp, ep) for tp in (1, 2, 4) for ep in (1, 2, 4) if tp * ep <= 8]
TOKENS_PER_REPLICA = [5, 0, 7, 3]  # replica 1 is empty whenever ep > 1


def reference_block(config, seed=0):
    torch.manual_seed(seed)
    hf_config = Qwen3MoeConfig(**config.to_hf_dict())
    hf_config._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(hf_config).float().eval()
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, 0.1)
        block.experts.down_proj.normal_(0, 0.1)
    return block


def checkpoint_tensors(block):
    "transformers 5 fuses the experts in memory; checkpoints (and our loader) name them one by one."
    i = block.experts.intermediate_dim
    tensors = {f"{PREFIX}.gate.weight": block.gate.weight.detach().clone()}
    for e in range(block.experts.num_experts):
        gate_up = block.experts.gate_up_proj[e].detach()
        tensors[f"{PREFIX}.experts.{e}.gate_proj.weight"] = gate_up[:i].clone()
        tensors[f"{PREFIX}.experts.{e}.up_proj.weight"] = gate_up[i:].clone()
        tensors[f"{PREFIX}.experts.{e}.down_proj.weight"] = block.experts.down_proj[e].detach().clone()
    return tensors


STATIC = 8  # a step padded to one size on every replica (as a CUDA graph runs it)


def _sharded(config, layouts, tensors, inputs, backend):
    from types import SimpleNamespace
    import torch.distributed as dist
    outputs = {}
    for tp, ep in layouts:
        ctx = (ParallelContext.from_process_group(tp, ep) if dist.is_initialized() else ParallelContext.single())
        ops = None
        if backend != "reference":
            from minisgl.fast_ops import fast_ops
            ops = fast_ops(ctx, config.hidden_size, torch.float32, gemv_max_rows=64 if backend == "gemv" else 0)
        block = MoEBlock(config, ctx, torch.float32, ops=ops)
        block.load(StateDictSource(tensors), PREFIX)
        x = inputs[tp, ep][ctx.ep_rank]
        outputs[tp, ep] = block(x)
        # A step where every replica is empty must not hang either.
        outputs[tp, ep, "empty"] = block(x[:0])
        # Every replica padded to the same size: the fixed-size exchange where the ops have one.
        padded = torch.cat([x, torch.ones(STATIC - len(x), x.shape[1])])
        outputs[tp, ep, "static"] = block(padded, SimpleNamespace(static_shapes=True))[:len(x)]
    return outputs


LAYOUTS_BY_BACKEND = {"reference": LAYOUTS, "gemv": [(1, 1), (2, 2), (1, 4)], "sorted": [(1, 1), (2, 2), (1, 4)]}


@pytest.mark.parametrize("backend", ["reference", "gemv", "sorted"])
def test_moe_block_matches_transformers_on_every_layout(tiny_config, backend):
    layouts = LAYOUTS_BY_BACKEND[backend]
    reference = reference_block(tiny_config)
    tensors = checkpoint_tensors(reference)
    generator = torch.Generator().manual_seed(0)
    inputs = {(tp, ep): [torch.randn(n, tiny_config.hidden_size, generator=generator)
                         for n in TOKENS_PER_REPLICA[:ep]] for tp, ep in layouts}
    results = {}
    for world in (1, 2, 4, 8):
        chosen = [layout for layout in layouts if layout[0] * layout[1] == world]
        if not chosen:
            continue
        args = (tiny_config, chosen, tensors, inputs, backend)
        results[world] = [_sharded(*args)] if world == 1 else run_on_ranks(_sharded, world, *args, timeout_s=300)
    checked = []
    for tp, ep in layouts:
        with torch.no_grad():
            expected = [reference(x[None])[0] if len(x) else x for x in inputs[tp, ep]]
        for rank, outputs in enumerate(results[tp * ep]):
            want = expected[rank // tp]
            for kind in ("exact", "static"):
                got = outputs[tp, ep] if kind == "exact" else outputs[tp, ep, "static"]
                assert got.shape == want.shape, (tp, ep, rank, kind)
                if len(want):
                    error = (got - want).abs().max().item()
                    assert error <= 1e-5, f"tp={tp} ep={ep} rank {rank} {kind}: max abs error {error:.2e}"
            assert outputs[tp, ep, "empty"].shape == (0, tiny_config.hidden_size)
        checked.append((tp, ep))
    assert checked == layouts


def test_local_exchange_round_trip():
    # ep_size = 1: the experts see the tokens themselves, sorted by expert; the weighted sum undoes the sort.
    topk_ids = torch.tensor([[3, 1], [0, 3], [2, 1]])
    topk_weights = torch.rand(3, 2)
    x = torch.randn(3, 5)
    exchange = LocalExchange()
    rows, state = exchange.dispatch(x, topk_ids)
    assert rows.experts.tolist() == [3, 1, 0, 3, 2, 1] and rows.rows_per_x == 2

    class Scale(torch.nn.Module):  # expert e multiplies by e + 1
        num_local_experts = 4

        def forward(self, sorted_x, tokens_per_expert):
            assert tokens_per_expert.tolist() == [1, 2, 1, 2]
            return sorted_x * torch.repeat_interleave(torch.arange(4) + 1.0, tokens_per_expert)[:, None]

    y, row_of_pair = run_experts(rows, Scale())
    y, row_of_pair = exchange.combine(y, row_of_pair, state)
    out = weighted_sum(y, topk_weights, row_of_pair)
    torch.testing.assert_close(out, x * (topk_weights * (topk_ids + 1.0)).sum(1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_loop(dtype):
    generator = torch.Generator().manual_seed(0)
    tokens_per_expert = torch.tensor([4, 0, 1, 7, 0, 3])
    x = torch.randn(int(tokens_per_expert.sum()), 32, generator=generator).to(dtype)
    w = torch.randn(6, 48, 32, generator=generator).to(dtype)
    expected = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in
                          enumerate(zip([0, *tokens_per_expert.cumsum(0).tolist()], tokens_per_expert.cumsum(0).tolist()))])
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(grouped_gemm_loop(x, w, tokens_per_expert), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(grouped_gemm(x, w, tokens_per_expert), expected, atol=tol, rtol=tol)
    empty = torch.zeros(6, dtype=torch.long)
    assert grouped_gemm(x[:0], w, empty).shape == (0, 48)
    assert grouped_gemm_loop(x[:0], w, empty).shape == (0, 48)


def test_bad_divisors_raise_value_errors_naming_the_numbers():
    with pytest.raises(ValueError, match=r"num_experts \(6\) is not divisible by ep_size \(4\)"):
        LocalExperts(6, 16, 32, ep_rank=0, ep_size=4)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(30\) is not divisible by tp_size \(4\)"):
        LocalExperts(8, 16, 30, tp_rank=0, tp_size=4)
    # Through the block, with the layout taken from a ParallelContext (no process group is needed to fail).
    bad_experts = ModelConfig.from_dict({**TINY_CONFIG, "num_experts": 6})
    with pytest.raises(ValueError, match=r"num_experts \(6\) is not divisible by ep_size \(4\)"):
        MoEBlock(bad_experts, ParallelContext(ParallelLayout(1, 4)), torch.float32)
    bad_intermediate = ModelConfig.from_dict({**TINY_CONFIG, "moe_intermediate_size": 30})
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(30\) is not divisible by tp_size \(4\)"):
        MoEBlock(bad_intermediate, ParallelContext(ParallelLayout(4, 1)), torch.float32)
