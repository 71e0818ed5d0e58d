"""Chapter 02: every tensor-parallel linear layer and the dense MLP equal their unsharded float32 computation."""

import pytest
import torch
import torch.nn.functional as F

from minisgl.distributed import ParallelContext, run_on_ranks
from minisgl.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear, divide, kv_heads_for_rank)
from minisgl.layers.mlp import DenseMLP, silu_and_mul
from minisgl.weights import CheckpointError, Shard, StateDictSource

TP_SIZES = (1, 2, 4)
TOL = 1e-5


def random_weights(config, seed: int) -> dict[str, torch.Tensor]:
    "Full, unsharded weights in checkpoint layout [out, in], scaled like a trained model."
    g = torch.Generator().manual_seed(seed)
    h, m, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"col": (m, h), "row": (h, m), "gate": (m, h), "up": (m, h),
              "q": (config.num_attention_heads * d, h), "k": (config.num_key_value_heads * d, h),
              "v": (config.num_key_value_heads * d, h),
              "mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h), "mlp.down_proj.weight": (h, m)}
    return {name: torch.randn(shape, generator=g) / shape[1] ** 0.5 for name, shape in shapes.items()}


def all_layers_on_rank(config, source, x, z, tp_sizes):
    "Each layout's sharded layers on this rank: local outputs of column layers, full outputs of row layers."
    import torch.distributed as dist
    h, m, d = config.hidden_size, config.intermediate_size, config.head_dim
    out = {}
    for tp in tp_sizes:
        ctx = ParallelContext.from_process_group(tp, dist.get_world_size() // tp)
        r, f32 = ctx.tp_rank, torch.float32
        col = ColumnParallelLinear(h, m, r, tp, dtype=f32)
        row = RowParallelLinear(m, h, r, tp, ctx.tp_group, dtype=f32)
        partial = RowParallelLinear(m, h, r, tp, reduce_results=False, dtype=f32)
        merged = MergedColumnParallelLinear(h, [m, m], r, tp, dtype=f32)
        qkv = QKVParallelLinear(h, d, config.num_attention_heads, config.num_key_value_heads, r, tp, dtype=f32)
        mlp = DenseMLP(h, m, r, tp, ctx.tp_group, dtype=f32)
        col.load(source, "col"), row.load(source, "row"), partial.load(source, "row")
        merged.load(source, ["gate", "up"]), qkv.load(source, "q", "k", "v"), mlp.load(source, "mlp")
        z_local = z[:, r * (m // tp):(r + 1) * (m // tp)]  # the row layer's input: this rank's features
        out[tp] = {"tp_rank": r, "col": col(x), "row": row(z_local), "partial": partial(z_local),
                   "merged": merged(x), "qkv": qkv(x).split(qkv.output_sizes, dim=-1),
                   "kv_start": qkv.kv_head_start, "mlp": mlp(x)}
    return out


def test_parallel_layers_match_unsharded(tiny_config):
    config = tiny_config
    weights = random_weights(config, seed=11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(10, config.hidden_size, generator=g)
    z = torch.randn(10, config.intermediate_size, generator=g)
    per_rank = run_on_ranks(all_layers_on_rank, 4, config, StateDictSource(weights), x, z, TP_SIZES)

    m, d = config.intermediate_size, config.head_dim
    col_ref = F.linear(x, weights["col"])
    row_ref = F.linear(z, weights["row"])
    gate_ref, up_ref = F.linear(x, weights["gate"]), F.linear(x, weights["up"])
    heads = {n: F.linear(x, weights[n]).view(len(x), -1, d) for n in "qkv"}
    w = {n: weights[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")}
    mlp_ref = F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])

    for tp in TP_SIZES:
        n, q_per_rank = m // tp, config.num_attention_heads // tp
        for rank, results in enumerate(per_rank):
            res = results[tp]
            r = res["tp_rank"]
            assert r == rank % tp
            cols = slice(r * n, (r + 1) * n)
            torch.testing.assert_close(res["col"], col_ref[:, cols], atol=TOL, rtol=0)
            torch.testing.assert_close(res["row"], row_ref, atol=TOL, rtol=0)
            gate, up = res["merged"].split(n, dim=-1)
            torch.testing.assert_close(gate, gate_ref[:, cols], atol=TOL, rtol=0)
            torch.testing.assert_close(up, up_ref[:, cols], atol=TOL, rtol=0)
            q, k, v = (t.view(len(x), -1, d) for t in res["qkv"])
            kv_start, kv_count = kv_heads_for_rank(config.num_key_value_heads, r, tp)
            assert res["kv_start"] == kv_start
            torch.testing.assert_close(q, heads["q"][:, r * q_per_rank:(r + 1) * q_per_rank], atol=TOL, rtol=0)
            torch.testing.assert_close(k, heads["k"][:, kv_start:kv_start + kv_count], atol=TOL, rtol=0)
            torch.testing.assert_close(v, heads["v"][:, kv_start:kv_start + kv_count], atol=TOL, rtol=0)
            torch.testing.assert_close(res["mlp"], mlp_ref, atol=TOL, rtol=0)
        # without the all-reduce, the partial outputs of one TP group add up to the full output
        group = [per_rank[i][tp]["partial"] for i in range(tp)]
        torch.testing.assert_close(sum(group), row_ref, atol=TOL, rtol=0)
        if tp > 1:
            assert (group[0] - row_ref).abs().max() > 1e-3


def test_qkv_replicates_kv_heads_when_tp_exceeds_them(tiny_config):
    "tp 8 over 4 KV heads: rank r holds query head r and KV head r // 2 (column layers need no group)."
    config, tp = tiny_config, 8
    weights = random_weights(config, seed=13)
    x = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(14))
    d = config.head_dim
    full_k = F.linear(x, weights["k"]).view(4, -1, d)
    full_v = F.linear(x, weights["v"]).view(4, -1, d)
    for r in range(tp):
        qkv = QKVParallelLinear(config.hidden_size, d, config.num_attention_heads, config.num_key_value_heads, r, tp,
                                dtype=torch.float32)
        qkv.load(StateDictSource(weights), "q", "k", "v")
        assert (qkv.num_local_heads, qkv.kv_head_start, qkv.num_local_kv_heads) == (1, r // 2, 1)
        q, k, v = qkv(x).split(qkv.output_sizes, dim=-1)
        torch.testing.assert_close(k, full_k[:, r // 2], atol=TOL, rtol=0)
        torch.testing.assert_close(v, full_v[:, r // 2], atol=TOL, rtol=0)
    assert [kv_heads_for_rank(4, r, 8)[0] for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("build, numbers", [
    (lambda: ColumnParallelLinear(64, 100, 0, 8), ("100", "8")),
    (lambda: RowParallelLinear(100, 64, 0, 8), ("100", "8")),
    (lambda: MergedColumnParallelLinear(64, [128, 100], 0, 8), ("100", "8")),
    (lambda: QKVParallelLinear(64, 16, 8, 4, 0, 3), ("num_attention_heads", "8", "3")),
    (lambda: QKVParallelLinear(64, 16, 12, 4, 0, 3), ("num_key_value_heads", "4", "3")),
    (lambda: QKVParallelLinear(64, 16, 12, 4, 0, 6), ("6", "4")),
    (lambda: DenseMLP(64, 100, 0, 8), ("100", "8")),
    (lambda: divide(6144, 5, "intermediate_size"), ("intermediate_size", "6144", "5")),
])
def test_bad_divisors_raise_value_error_naming_the_numbers(build, numbers):
    with pytest.raises(ValueError) as err:
        build()
    for number in numbers:
        assert number in str(err.value), (number, str(err.value))


def test_weight_source_checks_names_and_shapes_and_hands_out_views():
    full = torch.arange(24.0).view(6, 4)
    source = StateDictSource({"model.w": full})
    part = source.read("model.w", (6, 4), Shard(1, 2, 2))
    assert torch.equal(part, full[:, 2:4]) and part.data_ptr() == full[0, 2].data_ptr()
    with pytest.raises(CheckpointError, match="model.missing"):
        source.read("model.missing", (6, 4))
    with pytest.raises(CheckpointError, match=r"model\.w.*\[6, 4\].*\[6, 5\]"):
        source.read("model.w", (6, 5))
    layer = ColumnParallelLinear(4, 6, 0, 2, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="model.w"):
        layer.load(StateDictSource({"model.w": torch.zeros(6, 5)}), "model.w")


def test_silu_and_mul():
    gate_up = torch.randn(3, 8)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate_up[:, :4]) * gate_up[:, 4:])
