"""The whole Qwen3-MoE causal LM over a tp x ep grid, with every collective visible in a forward."""

import torch
from torch import nn

from .config import ModelConfig
from .distributed import ParallelContext
from .layers.attention import AttentionBatch, KVCache, Qwen3Attention
from .layers.linear import kv_heads_for_rank
from .layers.mlp import DenseMLP
from .layers.norm import RMSNorm
from .layers.rotary import RotaryEmbedding
from .layers.vocab import ParallelLMHead, VocabParallelEmbedding
from .moe.layer import MoEBlock
from .weights import WeightSource


def check_layout(config: ModelConfig, tp_size: int, ep_size: int) -> None:
    "Every divisibility the layout needs, checked up front, each failure naming its numbers."
    problems = []
    for what, size, parts, by in [("num_attention_heads", config.num_attention_heads, tp_size, "tp_size"),
                                  ("moe_intermediate_size", config.moe_intermediate_size, tp_size, "tp_size"),
                                  ("num_experts", config.num_experts, ep_size, "ep_size")]:
        if size % parts:
            problems.append(f"{what} ({size}) is not divisible by {by} ({parts})")
    dense_layers = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    if dense_layers and config.intermediate_size % tp_size:
        problems.append(f"intermediate_size ({config.intermediate_size}) is not divisible by tp_size ({tp_size})")
    kv = config.num_key_value_heads
    if (tp_size <= kv and kv % tp_size) or (tp_size > kv and tp_size % kv):
        problems.append(f"num_key_value_heads ({kv}) and tp_size ({tp_size}): one must divide the other")
    if problems:
        raise ValueError("; ".join(problems))


class DecoderLayer(nn.Module):
    "Pre-norm residual block: x + attention(norm(x)), then x + moe(norm(x))."

    def __init__(self, config: ModelConfig, ctx: ParallelContext, layer_idx: int, rotary: RotaryEmbedding,
                 dtype=None):
        super().__init__()
        eps, device = config.rms_norm_eps, ctx.device
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = Qwen3Attention(config, ctx, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoEBlock(config, ctx, dtype)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, ctx.tp_rank, ctx.tp_size,
                                ctx.tp_group, dtype, device)

    def forward(self, hidden: torch.Tensor, batch: AttentionBatch, kv_cache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), batch, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def load(self, source: WeightSource, prefix: str) -> None:
        self.input_layernorm.load(source, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(source, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(source, f"{prefix}.post_attention_layernorm.weight")
        self.mlp.load(source, f"{prefix}.mlp")


class Qwen3MoeForCausalLM(nn.Module):
    """The model one rank holds: its attention replica's heads, its experts' slices, its vocabulary rows.

    All ranks of a TP group see the same tokens (one attention replica); the EP group joins the
    replicas in the MoE layers."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype=torch.bfloat16,
                 max_positions: int | None = None):
        super().__init__()
        check_layout(config, ctx.tp_size, ctx.ep_size)
        self.config, self.ctx, self.dtype = config, ctx, dtype
        device = ctx.device
        self.max_positions = max_positions or config.max_position_embeddings
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, self.max_positions, device)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp_rank, ctx.tp_size,
                                                   ctx.tp_group, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(config, ctx, i, self.rotary, dtype)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp_rank, ctx.tp_size,
                                      ctx.tp_group, dtype, device)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        "input_ids: [tokens] packed over sequences -> logits [len(logits_index) or tokens, vocab]."
        hidden = self.embed_tokens(input_ids)  # [tokens, hidden]
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, batch, kv_cache.layer(i))
        if logits_index is not None:
            hidden = hidden[logits_index]  # only the positions we sample from
        return self.lm_head(self.norm(hidden))

    def make_kv_cache(self, max_seqs: int, max_len: int) -> KVCache:
        if max_len > self.max_positions:
            raise ValueError(f"a KV cache of {max_len} positions exceeds the model's {self.max_positions}")
        _, local_kv_heads = kv_heads_for_rank(self.config.num_key_value_heads, self.ctx.tp_rank, self.ctx.tp_size)
        return KVCache(self.config.num_hidden_layers, max_seqs, max_len, local_kv_heads, self.config.head_dim,
                       self.dtype, self.ctx.device)

    @torch.no_grad()
    def load(self, source: WeightSource) -> None:
        "Copy in this rank's shard of every tensor; `source` checks each name and shape."
        self.embed_tokens.load(source, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            layer.load(source, f"model.layers.{i}")
        self.norm.load(source, "model.norm.weight")
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        self.lm_head.load(source, head)
