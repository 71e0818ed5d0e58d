#!/usr/bin/env python
"""Benchmark Qwen3-30B-A3B (random weights at the real shape) on GPUs, beside the two ceilings of the machine.

    torchrun --nproc_per_node=N scripts/bench.py --tp_size T --ep_size E [--reference] [--out results/bench]

One run measures, in this order:
  ceilings   the GPU's copy bandwidth and bf16 matmul rate (each rank its own; rank 0's are reported);
  single     one sequence: time to first token of a 512-token prompt, then decode tok/s over 256 tokens;
  eager      the same single sequence with the reference operations (plain PyTorch, no graphs), fewer tokens;
  batch      256 concurrent sequences, 512 tokens in / 256 out, prefill included: output tok/s;
  prefill    16 prompts of 512 tokens (8,192 tokens) in one prefill, split over the EP replicas: tok/s;
  long       one sequence after a prompt of 4k, 16k and 32k tokens (--long_contexts): decode tok/s beside
             its roofline, where each step reads the active weights and the whole KV cache so far;
  reference  (--reference, rank 0 alone, after our model is freed) transformers' generate on one GPU of
             the same machine with the same shapes, and its forward pass over the prefill phase's
             prompts: the floor we compare against;
  profile    (--profile DIR) kernel tables of rank 0 for one prefill of the 8,192 tokens and one decode
             step of the batch (run without a graph, same kernels), written to DIR.
Each result is printed beside its roofline fraction, and everything goes to one JSON file named after
the GPU, the layout and the date, which chapter 09 reads.
"""
import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minisgl.config import active_parameter_counts, preset
from minisgl.distributed import init_distributed
from minisgl.fast_ops import TWO_SHOT_MAX_TOKENS, fast_ops
from minisgl.generation import StaticEngine
from minisgl.launch import make_runner
from minisgl.loader import DummySource, weight_bytes
from minisgl.model import Qwen3MoeForCausalLM
from minisgl.ops import reference_ops

from bench_common import log, report_path, run_generate, write_report


def timed(fn, device, repeat=1):
    "Median seconds of `fn()` over `repeat` runs, synchronising the device around each."
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device) -> dict:
    "Copy bandwidth (bytes read + written) of a 4 GiB copy, and bf16 matmul rate of 8192^3, on random data."
    src = torch.randn(2**30, device=device)  # 4 GiB of float32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    copy_s = timed(lambda: [dst.copy_(src) for _ in range(10)], device, repeat=3) / 10
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    mm_s = timed(lambda: [a @ b for _ in range(20)], device, repeat=3) / 20
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_second": 2 * 4 * 2**30 / copy_s, "bf16_flops_per_second": 2 * 8192**3 / mm_s}


