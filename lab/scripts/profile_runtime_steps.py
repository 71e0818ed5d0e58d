"""Profile the runtime's first steps on the mixed workload (mostly eager steps: prompt chunks with decodes
riding along), after a warm-up: each step's kind, sizes and device time, then the kernels by CUDA time.

    PYTHONPATH=.:scripts python lab/scripts/profile_runtime_steps.py --steps 25 --out DIR
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import mixed_workload
from minisgl.llm import LLM
from minisgl.sampling import SamplingParams


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=".")
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=96)
    args = p.parse_args()
    llm = LLM(preset=args.preset, device=args.device, ignore_eos=True, max_seq_len=4096 if args.device == "cuda" else 512, max_running_requests=256,
              **({"max_total_tokens": 20000} if args.device == "cpu" else {}))
    engine, vocab = llm.engine, llm.config.vocab_size
    warm = mixed_workload(args.warmup, vocab, seed=7)
    llm.generate([p[:200] for p, _ in warm], [SamplingParams(max_new_tokens=min(n, 32)) for _, n in warm])
    engine.reset_prefix_cache()
    for prompt, n in mixed_workload(args.requests, vocab):
        if args.device == "cpu":  # the tiny model's context
            prompt, n = prompt[:200], min(n, 100)
        engine.add(prompt, SamplingParams(max_new_tokens=n))
    lines, launch = [], engine._launch

    def traced(plan, replicas):
        start = time.perf_counter()
        step = launch(plan, replicas)
        host_ms = 1e3 * (time.perf_counter() - start)
        lines.append((step, host_ms, plan.num_decodes, plan.num_tokens - plan.num_decodes,
                      len(plan.requests) - plan.num_decodes, max(plan.lengths, default=0)))
        return step

    engine._launch = traced
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        engine.flush()
    if args.device == "cuda":
        torch.cuda.synchronize()
    out = [f"{'kind':6} {'decodes':>7} {'prompt tok':>10} {'chunks':>6} {'longest':>7} {'host ms':>8} {'device ms':>9}"]
    for step, host_ms, decodes, prompt, chunks, longest in lines:
        device_ms = step.started.elapsed_time(step.done) if step.done is not None else float("nan")
        out.append(f"{'graph' if step.graph else 'eager':6} {decodes:7d} {prompt:10d} {chunks:6d} {longest:7d} "
                   f"{host_ms:8.1f} {device_ms:9.1f}")
    out.append(prof.key_averages().table(sort_by="self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total", row_limit=30, max_name_column_width=60))
    text = "\n".join(out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_runtime_steps.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
