"""Weights from a Hugging Face checkpoint (each rank reads only its slices) or random at full size."""

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .weights import CheckpointError, Shard, WeightSource


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    "Every tensor a Qwen3-MoE checkpoint of this shape holds, under its Hugging Face name."
    h, d, i = config.hidden_size, config.head_dim, config.moe_intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (config.num_attention_heads * d, h),
            f"{p}.self_attn.k_proj.weight": (config.num_key_value_heads * d, h),
            f"{p}.self_attn.v_proj.weight": (config.num_key_value_heads * d, h),
            f"{p}.self_attn.o_proj.weight": (h, config.num_attention_heads * d),
            f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,),
        })
        if config.is_moe_layer(layer):
            shapes[f"{p}.mlp.gate.weight"] = (config.num_experts, h)
            for e in range(config.num_experts):
                shapes.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (i, h),
                               f"{p}.mlp.experts.{e}.up_proj.weight": (i, h),
                               f"{p}.mlp.experts.{e}.down_proj.weight": (h, i)})
        else:
            n = config.intermediate_size
            shapes.update({f"{p}.mlp.gate_proj.weight": (n, h), f"{p}.mlp.up_proj.weight": (n, h),
                           f"{p}.mlp.down_proj.weight": (h, n)})
    return shapes


class SafetensorsSource(WeightSource):
    """A checkpoint directory: `model.safetensors`, or shards listed in `model.safetensors.index.json`.

    Files are memory-mapped and opened only when one of their tensors is read; a shard read copies
    just its slice, so no rank ever holds the whole checkpoint."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.file_of = {name: single.name for name in f.keys()}
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.model_dir}")
        self._handles = {}

    def _open(self, name: str):
        file = self.file_of[name]
        if file not in self._handles:
            path = self.model_dir / file
            if not path.is_file():
                raise CheckpointError(f"tensor {name!r} is listed in {path.name}, which is missing")
            self._handles[file] = safe_open(path, framework="pt")
        return self._handles[file].get_slice(name)

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(name).get_shape())

    def _read(self, name: str, shard: Shard | None) -> torch.Tensor:
        view = self._open(name)
        if shard is None:
            return view[:]
        index = [slice(None)] * shard.dim + [slice(shard.start, shard.start + shard.length)]
        return view[tuple(index)]


class DummySource(WeightSource):
    """Random weights at the full shape, made on the device: for benchmarks without a checkpoint.

    Each tensor is drawn from a generator seeded by its name, in full, then sliced, so every layout
    gets the same model and their outputs can be compared. Norm weights are near 1, the rest N(0, std)."""

    def __init__(self, config: ModelConfig, seed: int = 0, device=None, std: float = 0.02):
        self.shapes = checkpoint_shapes(config)
        self.seed, self.device, self.std = seed, torch.device(device or "cpu"), std

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def _read(self, name: str, shard: Shard | None) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + zlib.crc32(name.encode()))
        full = torch.randn(self.shapes[name], generator=generator, device=self.device)
        full = 1.0 + 0.1 * full if name.endswith("norm.weight") else self.std * full
        return full if shard is None else shard.of(full)


def check_checkpoint(source: WeightSource, config: ModelConfig) -> None:
    "Names and shapes of the whole checkpoint against the config, from headers only; errors name the tensor."
    expected = checkpoint_shapes(config)
    names = source.names()
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"the checkpoint has a tensor the config does not explain: {unexpected[0]!r}" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in expected.items():
        actual = tuple(source.shape(name))
        if actual != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(actual)} in the checkpoint; "
                                  f"the config implies {list(shape)}")


def resolve_model_path(path_or_hub_id: str) -> Path:
    "A local checkpoint directory as is; anything else is a hub id, downloaded (config, weights, tokenizer)."
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_hub_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_hub_id!r} is not a checkpoint directory or a hub id like 'Qwen/Qwen3-30B-A3B'")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                       "tokenizer*", "merges.txt", "vocab.json"]))
    except Exception as exc:
        raise FileNotFoundError(f"could not download {path_or_hub_id!r} from the Hugging Face hub: {exc}") from exc


def weight_bytes(model: torch.nn.Module) -> int:
    "Bytes of the parameters this rank holds (works on the meta device, where nothing is allocated)."
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_random_checkpoint(config: ModelConfig, model_dir: str | Path, seed: int = 0,
                           max_shard_size: str | None = None) -> Path:
    """Write a random Qwen3-MoE checkpoint with transformers' own `save_pretrained`: the real file layout and
    key names, at any size. For tests, notebooks and laptops; needs transformers.

    The weights are scaled so a tiny model's logits are far from uniform (distinct greedy tokens make
    parity tests sharp): embeddings N(0, 1), router N(0, 0.5), other matrices N(0, 0.1), norms near 1.
    `max_shard_size` (e.g. "100KB") splits the file and writes `model.safetensors.index.json`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config.to_hf_dict()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(model_dir, **kwargs)
    return Path(model_dir)
