"""Chapter 03: RMSNorm, RoPE and sharded attention (prefill, chunked prefill, decode) equal transformers'."""

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (Qwen3MoeAttention, Qwen3MoeRMSNorm,
                                                              Qwen3MoeRotaryEmbedding, apply_rotary_pos_emb)

from minisgl.batch import ForwardBatch
from minisgl.distributed import ParallelContext, ParallelLayout, run_on_ranks
from minisgl.kv_cache import KVCache
from minisgl.layers.attention import Qwen3Attention
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.weights import StateDictSource

TOL = 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_bit_for_bit(tiny_config, dtype):
    g = torch.Generator().manual_seed(0)
    theirs = Qwen3MoeRMSNorm(tiny_config.hidden_size, eps=tiny_config.rms_norm_eps)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.3 * torch.randn(tiny_config.hidden_size, generator=g))
    theirs = theirs.to(dtype)
    ours = RMSNorm(tiny_config.hidden_size, tiny_config.rms_norm_eps, dtype=dtype)
    ours.load(StateDictSource({"norm.weight": theirs.weight.detach()}), "norm.weight")
    x = (5 * torch.randn(7, tiny_config.hidden_size, generator=g)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_rotary_matches_transformers(tiny_config):
    hf_config = Qwen3MoeConfig(**tiny_config.to_hf_dict())
    positions = torch.tensor([0, 3, 17, 200, 511])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(positions), tiny_config.num_attention_heads, tiny_config.head_dim, generator=g)
    k = torch.randn(len(positions), tiny_config.num_key_value_heads, tiny_config.head_dim, generator=g)
    q_ours, k_ours = RotaryEmbedding(tiny_config.head_dim, tiny_config.rope_theta, 512)(positions, q, k)
    cos, sin = Qwen3MoeRotaryEmbedding(hf_config)(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos[0], sin[0], unsqueeze_dim=0)
    torch.testing.assert_close(q_ours, q_hf.transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_ours, k_hf.transpose(0, 1), atol=1e-6, rtol=0)


def paged_cache(num_kv_heads, head_dim, page_size, max_rows=3, max_seq_len=16, dtype=torch.float32):
    "A cache whose rows 2 and 0 hold pages in scrambled order, as a page pool hands them out."
    num_pages = 1 + 2 * -(-max_seq_len // page_size)
    cache = KVCache(2, num_pages, page_size, num_kv_heads, head_dim, max_rows, max_seq_len, dtype)
    pages = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(0)) + 1  # 0: scratch
    per_row = cache.pages_per_row
    cache.page_table[2, :per_row] = pages[:per_row].int()
    cache.page_table[0, :per_row] = pages[per_row:2 * per_row].int()
    return cache


def test_forward_batch_positions_and_slots():
    cache = paged_cache(1, 4, page_size=4)
    batch = ForwardBatch.build([11, 12, 13, 14], [1, 3], [4, 0], [2, 0], cache)
    assert batch.positions.tolist() == [4, 0, 1, 2]
    assert batch.token_seq.tolist() == [0, 1, 1, 1] and batch.query_starts.tolist() == [0, 1, 4]
    assert batch.seq_lens.tolist() == [5, 3] and batch.logits_index.tolist() == [0, 3]
    assert (batch.max_query_len, batch.max_seq_len, batch.is_decode, batch.no_prefix) == (3, 5, False, False)
    table = cache.page_table.tolist()
    expected = [table[2][1] * 4 + 0] + [table[0][0] * 4 + j for j in range(3)]
    assert batch.out_slots.tolist() == expected  # position 4 is the first slot of row 2's second page
    decode = ForwardBatch.decode(torch.tensor([7, 8]), torch.tensor([2, 0]), torch.tensor([5, 3]), cache, 16)
    assert decode.is_decode and decode.seq_lens.tolist() == [6, 4] and decode.logits_index.tolist() == [0, 1]


# Steps of (query_lens, starts) for two sequences whose full lengths are 9 and 7: a prefill of the first
# prompt and part of the second, a mixed step (a decode token and the rest of the second prompt), then decode.
FULL_LENS = [9, 7]
STEPS = [([6, 2], [0, 0]), ([1, 3], [6, 2]), ([1, 1], [7, 5]), ([1, 1], [8, 6])]
ROWS = [2, 0]  # the sequences live in rows 2 and 0 of a 3-row cache


