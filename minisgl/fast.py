"""The forward pass rebuilt for speed on GPUs: fused Triton kernels, no host syncs, decode replayed as CUDA graphs.

It reads the weights of a `Qwen3MoeForCausalLM` in place and computes exactly what the model's own
forward computes (tested against it); only the number of kernels and host round trips changes."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import all_reduce, all_to_all
from .kernels.triton_kernels import (add_rms_norm, decode_attention, moe_down, moe_gate_up, qk_norm_rope_cache,
                                     silu_and_mul, topk_softmax, weighted_sum)
from .layers.attention import KVCache
from .layers.mlp import DenseMLP
from .model import Qwen3MoeForCausalLM
from .moe.experts import grouped_gemm

# Up to this many (token, expert) rows per rank the MoE runs as two gemv-style kernels that read only the
# chosen experts' weights; beyond it, rows are sorted by expert and run as a grouped GEMM, which reads
# each expert once however many rows it gets.
GEMV_MAX_ROWS = 64


def bucket(batch: int, sizes: tuple[int, ...]) -> int | None:
    "The smallest captured batch size that holds `batch` sequences."
    return next((s for s in sizes if s >= batch), None)


class FastForward:
    """Prefill and decode for one rank's model, with the kernels of chapter 09.

    Decode steps of `graph_batch_sizes` sequences (padded up to the next size) are captured once as
    CUDA graphs and replayed: one launch per step instead of ~500. With expert parallelism the
    graph needs fixed-size messages, so the all_to_alls send a fixed capacity of rows to every peer;
    that pays only for small batches, so EP graphs stop at `GEMV_MAX_ROWS // top_k` sequences."""

    def __init__(self, model: Qwen3MoeForCausalLM, graph_batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                 use_graphs: bool = True):
        self.model, self.ctx, self.config = model, model.ctx, model.config
        self.top_k = self.config.num_experts_per_tok
        if self.ctx.ep_size > 1:
            graph_batch_sizes = tuple(s for s in graph_batch_sizes if s * self.top_k <= GEMV_MAX_ROWS)
        self.graph_batch_sizes = tuple(sorted(graph_batch_sizes))
        self.use_graphs = use_graphs and self.ctx.device.type == "cuda"
        self.graphs = {}
        self.kv_cache = None

    # ---- the pieces of one layer -------------------------------------------------------------------
    def _attention_decode(self, layer, x, positions, rows, kv_lens, kv):
        attn = layer.self_attn
        qkv = F.linear(x, attn.qkv_proj.weight)
        q = qk_norm_rope_cache(qkv, attn.num_local_heads, attn.num_local_kv_heads, attn.head_dim,
                               attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, attn.rotary.cos,
                               attn.rotary.sin, positions, rows, kv[0], kv[1])
        out = decode_attention(q, kv[0], kv[1], rows, kv_lens, attn.scale)
        out = out.view(x.shape[0], attn.num_local_heads * attn.head_dim)  # [tokens, local heads * d]
        return all_reduce(F.linear(out, attn.o_proj.weight), self.ctx.tp_group)

    def _attention_prefill(self, layer, x, positions, rows, lens, first_row, kv):
        """Sequences in cache rows first_row, first_row + 1, ... start at position 0 with `lens[i]` tokens:
        causal flash attention, no mask."""
        attn = layer.self_attn
        qkv = F.linear(x, attn.qkv_proj.weight)
        q = qk_norm_rope_cache(qkv, attn.num_local_heads, attn.num_local_kv_heads, attn.head_dim,
                               attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, attn.rotary.cos,
                               attn.rotary.sin, positions, rows, kv[0], kv[1])
        seqs, longest = len(lens), max(lens)
        same_length = all(n == longest for n in lens)
        if same_length:
            q_padded = q.view(seqs, longest, *q.shape[1:])
        else:
            q_padded = q.new_zeros(seqs, longest, *q.shape[1:])
            q_padded[self._token_seq, self._token_offset] = q
        # The keys were just written to these cache rows: read them in place, no copy.
        rows_slice = slice(first_row, first_row + seqs)
        out = F.scaled_dot_product_attention(q_padded.transpose(1, 2), kv[0][rows_slice, :, :longest],
                                             kv[1][rows_slice, :, :longest], is_causal=True, scale=attn.scale,
                                             enable_gqa=True).transpose(1, 2)  # [seqs, longest, heads, d]
        out = out.reshape(q.shape) if same_length else out[self._token_seq, self._token_offset]
        return all_reduce(F.linear(out.reshape(x.shape[0], -1), attn.o_proj.weight), self.ctx.tp_group)

    def _moe(self, mlp, x, graph_safe: bool):
        if isinstance(mlp, DenseMLP):
            return mlp(x)
        weights, ids = topk_softmax(F.linear(x, mlp.gate.weight), self.top_k, mlp.norm_topk_prob)
        experts = mlp.experts
        if self.ctx.ep_size == 1:
            if x.shape[0] * self.top_k <= GEMV_MAX_ROWS:
                h = moe_gate_up(x, experts.w13, ids.flatten(), rows_per_x=self.top_k)
                out = moe_down(h, experts.w2, ids.flatten(), weights.flatten(), self.top_k)
            else:
                out = self._moe_sorted(experts, x, weights, ids)
        elif graph_safe:
            out = self._moe_fixed_capacity(experts, x, weights, ids)
        else:
            out = mlp.dispatcher.combine(*self._dispatch_eager(mlp, x, ids), weights)
        return all_reduce(out, self.ctx.tp_group)

    def _dispatch_eager(self, mlp, x, ids):
        expert_in, tokens_per_expert, state = mlp.dispatcher.dispatch(x, ids)
        return mlp.experts(expert_in, tokens_per_expert), state

    def _moe_sorted(self, experts, x, weights, ids):
        """No EP: sort (token, slot) rows by expert, one grouped GEMM per projection; no host sync.
        The scatter back to token order and the top-k weighted sum are one gathering kernel."""
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)                 # sorted row i is pair order[i]
        counts = torch.zeros(experts.num_local_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        h = silu_and_mul(grouped_gemm(x[order // self.top_k], experts.w13, counts))
        y = grouped_gemm(h, experts.w2, counts)                  # [tokens * top_k, hidden], expert order
        row_of_pair = torch.empty_like(order)
        row_of_pair[order] = torch.arange(order.numel(), device=x.device)
        return weighted_sum(y, weights, self.top_k, rows=row_of_pair)

    def _moe_fixed_capacity(self, experts, x, weights, ids):
        """EP with fixed-size messages (graph-safe): every rank sends every peer `capacity` rows, real or
        padding (expert id -1), so no split sizes need to reach the host."""
        ep_size, local = self.ctx.ep_size, experts.num_local_experts
        tokens, hidden = x.shape
        capacity = tokens * self.top_k  # worst case: every row of this rank goes to one peer
        flat = ids.flatten()                                     # [tokens * top_k]
        dest = flat // local
        one_hot = F.one_hot(dest, ep_size)                       # [rows, ep]
        slot = (one_hot.cumsum(0) * one_hot).sum(1) - 1          # index of each row among rows to its dest
        send = x.new_zeros(ep_size, capacity, hidden)
        send_ids = torch.full((ep_size, capacity), -1, dtype=torch.int64, device=x.device)
        send[dest, slot] = x[torch.arange(flat.numel(), device=x.device) // self.top_k]
        send_ids[dest, slot] = flat - dest * local
        recv = all_to_all(send.view(ep_size * capacity, hidden), self.ctx.ep_group)
        recv_ids = all_to_all(send_ids.view(-1), self.ctx.ep_group)
        h = moe_gate_up(recv, experts.w13, recv_ids, rows_per_x=1)
        y = moe_down(h, experts.w2, recv_ids, None, top_k=1)    # [ep * capacity, hidden], zeros for padding
        back = all_to_all(y, self.ctx.ep_group).view(ep_size, capacity, hidden)
        per_pair = back[dest, slot].view(tokens, self.top_k, hidden)
        return (per_pair.float() * weights.float()[..., None]).sum(dim=1).to(x.dtype)

    # ---- whole steps -------------------------------------------------------------------------------
    def _layers(self, hidden, attention, graph_safe):
        model, residual = self.model, None
        for i, layer in enumerate(model.layers):
            if residual is None:
                x, residual = add_rms_norm(hidden, layer.input_layernorm.weight, layer.input_layernorm.eps), hidden
            else:
                x, residual = add_rms_norm(hidden, layer.input_layernorm.weight, layer.input_layernorm.eps,
                                           residual)
            hidden = attention(layer, x, self.kv_cache.layer(i))
            x, residual = add_rms_norm(hidden, layer.post_attention_layernorm.weight,
                                       layer.post_attention_layernorm.eps, residual)
            hidden = self._moe(layer.mlp, x, graph_safe)
        normed, _ = add_rms_norm(hidden, model.norm.weight, model.norm.eps, residual)
        return normed

    def prepare(self, num_seqs: int, max_len: int, ep_max_seqs: int | None = None) -> int:
        "Allocate the KV cache (rows for the padded batch); returns the decode batch size every replica uses."
        padded = bucket(ep_max_seqs or num_seqs, self.graph_batch_sizes) or (ep_max_seqs or num_seqs)
        rows = max(padded, num_seqs, 1)
        cache = self.kv_cache
        if cache is None or cache.k.shape[1] < rows or cache.max_len < max_len:
            self.kv_cache, self.graphs = None, {}
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            self.kv_cache = self.model.make_kv_cache(rows, max_len)
        return padded

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], first_row: int = 0) -> torch.Tensor:
        """Logits [seqs, vocab] of each prompt's last token. Prompt i starts at position 0 in cache row
        first_row + i; several calls with increasing first_row prefill a large batch in chunks."""
        device = self.ctx.device
        lens = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        self._token_seq = torch.tensor([i for i, n in enumerate(lens) for _ in range(n)], dtype=torch.long,
                                       device=device)
        self._token_offset = torch.tensor([j for n in lens for j in range(n)], dtype=torch.long, device=device)
        positions, rows = self._token_offset, self._token_seq + first_row
        hidden = self.model.embed_tokens(tokens)
        if tokens.numel() == 0:
            hidden = self._layers(hidden, lambda layer, x, kv: self._attention_decode(
                layer, x, positions, rows, positions + 1, kv), graph_safe=False)
            return self.model.lm_head(hidden)  # an idle replica: empty, but it joined every collective
        hidden = self._layers(hidden, lambda layer, x, kv: self._attention_prefill(
            layer, x, positions, rows, lens, first_row, kv), graph_safe=False)
        last = torch.tensor(lens, dtype=torch.long, device=device).cumsum(0) - 1
        return self.model.lm_head(hidden[last])

    def _decode_eager(self, tokens, positions, fixed_shapes: bool):
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        kv_lens = positions + 1
        hidden = self.model.embed_tokens(tokens)
        hidden = self._layers(hidden, lambda layer, x, kv: self._attention_decode(
            layer, x, positions, rows, kv_lens, kv), graph_safe=fixed_shapes)
        return self.model.lm_head(hidden)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, padded: int) -> torch.Tensor:
        """One decode step for sequences in cache rows 0..n-1: tokens [n] at positions [n] -> logits [n, vocab].

        `padded` (from `prepare`, the same on every rank) is a bucket size: the step then runs that many
        rows, the extra ones computing garbage in spare cache rows, so its shapes are fixed and it can be
        a CUDA graph. Otherwise it runs eagerly on the n rows, with dynamic all_to_all splits."""
        n = tokens.shape[0]
        if padded not in self.graph_batch_sizes:
            return self._decode_eager(tokens, positions, fixed_shapes=False)
        if padded not in self.graphs:
            self._capture(padded)
        graph, static_tokens, static_positions, static_logits = self.graphs[padded]
        static_tokens[:n].copy_(tokens)
        static_positions[:n].copy_(positions)
        if graph is None:
            return self._decode_eager(static_tokens, static_positions, fixed_shapes=True)[:n]
        graph.replay()
        return static_logits[:n]

    def _capture(self, padded: int) -> None:
        device = self.ctx.device
        static_tokens = torch.zeros(padded, dtype=torch.long, device=device)
        static_positions = torch.zeros(padded, dtype=torch.long, device=device)
        if not self.use_graphs:  # CPU, or graphs switched off: same padded shapes, run eagerly
            self.graphs[padded] = (None, static_tokens, static_positions, None)
            return
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks algorithms, NCCL connects
                self._decode_eager(static_tokens, static_positions, fixed_shapes=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            static_logits = self._decode_eager(static_tokens, static_positions, fixed_shapes=True)
        self.graphs[padded] = (graph, static_tokens, static_positions, static_logits)
