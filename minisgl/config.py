"""The model's shape: a Hugging Face `config.json` of `qwen3_moe`, read into one dataclass."""

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    "Every number the engine needs to build Qwen3-MoE, and nothing else."
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int  # the dense MLP of layers listed in `mlp_only_layers`
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def is_moe_layer(self, layer_idx: int) -> bool:
        "Mirrors transformers: a layer is sparse unless listed in `mlp_only_layers` or skipped by the step."
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, hf: dict) -> "ModelConfig":
        "Read a `config.json` dict in either spelling: the hub's or transformers 5's `save_pretrained`."
        if hf.get("model_type") != "qwen3_moe":
            raise ValueError(f"model_type is {hf.get('model_type')!r}; minisgl builds only 'qwen3_moe'")
        _reject_unsupported(hf)

        def need(*names):
            for name in names:
                if hf.get(name) is not None:
                    return hf[name]
            raise ValueError(f"config.json has no {' or '.join(repr(n) for n in names)}")

        rope = hf.get("rope_parameters") or {}
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=need("num_key_value_heads"),
            head_dim=hf.get("head_dim") or need("hidden_size") // need("num_attention_heads"),
            num_experts=need("num_experts", "num_local_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            moe_intermediate_size=need("moe_intermediate_size"),
            intermediate_size=hf.get("intermediate_size") or 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or need("rope_theta")),
            max_position_embeddings=need("max_position_embeddings"),
            decoder_sparse_step=hf.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, path_or_dir: str | Path) -> "ModelConfig":
        "Read `config.json` from a checkpoint directory, or from the file itself."
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict:
        "The transformers 5 spelling, so `Qwen3MoeConfig(**config.to_hf_dict())` builds the reference."
        return {
            "model_type": "qwen3_moe", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size, "intermediate_size": self.intermediate_size,
            "norm_topk_prob": self.norm_topk_prob, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "decoder_sparse_step": self.decoder_sparse_step, "mlp_only_layers": list(self.mlp_only_layers),
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
        }

    def parameter_counts(self) -> dict[str, int]:
        "Parameters by component, from the shapes alone."
        h, d = self.hidden_size, self.head_dim
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        dense_layers = self.num_hidden_layers - moe_layers
        attention = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * d
        return {
            "embedding": self.vocab_size * h,
            "attention": self.num_hidden_layers * attention,
            "router": moe_layers * self.num_experts * h,
            "experts": moe_layers * self.num_experts * 3 * h * self.moe_intermediate_size,
            "dense_mlp": dense_layers * 3 * h * self.intermediate_size,
            "norms": self.num_hidden_layers * 2 * h + h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
        }

    def active_parameter_counts(self) -> dict[str, int]:
        "Parameters one decoded token reads: its top-k experts, not all of them, and one embedding row."
        counts = self.parameter_counts()
        counts["experts"] = counts["experts"] * self.num_experts_per_tok // max(self.num_experts, 1)
        counts["embedding"] = self.hidden_size
        if self.tie_word_embeddings:
            counts["lm_head"] = self.vocab_size * self.hidden_size
        return counts


def _reject_unsupported(hf: dict) -> None:
    "Fail loudly on config features this engine does not implement, instead of computing something else."
    scaling = hf.get("rope_scaling") or {}
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"rope type {rope_type!r} is not supported (only the default RoPE)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window is true; minisgl implements full attention only")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias is true; Qwen3-MoE has no attention biases and minisgl implements none")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act is {hf['hidden_act']!r}; only 'silu' is supported")


# The hub's config.json of Qwen/Qwen3-30B-A3B, verbatim in the fields we read.
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}

# A model small enough for a laptop that still exercises every code path: 8 query heads over
# 4 KV heads (so tp=8 must replicate KV heads), 8 experts (ep up to 8), intermediate sizes
# divisible by 8 (tp up to 8), and a byte-level vocabulary (256 bytes + specials).
TINY_CONFIG = {
    "model_type": "qwen3_moe", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 128, "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512, "bos_token_id": 256,
    "eos_token_id": 257, "torch_dtype": "float32", "tie_word_embeddings": False,
}

PRESETS = {"qwen3-30b-a3b": QWEN3_30B_A3B_CONFIG, "tiny": TINY_CONFIG}


def preset(name: str) -> ModelConfig:
    "A built-in shape by name: 'qwen3-30b-a3b' (the real model) or 'tiny' (for CPUs)."
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name])
