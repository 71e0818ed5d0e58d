"""The fast implementation of every operation of the model: Triton kernels, FlashAttention through
SDPA, symmetric-memory all-reduces and a fixed-size expert exchange that CUDA graphs can replay."""

# %% auto #0
__all__ = ['ONE_SHOT_MAX_TOKENS', 'TWO_SHOT_MAX_TOKENS', 'GEMV_MAX_ROWS', 'TRITON_GROUPED_MAX_ROWS_PER_EXPERT',
           'TPAllReduce', 'FixedCapacityExchange', 'fast_ops']

import functools

import torch
import torch.nn.functional as F

from minisgl.batch import ForwardBatch
from minisgl.distributed import ParallelContext, all_reduce, all_to_all
from minisgl.kernels.attention import decode_attention
from minisgl.kernels.gemv import GEMV_BLOCKS, gemv
from minisgl.kernels.moe import (counting_sort_by_expert, fused_silu_and_mul, moe_down, moe_gate_up,
                                 moe_grouped_gemm, router_topk, weighted_sum)
from minisgl.kernels.norm import add_rms_norm
from minisgl.kernels.rope import qk_norm_rope_store
from minisgl.kv_cache import LayerCache
from minisgl.layers.attention import paged_attention
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.moe.dispatch import AllToAllExchange, LocalExchange
from minisgl.moe.experts import ExpertRows, LocalExperts, grouped_gemm
from minisgl.ops import Ops
from minisgl.symmetric import SymmetricAllReduce

# Up to this many tokens (256 KiB of bfloat16 activations at Qwen3's hidden size) a TP all-reduce is
# one-shot over symmetric memory; beyond, each rank would read too many bytes from its peers.
ONE_SHOT_MAX_TOKENS = 64

# Beyond one-shot and up to this many tokens (4 MiB), a TP all-reduce is two-shot over symmetric memory;
# beyond, NCCL. On 4 H200s inside a graph: 1 MiB in 15.9 us against NCCL's 28.6, 4 MiB in 33 against 50,
# 32 MiB in 204 against 190 (results/allreduce/nvidia-h200_x4_2026-11-28.json).
TWO_SHOT_MAX_TOKENS = 1024

# Up to this many (token, expert) rows per rank the MoE runs as two gemv-style kernels that read only the
# chosen experts' weights; beyond it, rows are sorted by expert and run as a grouped GEMM, which reads
# each expert once however many rows it gets.
GEMV_MAX_ROWS = 64

# Sorted rows: up to this many rows per expert on average, `moe_grouped_gemm` (small tiles, SwiGLU fused);
# beyond, torch's grouped_mm, whose large tiles win once each weight is reused enough. The H200 crossover:
# Triton faster at 32 rows per expert (512 sequences), slower at 64 (results/probe/h200_kernels_2026-11-28.json).
TRITON_GROUPED_MAX_ROWS_PER_EXPERT = 32


