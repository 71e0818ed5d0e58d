"""Chapter 06: the loader reads only each rank's slices, refuses bad checkpoints by name, makes the same random
model in every layout, and measures the weights per GPU on the meta device."""

import dataclasses
import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisgl.config import parameters_per_rank, preset
from minisgl.distributed import ParallelContext, ParallelLayout
from minisgl.loader import (DummySource, SafetensorsSource, check_checkpoint, checkpoint_shapes, resolve_model_path,
                            save_random_checkpoint, weight_bytes)
from minisgl.model import Qwen3MoeForCausalLM
from minisgl.weights import CheckpointError, Shard, StateDictSource

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
    # A damaged index, or one without its weight_map, is named too.
    (broken / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm')
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        SafetensorsSource(broken)
    for listing in ('{"metadata": {}}', '["model.norm.weight"]'):
        (broken / "model.safetensors.index.json").write_text(listing)
        with pytest.raises(CheckpointError, match="model.safetensors.index.json.*weight_map"):
            SafetensorsSource(broken)


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


def test_weight_count_with_a_vocabulary_tp_does_not_divide():
    "258 tokens (bytes and two specials) over 4 ranks: 65 whole rows each, as the embedding allocates them."
    import dataclasses
    config = dataclasses.replace(preset("tiny"), vocab_size=258)
    for tp_size in (2, 4):
        model = build_rank(config, tp_size, 1, 0, device="meta", dtype=torch.bfloat16)
        assert weight_bytes(model) == sum(parameters_per_rank(config, tp_size, 1).values()) * 2


def test_memory_per_gpu_in_gib():
    "The ~15 GiB (TP=2, EP=2) and ~8 GiB (TP=2, EP=4) per GPU quoted for Qwen3-30B-A3B."
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


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_or_bool_weight_is_a_checkpoint_error(dtype, tiny_tensors, tiny_config, tmp_path):
    "Right shape, wrong kind of number: named with its dtype, from the header and when a rank reads it."
    name = "model.layers.1.mlp.experts.5.up_proj.weight"  # held by rank 3 of TP=2 x EP=2 (experts 4-7)
    tensors = dict(tiny_tensors)
    tensors[name] = torch.ones(tensors[name].shape, dtype=dtype)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source = SafetensorsSource(tmp_path)
    message = re.escape(repr(name)) + ".*" + str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint(source, tiny_config)
    with pytest.raises(CheckpointError, match=message):
        build_rank(tiny_config, 2, 2, rank=3).load(source)
    build_rank(tiny_config, 2, 2, rank=0).load(source)  # ranks that do not hold it load fine
    with pytest.raises(CheckpointError, match=message):  # every source, not only files
        StateDictSource(tensors).read(name, tuple(tensors[name].shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float_weights_are_cast_and_nan_loads_as_is(dtype, tiny_tensors, tiny_config, tmp_path):
    "Any float dtype is cast by the copy into the parameter; NaN and Inf are legal values, loaded unchanged."
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors = {n: t.to(dtype) for n, t in tiny_tensors.items()}
    tensors[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    check_checkpoint(SafetensorsSource(tmp_path), tiny_config)
    model = build_rank(tiny_config, 1, 1, 0)
    model.load(SafetensorsSource(tmp_path))
    torch.testing.assert_close(model.layers[0].self_attn.o_proj.weight, tensors[name].float(),
                               rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(model.embed_tokens.weight, tensors["model.embed_tokens.weight"].float(),
                               rtol=0, atol=0)


def test_every_source_builds_its_names_once(tiny_checkpoint, tiny_config, tiny_tensors):
    "A read looks its name up in names(): a set rebuilt per call makes loading quadratic in the tensor count."
    for source in (SafetensorsSource(tiny_checkpoint), DummySource(tiny_config), StateDictSource(tiny_tensors)):
        names = source.names()
        assert isinstance(names, frozenset) and source.names() is names, type(source).__name__
        assert names == set(checkpoint_shapes(tiny_config))


# Tiny dimensions, 24 layers of 8 or 128 experts: 795 or 9,435 tensors. Loading either takes well under a second,
# and the larger is big enough for a per-read cost of ~10 ns per tensor name (a set of names rebuilt on every read,
# as the sources once did) to show: ~100 us per read, against ~20 us for reading a tiny tensor. With that cost the
# tests below measured 5-11x growth.
FEW_EXPERTS, MANY_EXPERTS = 8, 128


@pytest.fixture(scope="module")
def few_and_many(tiny_config, tmp_path_factory):
    "{experts: (config, checkpoint dir)}, written straight with safetensors (the first test checks the names)."
    sizes = {}
    for experts in (FEW_EXPERTS, MANY_EXPERTS):
        config = dataclasses.replace(tiny_config, num_hidden_layers=24, num_experts=experts)
        folder = tmp_path_factory.mktemp(f"experts{experts}")
        save_file({name: torch.zeros(shape) for name, shape in checkpoint_shapes(config).items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
        sizes[experts] = config, folder
    return sizes


def seconds_per_tensor(config, run, repeats=3) -> float:
    "The fastest of `repeats` runs (the one least disturbed by a busy machine), per tensor of the checkpoint."
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) / len(checkpoint_shapes(config))


@pytest.mark.parametrize("kind", ["safetensors", "dummy"])
def test_loading_time_is_linear_in_the_tensor_count(kind, few_and_many):
    per_tensor = {}
    for experts, (config, folder) in few_and_many.items():
        model = build_rank(config, 1, 1, 0)
        make_source = {"safetensors": lambda: SafetensorsSource(folder), "dummy": lambda: DummySource(config)}[kind]
        per_tensor[experts] = seconds_per_tensor(config, lambda: model.load(make_source()))
    growth = per_tensor[MANY_EXPERTS] / per_tensor[FEW_EXPERTS]
    assert growth < 3, f"{kind}: a read costs {growth:.1f}x as much with ~12x the tensors"


def test_check_checkpoint_time_is_linear_in_the_tensor_count(few_and_many):
    per_tensor = {experts: seconds_per_tensor(config, lambda: check_checkpoint(SafetensorsSource(folder), config), 5)
                  for experts, (config, folder) in few_and_many.items()}
    growth = per_tensor[MANY_EXPERTS] / per_tensor[FEW_EXPERTS]
    assert growth < 3, f"check_checkpoint costs {growth:.1f}x as much per tensor with ~12x the tensors"
