#!/usr/bin/env python
"""Benchmark the serving runtime offline (Qwen3-30B-A3B shape, random weights) on seeded workloads.

    torchrun --nproc_per_node=N scripts/bench_runtime.py [--tp_size T --ep_size E] [--out results/runtime]

Phases (each skippable with --skip):
  single   one request, 512 prompt tokens, 256 new: decode tok/s through the runtime, beside the same
           request on the bare model runner (the static engine, no scheduler): the runtime's overhead;
  batch    the same with --batch requests at once (bench.py's batch phase): decode and output tok/s;
  mixed    --requests requests with long-tailed lengths (prompts 16-2,048 tokens, outputs 16-1,024, both
           log-uniform), all submitted at once, through continuous batching and through static batching
           (a batch runs until its longest request ends): output tok/s, time to first token and time per
           output token at p50/p99, peak memory, and where the time went (host planning, host waiting,
           device time of graph and eager steps); with --warmup full (the default) after one untimed pass;
  prefix   --prefix_requests requests on --systems shared system prompts of --system_len tokens, each with
           its own 64-token question and 64 new tokens, with and without the prefix cache: cache hits and
           the time saved.
One JSON file per run, named after the GPU, the layout and the date.
"""
import argparse
import datetime
import random
import sys
import time

import torch
import torch.distributed as dist

from minisgl.generation import StaticEngine
from minisgl.llm import LLM
from minisgl.sampling import SamplingParams

from bench_common import (Workload, log, mixed_workload, percentiles, prefix_workload, report_path, run_generate,
                          write_report)


def params_of(workload: Workload) -> tuple[list[list[int]], list[SamplingParams]]:
    "A workload as `LLM.generate`'s prompts and per-request sampling parameters (greedy)."
    return [p for p, _ in workload], [SamplingParams(max_new_tokens=n) for _, n in workload]


def run_workload(llm: LLM, prompts, params) -> dict:
    "All requests at once; timings from each request's own timestamps."
    engine = llm.engine
    llm.ctx_sync()
    torch.cuda.reset_peak_memory_stats(llm.ctx.device)
    steps_before = dict(engine.stats)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    llm.ctx_sync()
    seconds = time.perf_counter() - start
    output_tokens = sum(len(o.output_ids) for o in outputs)
    per_token = [(o.latency - o.time_to_first_token) / (len(o.output_ids) - 1)
                 for o in outputs if len(o.output_ids) > 1]
    return {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "output_tokens": output_tokens,
            "seconds": seconds, "output_tokens_per_second": output_tokens / seconds,
            "time_to_first_token_seconds": percentiles([o.time_to_first_token for o in outputs]),
            "time_per_output_token_seconds": percentiles(per_token),
            "cached_prompt_tokens": sum(o.cached_tokens for o in outputs),
            # steps of each kind, and where their time went (host planning and waiting; device time per kind)
            **{name: engine.stats[name] - steps_before[name] for name in engine.stats},
            "peak_memory_bytes": torch.cuda.max_memory_allocated(llm.ctx.device)}