def _linear(x: torch.Tensor, weight: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """F.linear, with `gemv` for a single token: cuBLAS pays for tiles a single row cannot fill.
    A projection back to the hidden size (o, down) has its own tuned blocks."""
    if x.shape[0] != 1:
        return F.linear(x, weight)
    return gemv(x, weight, GEMV_BLOCKS["o" if weight.shape[0] == hidden_size else "qkv"])


def _qk_norm_rope_store(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float,
                        rotary: RotaryEmbedding, num_heads: int, num_kv_heads: int,
                        batch: ForwardBatch, cache: LayerCache) -> torch.Tensor:
    "The reference's signature, one kernel: norms, RoPE, and k and v into their slots."
    return qk_norm_rope_store(qkv, num_heads, num_kv_heads, rotary.head_dim, q_norm, k_norm, eps,
                              rotary.cos, rotary.sin, batch.positions, batch.out_slots, cache.k,
                              cache.v)


def _prefill_attention(q: torch.Tensor, cache: LayerCache, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
    """Prompts from their first token (nothing cached before): causal attention over the step's own
    keys, read back from their slots, through SDPA's FlashAttention; no mask is built."""
    seqs, longest = batch.num_seqs, batch.max_query_len
    # [tokens, kv heads, d]; index_select: a fraction of the host time of k[:, slots] per call.
    keys = cache.k.index_select(1, batch.out_slots).transpose(0, 1)
    values = cache.v.index_select(1, batch.out_slots).transpose(0, 1)
    same_length = seqs * longest == batch.num_tokens
    if same_length:
        pad = lambda t: t.view(seqs, longest, *t.shape[1:])
    else:
        offset = torch.arange(batch.num_tokens, device=q.device) - batch.query_starts[batch.token_seq]

        def pad(t):
            padded = t.new_zeros(seqs, longest, *t.shape[1:])
            padded[batch.token_seq, offset] = t
            return padded
    out = F.scaled_dot_product_attention(pad(q).transpose(1, 2), pad(keys).transpose(1, 2),
                                         pad(values).transpose(1, 2), is_causal=True, scale=scale,
                                         enable_gqa=True).transpose(1, 2)  # [seqs, longest, heads, d]
    return out.reshape(q.shape) if same_length else out[batch.token_seq, offset]


def _attention(q: torch.Tensor, cache: LayerCache, batch: ForwardBatch, scale: float) -> torch.Tensor:
    "Decode through the paged split-K kernel; fresh prompts through FlashAttention; else the reference."
    if batch.num_tokens == 0:
        return q
    if batch.is_decode:
        return decode_attention(q, cache.k, cache.v, cache.page_table, cache.page_size, batch.seq_rows,
                                batch.seq_lens, scale)
    if batch.no_prefix:
        return _prefill_attention(q, cache, batch, scale)
    return paged_attention(q, cache, batch, scale)


def _grouped_experts(experts: LocalExperts, rows: torch.Tensor, counts: torch.Tensor,
                     real_rows: int) -> torch.Tensor:
    """LocalExperts.forward (chapter 05) on rows sorted by expert: Triton for a few rows per expert,
    torch's grouped_mm beyond. `real_rows`: how many of the rows are real, where padding follows."""
    if real_rows <= TRITON_GROUPED_MAX_ROWS_PER_EXPERT * experts.num_local_experts:
        gate_up = moe_grouped_gemm(rows, experts.w13, counts, swiglu=True)
        return moe_grouped_gemm(gate_up, experts.w2, counts)
    return grouped_gemm(fused_silu_and_mul(grouped_gemm(rows, experts.w13, counts)), experts.w2, counts)


def _experts(rows: ExpertRows, experts: LocalExperts, gemv_max_rows: int = GEMV_MAX_ROWS):
    """A handful of rows: two gemv-style kernels that read only the chosen experts, in row order.
    More: a counting sort by expert (no host sync), then grouped GEMMs; the outputs stay sorted and
    `row_of_pair` says where each row's output is, for whoever gathers them next."""
    if rows.real_rows <= gemv_max_rows:
        h = moe_gate_up(rows.x, experts.w13, rows.experts, rows_per_x=rows.rows_per_x)
        return moe_down(h, experts.w2, rows.experts), None
    padded = rows.experts.numel() != rows.real_rows
    sorted_rows, counts, row_of_pair = counting_sort_by_expert(
        rows.x, rows.experts, experts.num_local_experts, rows.rows_per_x, with_padding=padded)
    return _grouped_experts(experts, sorted_rows, counts, rows.real_rows), row_of_pair


class TPAllReduce:
    "Sums over the TP group: symmetric memory up to its buffer, NCCL beyond (the same on every rank)."

    def __init__(self, ctx: ParallelContext, hidden_size: int, dtype: torch.dtype,
                 two_shot_max_tokens: int = TWO_SHOT_MAX_TOKENS):
        self.group, self.symmetric = ctx.tp_group, None
        if SymmetricAllReduce.supported(ctx.tp_group, ctx.device):
            self.symmetric = SymmetricAllReduce(
                ctx.tp_group, ctx.device, max(ONE_SHOT_MAX_TOKENS, two_shot_max_tokens) * hidden_size,
                dtype, ONE_SHOT_MAX_TOKENS * hidden_size)

    def __call__(self, x: torch.Tensor, group) -> torch.Tensor:
        if group is self.group and self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric(x)
        return all_reduce(x, group)


class FixedCapacityExchange(AllToAllExchange):
    """The EP exchange with messages of a fixed size, for steps every replica runs padded to one
    size (`batch.static_shapes`, as CUDA graphs need): every rank sends every peer `capacity` rows,
    real or padding (expert -1), so no split size ever reaches the host. Other steps: exact sizes."""

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, batch: ForwardBatch | None = None):
        if batch is None or not batch.static_shapes:
            return super().dispatch(x, topk_ids, batch)
        ep_size, local = self.ep_size, self.num_local_experts
        tokens, top_k = topk_ids.shape
        capacity = tokens * top_k  # the worst case: every row of this rank goes to one peer
        flat = topk_ids.flatten()                                 # [tokens * top_k]
        dest = flat // local
        # Each row's place among the rows to its destination: a scan along the last, contiguous
        # dimension of a [ep, rows] one-hot (a scan down the rows of [rows, ep] is ~30x slower).
        one_hot = F.one_hot(dest, ep_size).t().contiguous()      # [ep, rows]
        slot = (one_hot.cumsum(1) * one_hot).sum(0) - 1
        send = x.new_zeros(ep_size, capacity, x.shape[1])
        send_ids = torch.full((ep_size, capacity), -1, dtype=torch.int64, device=x.device)
        send[dest, slot] = x[torch.arange(flat.numel(), device=x.device) // top_k]
        send_ids[dest, slot] = flat - dest * local
        received = all_to_all(send.view(ep_size * capacity, -1), self.ep_group)
        received_ids = all_to_all(send_ids.view(-1), self.ep_group)
        # On average a rank receives `capacity` real rows; ep_size times that in the worst case.
        return ExpertRows(received, received_ids, 1, capacity), ("fixed", dest * capacity + slot)

    def combine(self, y: torch.Tensor, row_of_pair: torch.Tensor | None, state):
        if state[0] != "fixed":
            return super().combine(y, row_of_pair, state)
        if row_of_pair is not None:
            y = y[row_of_pair]          # back to the order the rows arrived in
        # Padding rows come back as garbage and are never read: pair p's row is dest * capacity + slot.
        return all_to_all(y, self.ep_group), state[1]


def fast_ops(ctx: ParallelContext, hidden_size: int, dtype: torch.dtype,
             two_shot_max_tokens: int = TWO_SHOT_MAX_TOKENS, gemv_max_rows: int = GEMV_MAX_ROWS) -> Ops:
    "Every operation through the kernels of Part II. Collective: every rank of the TP group calls it."
    def exchange(num_experts, ep_rank, ep_size, ep_group):
        if ep_size == 1:
            return LocalExchange()
        return FixedCapacityExchange(num_experts, ep_rank, ep_size, ep_group)
    return Ops(linear=functools.partial(_linear, hidden_size=hidden_size),
               all_reduce=TPAllReduce(ctx, hidden_size, dtype, two_shot_max_tokens),
               add_rms_norm=add_rms_norm, qk_norm_rope_store=_qk_norm_rope_store, attention=_attention,
               route=router_topk, experts=functools.partial(_experts, gemv_max_rows=gemv_max_rows),
               weighted_sum=weighted_sum, exchange=exchange, name="fast")
