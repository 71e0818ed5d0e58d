"""Chapter 06: the loader reads only each rank's slices, refuses bad checkpoints by name, makes the same random
model in every layout, and measures the weights per GPU on the meta device."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisgl.config import parameters_per_rank, preset
from minisgl.distributed import ParallelContext, ParallelLayout
from minisgl.loader import (DummySource, SafetensorsSource, check_checkpoint, checkpoint_shapes, resolve_model_path,
                            save_random_checkpoint, weight_bytes)
from minisgl.model import Qwen3MoeForCausalLM
from minisgl.weights import CheckpointError, Shard

ALL_LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (2, 4), (8, 1), (1, 8)]


def build_rank(config, tp_size, ep_size, rank, device="cpu", dtype=torch.float32):
    "One rank's model, without process groups (loading needs none)."
    ctx = ParallelContext(ParallelLayout(tp_size, ep_size), rank, None, None, torch.device(device))
    return Qwen3MoeForCausalLM(config, ctx, dtype=dtype)


class RecordingSource(SafetensorsSource):
    "Records (name, shard, bytes) of every read."

    def __init__(self, model_dir):
        super().__init__(model_dir)
        self.reads = []

    def _read(self, name, shard):
        tensor = super()._read(name, shard)
        self.reads.append((name, shard, tensor.numel() * tensor.element_size()))
        return tensor


@pytest.fixture(scope="module")
def single_seed1(tmp_path_factory, tiny_config):
    "A single-file checkpoint holding the same weights as conftest's sharded_tiny_checkpoint (seed 1)."
    return save_random_checkpoint(tiny_config, tmp_path_factory.mktemp("single_seed1"), seed=1)


@pytest.fixture(scope="module")
def tiny_tensors(tiny_checkpoint):
    return load_file(tiny_checkpoint / "model.safetensors")


def test_expected_names_and_shapes_are_what_transformers_writes(tiny_checkpoint, sharded_tiny_checkpoint, tiny_config):
    for folder in (tiny_checkpoint, sharded_tiny_checkpoint):
        source = SafetensorsSource(folder)
        assert {name: source.shape(name) for name in source.names()} == checkpoint_shapes(tiny_config)
        check_checkpoint(source, tiny_config)


def test_sharded_and_single_file_checkpoints_load_identically(sharded_tiny_checkpoint, single_seed1, tiny_config):
    index = json.loads((sharded_tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for tp, ep in [(1, 1), (2, 2)]:
        for rank in range(tp * ep):
            from_sharded = build_rank(tiny_config, tp, ep, rank)
            from_sharded.load(SafetensorsSource(sharded_tiny_checkpoint))
            from_single = build_rank(tiny_config, tp, ep, rank)
            from_single.load(SafetensorsSource(single_seed1))
            for (name, a), (_, b) in zip(from_sharded.state_dict().items(), from_single.state_dict().items()):
                assert torch.equal(a, b), (tp, ep, rank, name)


@pytest.mark.parametrize("tp_size,ep_size", [(2, 2), (4, 1), (1, 4), (2, 4)])
def test_each_rank_reads_only_its_slices(sharded_tiny_checkpoint, tiny_config, tp_size, ep_size):
    shapes = checkpoint_shapes(tiny_config)
    held_bytes = sum(parameters_per_rank(tiny_config, tp_size, ep_size).values()) * 4  # float32
    experts_per_rank = tiny_config.num_experts // ep_size
    for rank in range(tp_size * ep_size):
        tp_rank, ep_rank = rank % tp_size, rank // tp_size
        source = RecordingSource(sharded_tiny_checkpoint)
        build_rank(tiny_config, tp_size, ep_size, rank).load(source)
        names = [name for name, _, _ in source.reads]
        assert len(names) == len(set(names)), "a tensor was read twice"
        assert sum(size for *_, size in source.reads) == held_bytes
        experts = {int(name.split(".")[5]) for name in names if ".experts." in name}
        assert experts == set(range(ep_rank * experts_per_rank, (ep_rank + 1) * experts_per_rank))
        for name, shard, _ in source.reads:
            if shard is None:  # replicated: norms and the router
                assert name.endswith("norm.weight") or name.endswith("mlp.gate.weight"), name
                continue
            # tp_size <= the tiny model's 4 KV heads, so every shard is the tp_rank-th of tp_size equal parts
            assert shard.length * tp_size == shapes[name][shard.dim], name
            assert shard.start == tp_rank * shard.length, name


def test_shards_are_slices_of_the_file(tiny_checkpoint, tiny_tensors, tiny_config):
    i = tiny_config.moe_intermediate_size // 2
    for rank in range(4):
        model = build_rank(tiny_config, 2, 2, rank)
        model.load(SafetensorsSource(tiny_checkpoint))
        tp_rank, ep_rank = rank % 2, rank // 2
        rows = slice(tp_rank * 160, (tp_rank + 1) * 160)
        assert torch.equal(model.embed_tokens.weight, tiny_tensors["model.embed_tokens.weight"][rows])
        assert torch.equal(model.lm_head.weight, tiny_tensors["lm_head.weight"][rows])
        experts = model.layers[1].mlp.experts
        for local in range(4):
            prefix = f"model.layers.1.mlp.experts.{ep_rank * 4 + local}"
            assert torch.equal(experts.w13[local, :i], tiny_tensors[f"{prefix}.gate_proj.weight"][tp_rank * i:(tp_rank + 1) * i])
            assert torch.equal(experts.w13[local, i:], tiny_tensors[f"{prefix}.up_proj.weight"][tp_rank * i:(tp_rank + 1) * i])
            assert torch.equal(experts.w2[local], tiny_tensors[f"{prefix}.down_proj.weight"][:, tp_rank * i:(tp_rank + 1) * i])


BAD_TENSORS = {
    "missing": "model.layers.1.mlp.experts.5.up_proj.weight",
    "unexpected": "model.layers.0.mlp.shared_expert.gate_proj.weight",
    "mis-shaped": "model.layers.0.self_attn.k_proj.weight",
}


@pytest.mark.parametrize("kind", list(BAD_TENSORS))
def test_bad_checkpoint_raises_checkpoint_error_naming_the_tensor(kind, tiny_tensors, tiny_config, tmp_path):
    name, tensors = BAD_TENSORS[kind], dict(tiny_tensors)
    if kind == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(32, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source = SafetensorsSource(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(repr(name))):
        check_checkpoint(source, tiny_config)
    if kind != "unexpected":  # loading alone also stops at the bad tensor, on a rank that reads it (experts 4-7)
        with pytest.raises(CheckpointError, match=re.escape(repr(name))):
            build_rank(tiny_config, 2, 2, rank=3).load(source)
    if kind == "mis-shaped":
        with pytest.raises(CheckpointError, match=re.escape("[32, 64]") + ".*" + re.escape("[64, 64]")):
            check_checkpoint(source, tiny_config)


def test_missing_file_or_directory_is_named(sharded_tiny_checkpoint, tiny_config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_tiny_checkpoint, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (broken / lost).unlink()
    with pytest.raises(CheckpointError, match=re.escape(lost)):
        check_checkpoint(SafetensorsSource(broken), tiny_config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        SafetensorsSource(tmp_path / "empty")


def test_dummy_source_is_layout_independent(tiny_config):
    shapes = checkpoint_shapes(tiny_config)
    source = DummySource(tiny_config, seed=3)
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.mlp.experts.6.down_proj.weight", "model.norm.weight"]:
        full = source.read(name, shapes[name])
        assert torch.equal(DummySource(tiny_config, seed=3).read(name, shapes[name]), full)  # any process, same tensor
        assert not torch.equal(DummySource(tiny_config, seed=4).read(name, shapes[name]), full)
        for dim, size in enumerate(shapes[name]):
            shard = source.read(name, shapes[name], Shard(dim, 1, size - 2))
            assert torch.equal(shard, full.narrow(dim, 1, size - 2)), (name, dim)

    one_gpu = build_rank(tiny_config, 1, 1, 0)
    one_gpu.load(DummySource(tiny_config, seed=3))
    i = tiny_config.moe_intermediate_size // 2
    for rank in range(4):
        model = build_rank(tiny_config, 2, 2, rank)
        model.load(DummySource(tiny_config, seed=3))
        tp_rank, ep_rank = rank % 2, rank // 2
        rows, experts = slice(tp_rank * 160, (tp_rank + 1) * 160), slice(ep_rank * 4, (ep_rank + 1) * 4)
        full_experts = one_gpu.layers[0].mlp.experts
        assert torch.equal(model.embed_tokens.weight, one_gpu.embed_tokens.weight[rows])
        assert torch.equal(model.lm_head.weight, one_gpu.lm_head.weight[rows])
        assert torch.equal(model.layers[0].mlp.experts.w2, full_experts.w2[experts, :, tp_rank * i:(tp_rank + 1) * i])
        assert torch.equal(model.layers[0].mlp.experts.w13[:, :i],
                           full_experts.w13[experts, tp_rank * i:(tp_rank + 1) * i])
        assert torch.equal(model.norm.weight, one_gpu.norm.weight)


@pytest.mark.parametrize("tp_size,ep_size", ALL_LAYOUTS)
def test_meta_weight_bytes_equal_the_formula(tp_size, ep_size):
    qwen3 = preset("qwen3-30b-a3b")
    expected = sum(parameters_per_rank(qwen3, tp_size, ep_size).values()) * 2
    for rank in sorted({0, tp_size * ep_size - 1}):
        model = build_rank(qwen3, tp_size, ep_size, rank, device="meta", dtype=torch.bfloat16)
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()]), "something was allocated"
        assert weight_bytes(model) == expected


def test_seed_memory_claims():
    "The seed project's ~15 GB (TP=2,EP=2) and ~8 GB (TP=2,EP=4) per GPU, which are GiB."
    qwen3 = preset("qwen3-30b-a3b")
    gib = {(tp, ep): weight_bytes(build_rank(qwen3, tp, ep, 0, "meta", torch.bfloat16)) / 2**30
           for tp, ep in [(2, 2), (2, 4)]}
    assert round(gib[2, 2]) == 15 and round(gib[2, 4]) == 8


def test_resolve_model_path(tiny_checkpoint, tmp_path, monkeypatch):
    assert resolve_model_path(str(tiny_checkpoint)) == tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory or a hub id"):
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once, clearly
    with pytest.raises(FileNotFoundError, match="could not download 'nobody/no-such-model'"):
        resolve_model_path("nobody/no-such-model", include_weights=False)
