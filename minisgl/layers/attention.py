"""Qwen3 attention, split by heads over the TP group, with a KV cache for prefill and decode."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..distributed import ParallelContext
from ..weights import WeightSource
from .linear import QKVParallelLinear, RowParallelLinear
from .norm import RMSNorm
from .rotary import RotaryEmbedding


@dataclass
class AttentionBatch:
    """Where the tokens of one forward step sit: which sequence, which position, which cache row.

    Tokens of all sequences are packed into one [tokens, ...] tensor. A prefill step brings a whole
    prompt per sequence; a decode step brings one token per sequence; both are the same thing here:
    `query_len` new tokens after `start` tokens already in the cache. Built once per step, shared by
    every layer."""
    positions: torch.Tensor      # [tokens] position of each token in its sequence
    token_seq: torch.Tensor      # [tokens] which sequence (0..seqs-1) each token belongs to
    token_offset: torch.Tensor   # [tokens] index of each token among its sequence's new tokens
    cache_rows: torch.Tensor     # [seqs] row of the KV cache that holds each sequence
    mask: torch.Tensor           # [seqs, 1, max_query_len, max_kv_len] True where a query may see a key
    max_query_len: int
    max_kv_len: int

    @classmethod
    def build(cls, query_lens: list[int], starts: list[int], cache_rows: list[int] | None = None,
              device=None) -> "AttentionBatch":
        "`query_lens[i]` new tokens of sequence i follow `starts[i]` tokens already cached."
        cache_rows = list(range(len(query_lens))) if cache_rows is None else cache_rows
        token_seq = [i for i, n in enumerate(query_lens) for _ in range(n)]
        token_offset = [j for n in query_lens for j in range(n)]
        positions = [s + j for s, n in zip(starts, query_lens) for j in range(n)]
        max_query_len = max(query_lens, default=0)
        max_kv_len = max((s + n for s, n in zip(starts, query_lens)), default=0)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
        positions_t, token_seq_t, token_offset_t = as_long(positions), as_long(token_seq), as_long(token_offset)
        # Padding queries see only key 0, so no softmax row is empty (their outputs are dropped).
        query_pos = torch.zeros(len(query_lens), max_query_len, dtype=torch.long, device=device)
        query_pos[token_seq_t, token_offset_t] = positions_t
        mask = torch.arange(max_kv_len, device=device)[None, None, :] <= query_pos[:, :, None]
        return cls(positions_t, token_seq_t, token_offset_t, as_long(cache_rows), mask[:, None],
                   max_query_len, max_kv_len)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.cache_rows.shape[0]


class KVCache:
    "Keys and values of every layer: [layers, rows, local kv heads, max_len, head_dim], one row per sequence."

    def __init__(self, num_layers: int, max_seqs: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (num_layers, max_seqs, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[idx], self.v[idx]


def sdpa_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                   scale: float) -> torch.Tensor:
    "Attention of packed queries [tokens, heads, d] over each sequence's cached keys, through padded SDPA."
    seqs, heads, d = batch.num_seqs, q.shape[1], q.shape[2]
    q_padded = q.new_zeros(seqs, batch.max_query_len, heads, d)
    q_padded[batch.token_seq, batch.token_offset] = q
    keys = k_cache[batch.cache_rows, :, :batch.max_kv_len]  # [seqs, kv heads, max_kv_len, d]
    values = v_cache[batch.cache_rows, :, :batch.max_kv_len]
    out = F.scaled_dot_product_attention(q_padded.transpose(1, 2), keys, values, attn_mask=batch.mask,
                                         scale=scale, enable_gqa=True)  # [seqs, heads, max_query_len, d]
    return out.transpose(1, 2)[batch.token_seq, batch.token_offset]  # [tokens, heads, d]


class Qwen3Attention(nn.Module):
    """Qwen3MoeAttention, sharded: this rank computes `num_heads / tp_size` query heads end to end.

    q/k/v are column-parallel (by heads), so RMSNorm on q and k, RoPE and the attention itself
    are local; o_proj is row-parallel and its all-reduce is the layer's only communication."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, rotary: RotaryEmbedding, dtype=None):
        super().__init__()
        device = ctx.device
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, ctx.tp_rank, ctx.tp_size, dtype, device)
        self.num_local_heads = self.qkv_proj.num_local_heads
        self.num_local_kv_heads = self.qkv_proj.num_local_kv_heads
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                        ctx.tp_rank, ctx.tp_size, ctx.tp_group, dtype=dtype, device=device)
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        q = self.q_norm(q.view(tokens, self.num_local_heads, self.head_dim))     # [tokens, heads, d]
        k = self.k_norm(k.view(tokens, self.num_local_kv_heads, self.head_dim))  # [tokens, kv heads, d]
        v = v.view(tokens, self.num_local_kv_heads, self.head_dim)
        q, k = self.rotary(batch.positions, q, k)
        k_cache, v_cache = kv_cache
        rows = batch.cache_rows[batch.token_seq]
        k_cache[rows, :, batch.positions] = k
        v_cache[rows, :, batch.positions] = v
        if tokens:
            out = sdpa_attention(q, k_cache, v_cache, batch, self.scale)
        else:  # an idle replica still takes part in o_proj's all-reduce below
            out = q
        return self.o_proj(out.reshape(tokens, self.num_local_heads * self.head_dim))

    def load(self, source: WeightSource, prefix: str) -> None:
        self.qkv_proj.load(source, f"{prefix}.q_proj.weight", f"{prefix}.k_proj.weight", f"{prefix}.v_proj.weight")
        self.q_norm.load(source, f"{prefix}.q_norm.weight")
        self.k_norm.load(source, f"{prefix}.k_norm.weight")
        self.o_proj.load(source, f"{prefix}.o_proj.weight")
