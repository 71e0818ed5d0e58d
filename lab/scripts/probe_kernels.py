#!/usr/bin/env python
"""Sweep and compare three kernels of chapter 09 on one GPU at the real Qwen3-30B-A3B shape, each timed as
a CUDA graph (no launch overhead) and checked against the path it would replace:

- `moe_grouped_gemm` (Triton, SwiGLU fused into gate/up) against torch's grouped_mm + `silu_and_mul`,
  for sorted rows from 16 to 8,192 sequences, at the expert shapes of one GPU, TP=2 and EP=2 (or, with
  --grouped_layout, the block sweep and comparison at another layout's per-rank shapes);
- `qk_norm_rope_cache` with 1 to 16 heads per program, at 1, 256 and 8,192 tokens;
- a candidate `moe_down` that adds each token's top-k weighted sum itself (one kernel instead of two at
  batch 1), against `moe_down` + `weighted_sum`;
- a Triton gemv for the attention projections at one token against cuBLAS.

    python scripts/probe_kernels.py --out DIR      # writes DIR/kernels.json (results/probe/, results/LOG.md)
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from minisgl.kernels.moe import moe_down, moe_grouped_gemm, silu_and_mul, sort_by_expert
from minisgl.kernels.rope import qk_norm_rope_cache
from minisgl.moe.experts import grouped_gemm
from probe_fast import gemv, graph_time_us

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2048, 768, 128, 8
HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


def sorted_rows(seqs, experts, hidden, seed):
    "Rows of `seqs` tokens, each routed to TOP_K distinct experts uniformly, sorted by expert."
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(seqs, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.rand(seqs, EXPERTS, device="cuda", generator=g).topk(TOP_K, dim=1).indices
    if experts < EXPERTS:  # EP: this rank's share of the experts (the first ones), the rows that chose them
        keep = ids.flatten() < experts
        rows, counts, _ = sort_by_expert(x, ids.flatten(), EXPERTS, TOP_K)
        return rows[: int(keep.sum())], counts[:experts]
    rows, counts, _ = sort_by_expert(x, ids.flatten(), experts, TOP_K)
    return rows, counts


def grouped(out, layout="tp1_ep1"):
    "Block sweep of `moe_grouped_gemm` at one layout's expert shapes (per rank), then against grouped_mm."
    dev = "cuda"
    all_shapes = {"tp1_ep1": (EXPERTS, INTERMEDIATE), "tp2_ep1": (EXPERTS, INTERMEDIATE // 2),
                  "tp1_ep2": (EXPERTS // 2, INTERMEDIATE), "tp4_ep1": (EXPERTS, INTERMEDIATE // 4),
                  "tp2_ep2": (EXPERTS // 2, INTERMEDIATE // 2), "tp1_ep4": (EXPERTS // 4, INTERMEDIATE)}
    table_layouts = ("tp1_ep1", "tp2_ep1", "tp1_ep2") if layout == "tp1_ep1" else (layout,)
    shapes = {name: all_shapes[name] for name in dict.fromkeys((layout,) + table_layouts)}
    weights = {}
    for name, (experts, inter) in shapes.items():
        torch.manual_seed(0)
        weights[name] = [(0.02 * torch.randn(experts, 2 * inter, HIDDEN, device=dev, dtype=torch.bfloat16),
                          0.02 * torch.randn(experts, HIDDEN, inter, device=dev, dtype=torch.bfloat16))
                         for _ in range(2)]  # two copies, alternated: each is 1.2 GB, far beyond L2 anyway

    def variants(name, seqs, blocks=(None, None)):
        experts, inter = shapes[name]
        inputs = [sorted_rows(seqs, experts, HIDDEN, seed) for seed in range(2)]
        hs = [torch.randn(rows.shape[0], inter, device=dev, dtype=torch.bfloat16) for rows, _ in inputs]
        gate_up = {"torch": [lambda i=i: silu_and_mul(grouped_gemm(inputs[i][0], weights[name][i][0], inputs[i][1]))
                             for i in range(2)],
                   "triton": [lambda i=i: moe_grouped_gemm(inputs[i][0], weights[name][i][0], inputs[i][1], True,
                                                           blocks[0]) for i in range(2)]}
        down = {"torch": [lambda i=i: grouped_gemm(hs[i], weights[name][i][1], inputs[i][1]) for i in range(2)],
                "triton": [lambda i=i: moe_grouped_gemm(hs[i], weights[name][i][1], inputs[i][1], False, blocks[1])
                           for i in range(2)]}
        return inputs, {"gate_up": gate_up, "down": down}

    def bytes_read(name, counts, which):
        experts, inter = shapes[name]
        used = int((counts > 0).sum())
        return used * (2 * inter * HIDDEN if which == "gate_up" else HIDDEN * inter) * 2

    # 1. Block sizes at 256 sequences (per replica).
    sweep = {"gate_up": [], "down": []}
    configs = [c for c in itertools.product((16, 32), (32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (8, 3)))]
    for which, index in (("gate_up", 0), ("down", 1)):
        for bm, bn, bk, (warps, stages) in configs:
            cfg = (bm, bn, bk, warps, stages)
            blocks = [None, None]
            blocks[index] = cfg
            inputs, fns = variants(layout, 256, tuple(blocks))
            try:
                us = graph_time_us(fns[which]["triton"] * 8)
            except Exception as e:  # out of shared memory or registers: skip
                print("skip", which, cfg, type(e).__name__, flush=True)
                continue
            tbs = bytes_read(layout, inputs[0][1], which) / us / 1e6
            sweep[which].append({"blocks": cfg, "us": round(us, 2), "tb_per_s": round(tbs, 3)})
            print(which, sweep[which][-1], flush=True)
        sweep[which].sort(key=lambda r: r["us"])
    best = (tuple(sweep["gate_up"][0]["blocks"]), tuple(sweep["down"][0]["blocks"]))
    out["grouped_layout"] = layout
    out["grouped_sweep_256_seqs"] = {k: v[:8] for k, v in sweep.items()}
    out["grouped_best_blocks"] = {"gate_up": best[0], "down": best[1]}
    # The default blocks at this shape, for the before/after.
    inputs, fns = variants(layout, 256)
    out["grouped_default_blocks_256_seqs"] = {
        which: {"us": round(graph_time_us(fns[which]["triton"] * 8), 2)} for which in ("gate_up", "down")}
    print("default blocks", out["grouped_default_blocks_256_seqs"], flush=True)

    # 2. The best blocks against grouped_mm, batch by batch, and the error against it.
    table = []
    for name in table_layouts:
        for seqs in (16, 32, 64, 128, 256, 512, 1024, 2048, 8192):
            if name != "tp1_ep1" and seqs not in (128, 256, 512):
                continue
            inputs, fns = variants(name, seqs, best)
            row = {"layout": name, "seqs": seqs, "rows": int(inputs[0][0].shape[0]),
                   "rows_per_expert": inputs[0][0].shape[0] / shapes[name][0]}
            for which in ("gate_up", "down"):
                for impl in ("torch", "triton"):
                    row[f"{which}_{impl}_us"] = round(graph_time_us(fns[which][impl] * 4), 2)
                row[f"{which}_max_err"] = (fns[which]["triton"][0]().float() - fns[which]["torch"][0]().float()
                                           ).abs().max().item()
                row[f"{which}_ref_scale"] = fns[which]["torch"][0]().float().abs().max().item()
                row[f"{which}_triton_tb_per_s"] = round(
                    bytes_read(name, inputs[0][1], which) / row[f"{which}_triton_us"] / 1e6, 3)
            table.append(row)
            print("grouped", row, flush=True)
    out["grouped_vs_grouped_mm"] = table
    del weights
    torch.cuda.empty_cache()


def rope(out):
    rows = []
    for tokens in (1, 256, 8192):
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        q_norm = 1 + 0.1 * torch.randn(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k_norm = 1 + 0.1 * torch.randn(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        cos, sin = torch.randn(2, 1024, HEAD_DIM // 2, device="cuda", dtype=torch.float32).unbind(0)
        seqs = max(1, tokens // 512)
        positions = torch.arange(tokens, device="cuda") % 512
        token_rows = torch.arange(tokens, device="cuda") // 512
        k_cache = torch.zeros(seqs, KV_HEADS, 1024, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)

        def call(blocks):
            return qk_norm_rope_cache(qkv, HEADS, KV_HEADS, HEAD_DIM, q_norm, k_norm, 1e-6, cos, sin, positions,
                                      token_rows, k_cache, v_cache, blocks=blocks)
        ref = call((1, 1))
        ref_k = k_cache.clone()
        for heads_per_program, warps in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8)):
            k_cache.zero_()
            same = torch.equal(call((heads_per_program, warps)), ref) and torch.equal(k_cache, ref_k)
            us = graph_time_us([lambda: call((heads_per_program, warps))] * 8)
            rows.append({"tokens": tokens, "heads_per_program": heads_per_program, "num_warps": warps,
                         "us": round(us, 2), "same_as_one_head": same})
            print("rope", rows[-1], flush=True)
    out["rope"] = rows


@triton.jit
def _moe_down_sum_kernel(h_ptr, w2_ptr, expert_ptr, weight_ptr, out_ptr, hidden: tl.constexpr,
                         intermediate: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    token = tl.program_id(0)  # out[token, n block] = sum over slots of weight * (h[pair] @ W_down[expert]^T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_N], tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        expert = tl.load(expert_ptr + pair)
        rows = w2_ptr + expert.to(tl.int64) * (hidden * intermediate) + n[:, None] * intermediate
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, intermediate, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(h_ptr + pair * intermediate + k, mask=k < intermediate, other=0.0).to(tl.float32)
            acc += tl.load(rows + k[None, :], mask=(k < intermediate)[None, :], other=0.0).to(tl.float32) * h[None, :]
        y = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as moe_down rounds
        total += y * tl.load(weight_ptr + pair).to(tl.float32)
    tl.store(out_ptr + token * hidden + n, total.to(out_ptr.dtype.element_ty))


def moe_down_sum(h, w2, ids, weights, top_k, blocks):
    block_n, block_k, warps = blocks
    tokens = ids.numel() // top_k
    out = torch.empty(tokens, HIDDEN, device=h.device, dtype=h.dtype)
    _moe_down_sum_kernel[(tokens, HIDDEN // block_n)](h, w2, ids, weights, out, hidden=HIDDEN,
                                                      intermediate=INTERMEDIATE, TOP_K=top_k, BLOCK_N=block_n,
                                                      BLOCK_K=block_k, num_warps=warps)
    return out


def down_with_sum(out):
    w2 = 0.02 * torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
    rows = []
    for tokens in (1, 8):
        id_sets = [torch.rand(tokens, EXPERTS, device="cuda").topk(TOP_K, dim=1).indices.flatten() for _ in range(16)]
        h = torch.randn(tokens * TOP_K, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
        weights = torch.softmax(torch.randn(tokens, TOP_K, device="cuda"), -1).to(torch.bfloat16)
        ref = moe_down(h, w2, id_sets[0], weights.flatten(), TOP_K)
        base = graph_time_us([lambda ids=ids: moe_down(h, w2, ids, weights.flatten(), TOP_K) for ids in id_sets])
        rows.append({"tokens": tokens, "variant": "moe_down + weighted_sum", "us": round(base, 2)})
        print("down", rows[-1], flush=True)
        for cfg in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8)):
            try:
                same = torch.equal(moe_down_sum(h, w2, id_sets[0], weights.flatten(), TOP_K, cfg), ref)
                us = graph_time_us([lambda ids=ids: moe_down_sum(h, w2, ids, weights.flatten(), TOP_K, cfg)
                                    for ids in id_sets])
            except Exception as e:
                print("skip", cfg, type(e).__name__, flush=True)
                continue
            rows.append({"tokens": tokens, "variant": "fused", "blocks": cfg, "us": round(us, 2), "same": same})
        best = min((r for r in rows if r["tokens"] == tokens and r["variant"] == "fused"), key=lambda r: r["us"])
        print("down fused best", best, flush=True)
    out["down_with_sum"] = rows


def gemv_projections(out):
    """The attention projections at one token: a Triton gemv (scripts/probe_fast.py's, results/LOG.md step 4)
    against cuBLAS, both inside CUDA graphs this time (step 4 timed eager launches, which flattered cuBLAS's
    cheaper launch), weights rotated through 8 copies so L2 cannot hold them."""
    rows = []
    for name, n, k in (("qkv", 5120, 2048), ("o", 2048, 4096)):
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(8)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, ws[0]).float()
        us = graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
        rows.append({"proj": name, "variant": "cuBLAS", "us": round(us, 2), "tb_per_s": round(n * k * 2 / us / 1e6, 3)})
        print("gemv", rows[-1], flush=True)
        for cfg in itertools.product((2, 4, 8, 16), (128, 256, 512), (2, 4, 8)):
            try:
                err = (gemv(x, ws[0], cfg).float() - ref).abs().max().item()
                us = graph_time_us([lambda w=w: gemv(x, w, cfg) for w in ws])
            except Exception as e:
                print("skip", cfg, type(e).__name__, flush=True)
                continue
            rows.append({"proj": name, "variant": "triton", "blocks": cfg, "us": round(us, 2),
                         "tb_per_s": round(n * k * 2 / us / 1e6, 3), "max_err": err})
        best = min((r for r in rows if r["proj"] == name and r["variant"] == "triton"), key=lambda r: r["us"])
        print("gemv best", best, flush=True)
    out["gemv_projections"] = rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--only", choices=["grouped", "rope", "down", "gemv"], action="append")
    p.add_argument("--grouped_layout", default="tp1_ep1",
                   help="the layout whose per-rank expert shapes the grouped sweep uses (tp4_ep1, tp2_ep2, ...)")
    args = p.parse_args()
    torch.cuda.set_device(0)
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d")}
    for name, fn in (("grouped", lambda out: grouped(out, args.grouped_layout)), ("rope", rope),
                     ("down", down_with_sum), ("gemv", gemv_projections)):
        if not args.only or name in args.only:
            t = time.perf_counter()
            fn(out)
            print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "kernels.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