def random_prompts(count, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def prefill_prompts(args, vocab):
    "The prefill phase's prompts: `prefill_seqs` random prompts of `prompt_len` tokens (ours and transformers')."
    return random_prompts(args.prefill_seqs, args.prompt_len, vocab, seed=3)


def replica_share(prompts, ctx):
    "The prompts this rank's attention replica prefills: prompt i goes to replica i % ep_size, as in `StaticEngine`."
    if len(prompts) % ctx.ep_size:
        raise SystemExit(f"--prefill_seqs {len(prompts)} is not divisible by ep_size {ctx.ep_size}")
    return prompts[ctx.ep_rank::ctx.ep_size]


def reference_transformers(config, device, prompt_len, new_tokens, batches, prefill) -> dict:
    """transformers' Qwen3MoeForCausalLM with random bf16 weights at the same shape, on one GPU: `generate`
    at each batch size, and one forward pass over the `prefill` prompts (the prefill phase's)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM as HFModel
    hf_config = Qwen3MoeConfig(**config.to_hf_dict())
    with torch.device(device):
        model = HFModel._from_config(hf_config, dtype=torch.bfloat16).eval()
    out = {"transformers_version": __import__("transformers").__version__}
    for batch in batches:
        ids = torch.tensor(random_prompts(batch, prompt_len, config.vocab_size, seed=7), device=device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        model.generate(ids[:, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm up
        seconds = timed(lambda: model.generate(ids, **kwargs), device)
        out[f"batch_{batch}"] = {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "seconds": seconds,
                                 "output_tokens_per_second": batch * new_tokens / seconds}
        log(f"reference transformers batch {batch}: {batch * new_tokens / seconds:.1f} output tok/s")
    ids = torch.tensor(prefill, device=device)  # [prefill_seqs, prompt_len]
    with torch.no_grad():
        model(ids[:1, :16], logits_to_keep=1)  # warm up
        seconds = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), device, repeat=3)
    out["prefill"] = {"sequences": ids.shape[0], "prompt_tokens": ids.shape[1], "seconds": seconds,
                      "tokens_per_second": ids.numel() / seconds}
    log(f"reference transformers prefill {ids.numel()} tokens: "
        f"{out['prefill']['tokens_per_second']:.0f} tok/s")
    del model
    return out


def prefill_step(runner, prompts):
    "One prefill of `prompts` (a replica's share) in rows 0..n-1 of the runner's cache."
    return runner.extend([t for p in prompts for t in p], [len(p) for p in prompts], [0] * len(prompts),
                         list(range(len(prompts))))


def profile_steps(runner, ctx, args, vocab, out_dir):
    """Rank 0's CUDA kernel table for one prefill of `prefill_seqs` prompts and one decode step of `batch`
    sequences (split over the EP replicas), each run eagerly with the decode step's padded shapes: the
    kernels a graph would replay, with their times. Every rank runs the same steps (collectives)."""
    from torch.profiler import ProfilerActivity, profile
    device = ctx.device
    mine = replica_share(prefill_prompts(args, vocab), ctx)
    per_replica = max(1, args.batch // ctx.ep_size)
    rows, positions = list(range(per_replica)), [args.prompt_len] * per_replica
    size = runner.padded_size(per_replica)
    layout = f"tp{ctx.tp_size}_ep{ctx.ep_size}"
    for name, step in ((f"prefill{args.prefill_seqs * args.prompt_len}", lambda: prefill_step(runner, mine)),
                       (f"decode_b{args.batch}", lambda: runner.forward(runner.decode_batch(rows, positions, size)))):
        step()  # warm-up
        torch.cuda.synchronize(device)
        if ctx.world_size > 1:
            dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        if ctx.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
            (out_dir / f"profile_{name}_{layout}.txt").write_text(table)
            log(f"profile of {name} written to {out_dir}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--ep_size", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--decode_tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prefill_seqs", type=int, default=16)
    p.add_argument("--long_contexts", default="4096,16384,32768", help="the long phase's prompt lengths")
    p.add_argument("--long_decode_tokens", type=int, default=128)
    p.add_argument("--skip", default="", help="comma-separated phases to skip: single,eager,batch,prefill,long")
    p.add_argument("--reference", action="store_true", help="also time transformers' generate (rank 0, one GPU)")
    p.add_argument("--reference_tokens", type=int, default=32)
    p.add_argument("--no_graphs", action="store_true")
    p.add_argument("--two_shot_max_tokens", type=int, default=TWO_SHOT_MAX_TOKENS,
                   help="TP all-reduces up to this many tokens two-shot over symmetric memory (default: the engine's)")
    p.add_argument("--profile", help="write rank 0's kernel tables for one prefill and one decode step here")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--tag", default="", help="appended to the result file name")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    ctx = init_distributed(args.tp_size, args.ep_size, "cuda")
    device = ctx.device
    config = preset("qwen3-30b-a3b")
    gpu = torch.cuda.get_device_name(device)
    report = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "layout": {"tp_size": ctx.tp_size, "ep_size": ctx.ep_size, "world_size": ctx.world_size},
              "shape": "qwen3-30b-a3b (random bf16 weights)", "phases": {}}
    log(f"bench on {ctx.world_size} x {gpu}: tp={ctx.tp_size} ep={ctx.ep_size}")

    ceilings = measure_ceilings(device)
    report["ceilings"] = ceilings
    active_bytes = 2 * sum(active_parameter_counts(config).values())
    flops_per_token = 2 * sum(active_parameter_counts(config).values())
    bandwidth, flops = ceilings["copy_bytes_per_second"], ceilings["bf16_flops_per_second"]
    report["roofline"] = {"active_bytes_per_token": active_bytes, "flops_per_token": flops_per_token,
                          "batch1_decode_tokens_per_second_one_gpu": bandwidth / active_bytes,
                          "prefill_tokens_per_second_one_gpu": flops / flops_per_token}
    log(f"ceilings: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; "
        f"batch-1 decode roofline (1 GPU) {bandwidth / active_bytes:.0f} tok/s")

    max_len = args.prompt_len + args.decode_tokens + 8
    long_contexts = [] if "long" in skip else [int(n) for n in args.long_contexts.split(",") if n]
    long_len = max(long_contexts, default=0) + args.long_decode_tokens + 8
    start = time.perf_counter()
    ops = fast_ops(ctx, config.hidden_size, torch.bfloat16, two_shot_max_tokens=args.two_shot_max_tokens)
    model = Qwen3MoeForCausalLM(config, ctx, dtype=torch.bfloat16, max_positions=max(max_len, long_len), ops=ops)
    model.load(DummySource(config, seed=0, device=device))
    torch.cuda.synchronize(device)
    report["load_seconds"] = time.perf_counter() - start
    report["weight_bytes_per_rank"] = weight_bytes(model)
    log(f"model built in {report['load_seconds']:.1f} s, {report['weight_bytes_per_rank'] / 2**30:.2f} GiB "
        f"of weights per rank")

    report["two_shot_max_tokens"] = args.two_shot_max_tokens
    # The KV cache at its largest shape and every decode graph, captured once, before any timing.
    start = time.perf_counter()
    runner = make_runner(model, max(args.batch, args.prefill_seqs // ctx.ep_size, 1), max_len,
                         graphs=not args.no_graphs)
    report["capture_seconds"] = time.perf_counter() - start
    log(f"KV cache and {len(getattr(runner, 'graphs', {}))} decode graphs ready in "
        f"{report['capture_seconds']:.1f} s")
    engine = StaticEngine(runner)
    vocab = config.vocab_size
    phases = report["phases"]

    if "single" not in skip:
        prompt = random_prompts(1, args.prompt_len, vocab, seed=1)
        run_generate(engine, prompt, 8)  # warm-up: Triton compiles, graphs are captured
        r = run_generate(engine, prompt, args.decode_tokens)
        r["roofline_fraction"] = r["decode_tokens_per_second"] / (bandwidth / active_bytes)
        phases["single"] = r
        log(f"single: TTFT {r['time_to_first_token_seconds'] * 1e3:.1f} ms, decode "
            f"{r['decode_tokens_per_second']:.1f} tok/s = {100 * r['roofline_fraction']:.0f}% of the 1-GPU roofline")

    if "eager" not in skip:
        # The same model and cache with the reference operations, stepped eagerly (no graphs).
        model.set_ops(reference_ops())
        eager = StaticEngine(make_runner(model, 1, max_len))
        prompt = random_prompts(1, args.prompt_len, vocab, seed=1)
        run_generate(eager, prompt, 4)
        r = run_generate(eager, prompt, 32)
        r["roofline_fraction"] = r["decode_tokens_per_second"] / (bandwidth / active_bytes)
        phases["eager"] = r
        log(f"eager (reference operations): TTFT {r['time_to_first_token_seconds'] * 1e3:.1f} ms, decode "
            f"{r['decode_tokens_per_second']:.1f} tok/s")
        del eager
        model.set_ops(ops)

    if "batch" not in skip:
        prompts = random_prompts(args.batch, args.prompt_len, vocab, seed=2)
        run_generate(engine, prompts[:args.batch], 4)  # warm-up at this size
        r = run_generate(engine, prompts, args.decode_tokens)
        phases["batch"] = r
        log(f"batch {args.batch}: {r['output_tokens_per_second']:.0f} output tok/s "
            f"(prefill {r['time_to_first_token_seconds']:.2f} s, decode {r['decode_tokens_per_second']:.0f} tok/s)")

    if "prefill" not in skip:
        prompts = prefill_prompts(args, vocab)
        mine = replica_share(prompts, ctx)
        engine.reserve_rows(len(mine), max_len)
        prefill_step(runner, mine)
        seconds = timed(lambda: prefill_step(runner, mine), device, repeat=3)
        tokens = len(prompts) * args.prompt_len
        r = {"sequences": len(prompts), "prompt_tokens": args.prompt_len, "seconds": seconds,
             "tokens_per_second": tokens / seconds,
             "matmul_fraction": tokens * flops_per_token / seconds / (flops * ctx.world_size)}
        phases["prefill"] = r
        log(f"prefill {tokens} tokens: {r['tokens_per_second']:.0f} tok/s = {100 * r['matmul_fraction']:.0f}% of "
            f"the bf16 matmul ceiling of {ctx.world_size} GPU(s)")

    if long_contexts:
        # Keys and values of every layer, bytes per token of context, for the whole model (all ranks).
        kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
        long_engine = StaticEngine(make_runner(model, 1, long_len, graphs=not args.no_graphs))
        phases["long"] = {}
        for context in long_contexts:
            prompt = random_prompts(1, context, vocab, seed=4)
            run_generate(long_engine, prompt, 4)  # warm-up at this length
            r = run_generate(long_engine, prompt, args.long_decode_tokens)
            # A step reads the active weights and, on average over the run, the cache of the prompt and
            # half the new tokens.
            read = active_bytes + kv_bytes * (context + args.long_decode_tokens / 2)
            r["bytes_read_per_token"] = read
            r["roofline_tokens_per_second"] = bandwidth / read
            r["roofline_fraction"] = r["decode_tokens_per_second"] / r["roofline_tokens_per_second"]
            phases["long"][str(context)] = r
            log(f"long, {context:,}-token prompt: TTFT {r['time_to_first_token_seconds']:.2f} s, decode "
                f"{r['decode_tokens_per_second']:.1f} tok/s = {100 * r['roofline_fraction']:.0f}% of its roofline "
                f"({bandwidth / read:.0f} tok/s: {read / 1e9:.2f} GB per token)")
        del long_engine

    if args.profile:
        engine.reserve_rows(max(1, args.batch // ctx.ep_size), max_len)
        profile_steps(runner, ctx, args, vocab, Path(args.profile))

    report["peak_memory_bytes_per_rank"] = torch.cuda.max_memory_allocated(device)
    if ctx.world_size > 1:
        peaks = [None] * ctx.world_size
        dist.all_gather_object(peaks, report["peak_memory_bytes_per_rank"])
        report["peak_memory_bytes_per_rank"] = peaks

    del engine, runner, model
    gc.collect()
    torch.cuda.empty_cache()
    if args.reference and ctx.rank == 0:
        report["reference"] = reference_transformers(config, device, args.prompt_len, args.reference_tokens,
                                                     batches=(1, 64), prefill=prefill_prompts(args, vocab))
    if ctx.rank == 0:
        path = write_report(report, report_path(args.out, gpu, ctx.tp_size, ctx.ep_size, report["date"], args.tag))
        log(f"wrote {path}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
