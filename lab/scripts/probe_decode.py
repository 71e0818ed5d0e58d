#!/usr/bin/env python
"""Decode steps on one GPU at the real shape (random weights), inside CUDA graphs: the time of one step at
batch 1, 8 and 64 and at contexts of 512 to 32k tokens with decode attention split 16 or 128 ways at most; a
kernel table of one batch-1 step, with and without programmatic dependent launch; and a sweep of the decode-attention kernel's blocks alone at long contexts.

    python lab/scripts/probe_decode.py --out DIR     (writes DIR/probe_decode.json and a kernel table)

results/probe/h200_decode_2026-12-02.json also holds variants measured with kernel code that was then
dropped as no faster (results/LOG.md, steps 30-32): the top-k by rank, moe_down and gemv rows loaded before
the wait; lab/results/probe/h200_decode_2026-12-02_*.json the fused norm + router and the last-program merges.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import triton
import triton.testing

import minisgl.kernels.attention as attention
import minisgl.kernels.pdl as pdl
from minisgl.config import preset
from minisgl.distributed import ParallelContext
from minisgl.fast_ops import fast_ops
from minisgl.generation import StaticEngine
from minisgl.launch import make_runner
from minisgl.loader import DummySource
from minisgl.model import Qwen3MoeForCausalLM


def replay_us(runner, size, position, repeat=100):
    "Device time of one decode graph replay of `size` sequences at `position`."
    runner.decode(list(range(size)), [position] * size, size)  # sets the graph's inputs
    graph = runner.graphs[size]
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / repeat


def kernel_table(runner, size, position, path):
    from torch.profiler import ProfilerActivity, profile
    runner.decode(list(range(size)), [position] * size, size)
    graph = runner.graphs[size]
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="device_time_total", row_limit=30))


def attention_sweep(contexts, device, configs):
    "decode_attention alone, one sequence, the real heads: microseconds and bytes of cache read per second."
    kv_heads, heads, d, page = 4, 32, 128, 16
    longest = max(contexts)
    pages = longest // page + 1
    k_cache = torch.randn(kv_heads, (pages + 1) * page, d, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = (1 + torch.randperm(pages, device=device)).int()[None]
    q = torch.randn(1, heads, d, device=device, dtype=torch.bfloat16)
    rows = torch.zeros(1, dtype=torch.long, device=device)
    results = []
    for context in contexts:
        lens = torch.tensor([context], device=device)
        kv_bytes = 2 * context * kv_heads * d * 2
        for splits, block_n, warps, stages, block_d in configs:
            def call():
                attention.decode_attention(q, k_cache, v_cache, table, page, rows, lens, d ** -0.5,
                                           num_splits=splits, blocks=(block_n, warps, stages, block_d))
            config = {"context": context, "splits": splits, "block_n": block_n, "warps": warps,
                      "stages": stages, "merge_block_d": block_d}
            try:
                us = 1e3 * triton.testing.do_bench_cudagraph(call, rep=30)
            except Exception as err:  # a configuration that does not compile or fit
                results.append({**config, "error": str(err)[:200]})
                continue
            results.append({**config, "us": us, "tb_per_s": kv_bytes / us / 1e6})
        best = min((r for r in results if r["context"] == context and "us" in r), key=lambda r: r["us"])
        print(f"attention at {context}: best {best}", flush=True)
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--contexts", default="512,4096,16384,32768")
    p.add_argument("--skip_sweep", action="store_true")
    p.add_argument("--sweep_only", action="store_true")
    p.add_argument("--sweep", default="64,32,4,2,128;64,64,4,2,128;64,128,4,2,128;128,32,4,2,128;128,64,4,2,128;"
                   "128,128,4,2,128", help="decode-attention configurations: splits,block_n,warps,stages,merge_block_d;...")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    report = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": triton.__version__, "variants": {}}
    if not args.sweep_only:
        config = preset("qwen3-30b-a3b")
        ctx = ParallelContext.single("cuda")
        model = Qwen3MoeForCausalLM(config, ctx, torch.bfloat16, max_positions=max(contexts) + 64,
                                    ops=fast_ops(ctx, config.hidden_size, torch.bfloat16))
        model.load(DummySource(config, device="cuda"))
        # name: the largest number of splits of decode attention
        variants = {"splits16": 16, "splits128": 128}
        for name, max_splits in variants.items():
            attention.DECODE_MAX_SPLITS = max_splits
            model.set_ops(fast_ops(ctx, config.hidden_size, torch.bfloat16))
            r = {}
            runner = make_runner(model, 1, max(contexts) + 64, graphs=True)
            StaticEngine(runner).reserve_rows(1, max(contexts) + 64)
            for context in contexts:
                r[f"b1_ctx{context}_us"] = replay_us(runner, 1, context)
            if name == "splits16":
                kernel_table(runner, 1, 512, out / f"kernels_b1_{name}.txt")
            del runner
            torch.cuda.empty_cache()
            runner = make_runner(model, 64, 1024, graphs=True)
            StaticEngine(runner).reserve_rows(64, 1024)
            for size in (8, 64):
                r[f"b{size}_ctx512_us"] = replay_us(runner, size, 512)
            del runner
            torch.cuda.empty_cache()
            report["variants"][name] = r
            print(name, {k: round(v, 1) for k, v in r.items()}, flush=True)
            (out / "probe_decode.json").write_text(json.dumps(report, indent=1))
        attention.DECODE_MAX_SPLITS = 128
        # The kernels' own times: without programmatic dependent launch a kernel's time in the table is not
        # stretched by its early start and wait for the one before.
        pdl.USE_PDL = False
        model.set_ops(fast_ops(ctx, config.hidden_size, torch.bfloat16))
        runner = make_runner(model, 1, 1024, graphs=True)
        StaticEngine(runner).reserve_rows(1, 1024)
        report["variants"]["splits128_no_pdl"] = {"b1_ctx512_us": replay_us(runner, 1, 512)}
        kernel_table(runner, 1, 512, out / "kernels_b1_splits128_no_pdl.txt")
        print("splits128_no_pdl", report["variants"]["splits128_no_pdl"], flush=True)
        del runner
        pdl.USE_PDL = True
    if not args.skip_sweep:
        configs = [tuple(map(int, c.split(","))) for c in args.sweep.split(";")]
        report["attention_sweep"] = attention_sweep(contexts, "cuda", configs)
    (out / "probe_decode.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
