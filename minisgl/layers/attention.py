"""Qwen3 attention, split by heads over the TP group, reading and writing a paged KV cache."""

# %% auto #0
__all__ = ['qk_norm_rope_store', 'paged_attention', 'Qwen3Attention']

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.batch import ForwardBatch
from minisgl.config import ModelConfig
from minisgl.distributed import ParallelContext
from minisgl.kv_cache import LayerCache
from minisgl.layers.linear import QKVParallelLinear, RowParallelLinear
from minisgl.layers.norm import RMSNorm, rms_norm
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.ops import Ops, reference_ops
from minisgl.weights import WeightSource


def qk_norm_rope_store(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float,
                       rotary: RotaryEmbedding, num_heads: int, num_kv_heads: int,
                       batch: ForwardBatch, cache: LayerCache) -> torch.Tensor:
    """From the fused projection qkv [tokens, (heads + 2 kv heads) * d]: the per-head RMSNorm of q
    and k, RoPE on both, and k and v written to the tokens' cache slots. Returns q [tokens, heads, d]."""
    tokens, d = qkv.shape[0], rotary.head_dim
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = rms_norm(q.reshape(tokens, num_heads, d), q_norm, eps)      # [tokens, heads, d]
    k = rms_norm(k.reshape(tokens, num_kv_heads, d), k_norm, eps)   # [tokens, kv heads, d]
    q, k = rotary(batch.positions, q, k)
    cache.k[:, batch.out_slots] = k.transpose(0, 1)          # [kv heads, tokens, d]
    cache.v[:, batch.out_slots] = v.reshape(tokens, num_kv_heads, d).transpose(0, 1)
    return q


def paged_attention(q: torch.Tensor, cache: LayerCache, batch: ForwardBatch,
                    scale: float) -> torch.Tensor:
    """Causal attention of packed queries [tokens, heads, d] over each sequence's cached keys,
    found through its page-table row; padded per sequence and run by PyTorch's SDPA."""
    seqs, tokens = batch.num_seqs, batch.num_tokens
    if tokens == 0:
        return q
    key_pos = torch.arange(batch.max_seq_len, device=q.device)                    # [keys]
    slots = cache.slots(batch.seq_rows[:, None], key_pos[None, :])               # [seqs, keys]
    keys = cache.k[:, slots].transpose(0, 1)                   # [seqs, kv heads, keys, d]
    values = cache.v[:, slots].transpose(0, 1)
    offset = torch.arange(tokens, device=q.device) - batch.query_starts[batch.token_seq]
    q_padded = q.new_zeros(seqs, batch.max_query_len, *q.shape[1:])
    q_padded[batch.token_seq, offset] = q                       # [seqs, queries, heads, d]
    # A query at position p sees the keys at positions 0..p. Padding queries see key 0 only,
    # so no softmax row is empty; their outputs are dropped.
    query_pos = torch.zeros(seqs, batch.max_query_len, dtype=torch.long, device=q.device)
    query_pos[batch.token_seq, offset] = batch.positions
    mask = key_pos[None, None, :] <= query_pos[:, :, None]      # [seqs, queries, keys]
    out = F.scaled_dot_product_attention(
        q_padded.transpose(1, 2), keys, values,
        attn_mask=mask[:, None], scale=scale, enable_gqa=True)  # [seqs, heads, queries, d]
    return out.transpose(1, 2)[batch.token_seq, offset]         # [tokens, heads, d]


class Qwen3Attention(nn.Module):
    """Qwen3MoeAttention, sharded: this rank computes `num_heads / tp_size` query heads end to end.

    q/k/v are column-parallel (by heads), so RMSNorm on q and k, RoPE and the attention itself
    are local; o_proj is row-parallel and its all-reduce is the layer's only communication."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, rotary: RotaryEmbedding,
                 dtype=None, ops: Ops | None = None):
        super().__init__()
        device, self.ops = ctx.device, ops or reference_ops()
        self.head_dim, self.eps = config.head_dim, config.rms_norm_eps
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim,
                                          config.num_attention_heads, config.num_key_value_heads,
                                          ctx.tp_rank, ctx.tp_size, dtype, device, ops=self.ops)
        self.num_local_heads = self.qkv_proj.num_local_heads
        self.num_local_kv_heads = self.qkv_proj.num_local_kv_heads
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim,
                                        config.hidden_size, ctx.tp_rank, ctx.tp_size, ctx.tp_group,
                                        dtype=dtype, device=device, ops=self.ops)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache) -> torch.Tensor:
        "x: [tokens, hidden] -> [tokens, hidden], summed over the TP group."
        qkv = self.qkv_proj(x)                       # [tokens, (heads + 2 kv heads) * d]
        q = self.ops.qk_norm_rope_store(qkv, self.q_norm.weight, self.k_norm.weight, self.eps,
                                        self.rotary, self.num_local_heads,
                                        self.num_local_kv_heads, batch, cache)
        # An idle replica (no tokens) skips the arithmetic but still joins o_proj's all-reduce.
        out = self.ops.attention(q, cache, batch, self.scale)  # [tokens, heads, d]
        return self.o_proj(out.reshape(x.shape[0], self.num_local_heads * self.head_dim))

    def load(self, source: WeightSource, prefix: str) -> None:
        self.qkv_proj.load(source, f"{prefix}.q_proj.weight", f"{prefix}.k_proj.weight",
                           f"{prefix}.v_proj.weight")
        self.q_norm.load(source, f"{prefix}.q_norm.weight")
        self.k_norm.load(source, f"{prefix}.k_norm.weight")
        self.o_proj.load(source, f"{prefix}.o_proj.weight")