def sharded_steps(config, source, sequences, tp_sizes, backend, page_size):
    import torch.distributed as dist
    results = {}
    for tp in tp_sizes:
        ctx = ParallelContext.from_process_group(tp, dist.get_world_size() // tp)
        ops = None
        if backend == "fast":
            from minisgl.fast_ops import fast_ops
            ops = fast_ops(ctx, config.hidden_size, torch.float32)
        rotary = RotaryEmbedding(config.head_dim, config.rope_theta, 64)
        attention = Qwen3Attention(config, ctx, rotary, dtype=torch.float32, ops=ops)
        attention.load(source, "model.layers.0.self_attn")
        cache = paged_cache(attention.num_local_kv_heads, config.head_dim, page_size)
        outputs = [[] for _ in sequences]
        for query_lens, starts in STEPS:
            batch = ForwardBatch.build([0] * sum(query_lens), query_lens, starts, ROWS, cache)
            hidden = torch.cat([x[s:s + n] for x, n, s in zip(sequences, query_lens, starts)])
            out = attention(hidden, batch, cache.layer(1))
            for i, part in enumerate(out.split(query_lens)):
                outputs[i].append(part)
        # an idle replica: no tokens, yet it must still join o_proj's all-reduce
        empty = attention(torch.empty(0, config.hidden_size), ForwardBatch.build([], [], [], [], cache),
                          cache.layer(1))
        results[tp] = {"outputs": [torch.cat(o) for o in outputs], "empty_shape": tuple(empty.shape),
                       "kv": (attention.qkv_proj.kv_head_start, attention.num_local_kv_heads)}
    return results


@pytest.mark.parametrize("backend,page_size,tp_sizes", [("reference", 1, (1, 2, 4, 8)), ("reference", 4, (1, 2, 4, 8)),
                                                         ("fast", 4, (1, 8))])
def test_sharded_attention_matches_transformers(tiny_config, backend, page_size, tp_sizes):
    config = tiny_config
    hf_config = Qwen3MoeConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(3)
    reference = Qwen3MoeAttention(hf_config, layer_idx=0).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name
                        else torch.randn_like(param) / param.shape[1] ** 0.5)
    rotary = Qwen3MoeRotaryEmbedding(hf_config)
    sequences = [torch.randn(n, config.hidden_size) for n in FULL_LENS]
    expected = []
    with torch.no_grad():
        for x in sequences:
            n = len(x)
            cos, sin = rotary(x[None], torch.arange(n)[None])
            causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
            expected.append(reference(x[None], (cos, sin), causal)[0][0])

    source = StateDictSource({f"model.layers.0.self_attn.{k}": v for k, v in reference.state_dict().items()})
    per_rank = run_on_ranks(sharded_steps, 8, config, source, sequences, tp_sizes, backend, page_size,
                            timeout_s=300)
    for tp in tp_sizes:
        for rank, results in enumerate(per_rank):
            res = results[tp]
            for got, want in zip(res["outputs"], expected):
                torch.testing.assert_close(got, want, atol=TOL, rtol=0)
            assert res["empty_shape"] == (0, config.hidden_size)
        kv = [per_rank[r][tp]["kv"] for r in range(tp)]
        if tp == 8:
            assert kv == [(r // 2, 1) for r in range(8)]  # each KV head replicated on two ranks
        else:
            assert kv == [(r * (4 // tp), 4 // tp) for r in range(tp)]


@pytest.mark.parametrize("tp_size", [3, 16])
def test_heads_not_divisible_by_tp_raise(tiny_config, tp_size):
    ctx = ParallelContext(ParallelLayout(tp_size, 1), rank=0)
    with pytest.raises(ValueError, match=rf"num_attention_heads \(8\) is not divisible by tp_size \({tp_size}\)"):
        Qwen3Attention(tiny_config, ctx, RotaryEmbedding(16, 10000.0, 8), dtype=torch.float32)
