#!/usr/bin/env python
"""Check and time the symmetric-memory all-reduces (one-shot, two-shot) against NCCL's, on the GPUs of one machine.

    torchrun --nproc_per_node=2 scripts/check_all_reduce.py --out results/allreduce

For each size it sums a random bfloat16 tensor over all ranks with NCCL and with the one-shot and two-shot
symmetric-memory all-reduces, compares the sums, then times each way eagerly and inside a CUDA graph (48
calls per replay: a decode step's worth). Rank 0 writes <gpu>_x<ranks>_<date>.json, which chapter 09
prints. Exits non-zero if the sums disagree.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minisgl.symmetric import SymmetricAllReduce

HIDDEN = 2048  # Qwen3-30B-A3B's hidden size: one token's activations per row


def per_call_us(fn, calls: int, graph: bool) -> float:
    "Microseconds per call of fn, over `calls` calls, eagerly or replayed as one CUDA graph."
    for _ in range(3):
        fn()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(calls):
                fn()
    run()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(10):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (10 * calls) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,64", help="message sizes, in tokens of HIDDEN bfloat16 values")
    p.add_argument("--out", default="results/allreduce")
    args = p.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    group = dist.new_group(list(range(dist.get_world_size())))
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(t) * HIDDEN for t in args.tokens.split(",")]
    symmetric = SymmetricAllReduce(group, device, max(sizes), torch.bfloat16)
    ways = {"one_shot": symmetric.one_shot, "two_shot": symmetric.two_shot}

    rows, ok = [], True
    for numel in sizes:
        x = torch.randn(numel, dtype=torch.bfloat16, device=device, generator=torch.Generator(device).manual_seed(rank))
        nccl = x.clone()
        dist.all_reduce(nccl, group=group)
        row = {"numel": numel, "bytes": numel * 2}
        for way, reduce in ways.items():
            diff = (reduce(x.clone()).float() - nccl.float()).abs().max().item()
            # Two ranks add the same two numbers either way; more ranks may add in another order (bf16 rounding).
            ok &= diff == 0 if world == 2 else diff <= 2 ** -6 * nccl.float().abs().max().item()
            row[f"{way}_max_abs_diff"] = diff
        buf = x.clone()
        row.update(nccl_eager_us=per_call_us(lambda: dist.all_reduce(buf, group=group), 48, graph=False),
                   nccl_graph_us=per_call_us(lambda: dist.all_reduce(buf, group=group), 48, graph=True))
        for way, reduce in ways.items():
            row[f"{way}_eager_us"] = per_call_us(lambda: reduce(buf), 48, graph=False)
            row[f"{way}_graph_us"] = per_call_us(lambda: reduce(buf), 48, graph=True)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        gpu = torch.cuda.get_device_name(device)
        date = datetime.date.today().isoformat()
        report = {"gpu": gpu, "world_size": world, "date": date, "torch": torch.__version__, "dtype": "bfloat16",
                  "agree": ok, "sizes": rows}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{gpu.lower().replace(' ', '-')}_x{world}_{date}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"{'agree' if ok else 'DISAGREE'}; wrote {path}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
