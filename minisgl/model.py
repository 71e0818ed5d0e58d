"""The whole Qwen3-MoE causal LM over a tp x ep grid, with every collective visible in a forward (chapter 07)."""

# %% auto #0
__all__ = ['check_layout', 'DecoderLayer', 'Qwen3MoeForCausalLM']

import torch
from torch import nn

from minisgl.batch import ForwardBatch
from minisgl.config import ModelConfig
from minisgl.distributed import ParallelContext
from minisgl.kv_cache import KVCache, LayerCache
from minisgl.layers.attention import Qwen3Attention
from minisgl.layers.linear import divide, kv_heads_for_rank
from minisgl.layers.mlp import DenseMLP
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from minisgl.moe.experts import expert_slice
from minisgl.moe.layer import MoEBlock
from minisgl.ops import Ops, reference_ops
from minisgl.weights import WeightSource


def check_layout(config: ModelConfig, tp_size: int, ep_size: int) -> None:
    """Every split the layout needs, tried up front with the functions the layers split with; all
    failures at once, each naming its numbers."""
    checks = [lambda: divide(config.num_attention_heads, tp_size, "num_attention_heads"),
              lambda: divide(config.moe_intermediate_size, tp_size, "moe_intermediate_size"),
              lambda: kv_heads_for_rank(config.num_key_value_heads, 0, tp_size),
              lambda: expert_slice(config.num_experts, 0, ep_size)]
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        checks.append(lambda: divide(config.intermediate_size, tp_size, "intermediate_size"))
    problems = []
    for check in checks:
        try:
            check()
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x)).

    The layer passes (hidden, residual) on, and each norm adds the residual it receives first, so
    "add, then norm" is one operation (one pass over the activations for a fused kernel)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, layer_idx: int,
                 rotary: RotaryEmbedding, dtype=None, ops: Ops | None = None):
        super().__init__()
        eps, device, self.ops = config.rms_norm_eps, ctx.device, ops or reference_ops()
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = Qwen3Attention(config, ctx, rotary, dtype, ops=self.ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoEBlock(config, ctx, dtype, ops=self.ops)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, ctx.tp_rank,
                                ctx.tp_size, ctx.tp_group, dtype, device, ops=self.ops)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
                cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        "(hidden, residual) [tokens, hidden] each -> the same for the next layer."
        norm = self.input_layernorm
        x, residual = self.ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        hidden = self.self_attn(x, batch, cache)             # all-reduce over TP
        norm = self.post_attention_layernorm
        x, residual = self.ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return self.mlp(x, batch), residual                  # all_to_alls over EP, all-reduce over TP

    def load(self, source: WeightSource, prefix: str) -> None:
        self.input_layernorm.load(source, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(source, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(source, f"{prefix}.post_attention_layernorm.weight")
        self.mlp.load(source, f"{prefix}.mlp")


class Qwen3MoeForCausalLM(nn.Module):
    """The model one rank holds: its attention replica's heads, its experts' slices, its vocabulary rows.

    All ranks of a TP group see the same tokens (one attention replica); the EP group joins the
    replicas in the MoE layers. `ops` says how each operation is computed (plain PyTorch unless
    told otherwise); the forward is the same whichever it is."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype=torch.bfloat16,
                 max_positions: int | None = None, ops: Ops | None = None):
        super().__init__()
        check_layout(config, ctx.tp_size, ctx.ep_size)
        self.config, self.ctx, self.dtype = config, ctx, dtype
        self.ops = ops or reference_ops()
        device = ctx.device
        self.max_positions = max_positions or config.max_position_embeddings
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, self.max_positions, device)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp_rank,
                                                   ctx.tp_size, ctx.tp_group, dtype, device, ops=self.ops)
        self.layers = nn.ModuleList(DecoderLayer(config, ctx, i, self.rotary, dtype, ops=self.ops)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp_rank, ctx.tp_size,
                                      ctx.tp_group, dtype, device, ops=self.ops)

    def set_ops(self, ops: Ops) -> None:
        "Swap how every operation is computed, in every layer at once; the forward stays the same."
        for module in self.modules():
            if "ops" in vars(module) or "_ops" in vars(module):
                module.ops = ops

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        "The batch's tokens -> logits [seqs (or tokens, if batch.logits_index is None), vocab]."
        hidden = self.embed_tokens(batch.input_ids)  # [tokens, hidden], all-reduce over TP
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, batch, cache.layer(i))
        hidden, _ = self.ops.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps)
        if batch.logits_index is not None:
            hidden = hidden[batch.logits_index]  # [seqs, hidden]: only the tokens we sample from
        return self.lm_head(hidden)  # [n, vocab], all-gather over TP

    def make_kv_cache(self, num_pages: int, page_size: int, max_rows: int,
                      max_seq_len: int | None = None) -> KVCache:
        "A paged cache of `num_pages` pages for up to `max_rows` sequences, on this rank's KV heads."
        max_seq_len = max_seq_len or self.max_positions
        if max_seq_len > self.max_positions:
            raise ValueError(f"a KV cache of {max_seq_len} positions exceeds the model's "
                             f"{self.max_positions}")
        _, local_kv_heads = kv_heads_for_rank(self.config.num_key_value_heads, self.ctx.tp_rank,
                                              self.ctx.tp_size)
        return KVCache(self.config.num_hidden_layers, num_pages, page_size, local_kv_heads,
                       self.config.head_dim, max_rows, max_seq_len, self.dtype, self.ctx.device)

    @torch.no_grad()
    def load(self, source: WeightSource) -> None:
        "Copy in this rank's shard of every tensor; `source` checks each name and shape."
        self.embed_tokens.load(source, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            layer.load(source, f"model.layers.{i}")
        self.norm.load(source, "model.norm.weight")
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        self.lm_head.load(source, head)