def against_bare_runner(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """The same requests through the runtime and on the bare model runner (the static engine: no scheduler,
    no pages handed out step by step): decode and output tok/s of each, and the runtime's share."""
    params = SamplingParams(max_new_tokens=new_tokens)
    llm.generate(prompts, SamplingParams(max_new_tokens=8))  # warm-up at this size
    llm.engine.reset_prefix_cache()
    r = run_workload(llm, prompts, [params] * len(prompts))
    # Every request decodes in every step: the batch's decode rate is its size over the time per token.
    r["decode_tokens_per_second"] = len(prompts) / r["time_per_output_token_seconds"]["mean"]
    llm.engine.reset_prefix_cache()
    static = StaticEngine(llm.runner)
    run_generate(static, prompts, 8)  # warm-up
    bare = run_generate(static, prompts, new_tokens)
    r["bare_runner_decode_tokens_per_second"] = bare["decode_tokens_per_second"]
    r["bare_runner_output_tokens_per_second"] = bare["output_tokens_per_second"]
    r["runtime_over_bare"] = r["decode_tokens_per_second"] / r["bare_runner_decode_tokens_per_second"]
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--ep_size", type=int, default=1)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256, help="the batch phase's sequences")
    p.add_argument("--prefix_requests", type=int, default=512)
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--system_len", type=int, default=1024)
    p.add_argument("--max_running_requests", type=int, default=256)
    p.add_argument("--warmup", choices=["full", "short"], default="full",
                   help="before the timed mixed passes: the whole workload once (full), or 16 requests (short)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: single,batch,mixed,static,prefix")
    p.add_argument("--out", default="results/runtime")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    llm = LLM(preset="qwen3-30b-a3b", tp_size=args.tp_size, ep_size=args.ep_size, device="cuda", ignore_eos=True,
              max_seq_len=4096, max_running_requests=args.max_running_requests)
    ctx, vocab = llm.ctx, llm.config.vocab_size
    gpu = torch.cuda.get_device_name(ctx.device)
    cache = llm.runner.cache
    report = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "layout": {"tp_size": ctx.tp_size, "ep_size": ctx.ep_size, "world_size": ctx.world_size},
              "shape": "qwen3-30b-a3b (random bf16 weights)", "start_seconds": llm.start_seconds,
              "kv_cache": {"pages": cache.num_pages, "page_size": cache.page_size,
                           "tokens": (cache.num_pages - 1) * cache.page_size, "rows": cache.max_rows,
                           "bytes_per_token": cache.bytes_per_token},
              "phases": {}}
    phases = report["phases"]

    def save():  # after every phase: a run cut short still leaves its numbers
        if ctx.rank == 0:
            return write_report(report, report_path(args.out, gpu, ctx.tp_size, ctx.ep_size, report["date"], args.tag))

    log(f"runtime bench on {ctx.world_size} x {gpu}: tp={ctx.tp_size} ep={ctx.ep_size}; KV cache "
        f"{report['kv_cache']['tokens']:,} tokens in pages of {cache.page_size}; started in {llm.start_seconds:.1f} s")

    for name, count in (("single", 1), ("batch", args.batch)):
        if name in skip:
            continue
        rng = random.Random(5)
        prompts = [[rng.randrange(vocab) for _ in range(512)] for _ in range(count)]
        r = against_bare_runner(llm, prompts, 256)
        phases[name] = r
        save()
        log(f"{name} ({count} x 512 in, 256 out): runtime decode {r['decode_tokens_per_second']:.1f} tok/s, bare "
            f"runner {r['bare_runner_decode_tokens_per_second']:.1f} tok/s ({100 * r['runtime_over_bare']:.1f}%); "
            f"output with prefill {r['output_tokens_per_second']:.0f} against "
            f"{r['bare_runner_output_tokens_per_second']:.0f} tok/s")

    if "mixed" not in skip:
        prompts, params = params_of(mixed_workload(args.requests, vocab))
        if args.warmup == "full":
            # Triton compiles a kernel again for each new specialisation it meets (sizes divisible by 16,
            # aligned pointers, block counts), up to seconds each; a first pass meets them all, and the
            # timed passes (continuous, then static) both run warm, as a server does after its first minutes.
            warm = run_workload(llm, prompts, params)
            phases["mixed_warmup"] = {"seconds": warm["seconds"], "output_tokens_per_second":
                                      warm["output_tokens_per_second"]}
            log(f"mixed, warm-up pass (compiling as it goes): {warm['seconds']:.1f} s")
        else:
            llm.generate(prompts[:16], params[:16])  # warm-up: prefill shapes, chunking
        llm.engine.reset_prefix_cache()
        r = run_workload(llm, prompts, params)
        phases["mixed_continuous"] = r
        save()
        log(f"mixed, continuous: {r['output_tokens_per_second']:.0f} output tok/s, {r['seconds']:.1f} s, TTFT p50 "
            f"{r['time_to_first_token_seconds']['p50']:.2f} s, TPOT p50 "
            f"{1e3 * r['time_per_output_token_seconds']['p50']:.1f} ms")
    if "prefix" not in skip:
        prompts, params = params_of(prefix_workload(args.prefix_requests, vocab, args.systems, args.system_len))
        for name, use_cache in (("prefix_cached", True), ("prefix_uncached", False)):
            llm.engine.reset_prefix_cache()
            if not use_cache:
                saved, llm.engine.scheduler.cache = llm.engine.scheduler.cache, None
            r = run_workload(llm, prompts, params)
            if not use_cache:
                llm.engine.scheduler.cache = saved
            r["cache_hit_rate"] = r["cached_prompt_tokens"] / r["prompt_tokens"]
            phases[name] = r
            save()
            log(f"{name}: {r['seconds']:.2f} s, hit rate {100 * r['cache_hit_rate']:.0f}%, TTFT p50 "
                f"{r['time_to_first_token_seconds']['p50']:.3f} s")

    if "static" not in skip and "mixed_continuous" in phases:
        prompts, params = params_of(mixed_workload(args.requests, vocab))
        llm.engine.reset_prefix_cache()
        llm.engine.scheduler.static = True
        r = run_workload(llm, prompts, params)
        llm.engine.scheduler.static = False
        phases["mixed_static"] = r
        save()
        log(f"mixed, static: {r['output_tokens_per_second']:.0f} output tok/s, {r['seconds']:.1f} s "
            f"(continuous / static = {phases['mixed_continuous']['output_tokens_per_second'] / r['output_tokens_per_second']:.2f}x)")

    log(f"wrote {save()}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
