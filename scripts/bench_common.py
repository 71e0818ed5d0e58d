"""What the benchmark scripts share: their seeded workloads, percentiles, and where and how a report is written.

The offline runtime bench (`bench_runtime.py`) and the serving bench (`bench_serving.py`) draw their workloads
here, so "the same workload" is the same list of token ids and output lengths, seed for seed.
"""
import math
import os
import random
import re
import statistics
from pathlib import Path

from minisgl.launch import write_report
from minisgl.sampling import SamplingParams

Workload = list[tuple[list[int], int]]  # (prompt token ids, max new tokens) per request


def log(*args):
    "Print on rank 0 only (torchrun sets RANK), at once."
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def percentiles(values: list[float]) -> dict:
    "p50/p90/p99 (nearest rank) and the mean; {} for no values."
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": sum(ordered) / len(ordered)}


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    "An integer in [low, high), log-uniform: as many draws in 16-32 as in 1,024-2,048."
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def mixed_workload(count: int, vocab: int, seed: int = 0) -> Workload:
    "Prompts of 16-2,048 tokens and outputs of 16-1,024, log-uniform: many short requests, a long tail."
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt = [rng.randrange(vocab) for _ in range(log_uniform(rng, 16, 2048))]
        requests.append((prompt, log_uniform(rng, 16, 1024)))
    return requests


def prefix_workload(count: int, vocab: int, systems: int = 8, system_len: int = 1024, seed: int = 1) -> Workload:
    "Requests on `systems` shared system prompts of `system_len` tokens, each with its own 64-token question, 64 new."
    rng = random.Random(seed)
    system_prompts = [[rng.randrange(vocab) for _ in range(system_len)] for _ in range(systems)]
    return [(system_prompts[i % systems] + [rng.randrange(vocab) for _ in range(64)], 64) for i in range(count)]


def random_workload(count: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> Workload:
    "Prompt and output lengths uniform in [min_len, max_len]."
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))], rng.randint(min_len, max_len))
            for _ in range(count)]


def report_path(out_dir: str | Path, gpu: str, tp_size: int, ep_size: int, date: str, tag: str = "") -> Path:
    "results/<kind>/<gpu>_tp<T>_ep<E>_<date><tag>.json, the GPU's name as a slug ('nvidia-h200'); the folder made."
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{slug}_tp{tp_size}_ep{ep_size}_{date}{tag}.json"


def run_generate(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    "Greedy generation on a `StaticEngine` (the bare model runner), timed by its own stats."
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    results = engine.generate(prompts, params)
    s = engine.stats
    return {"sequences": len(prompts), "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens,
            "time_to_first_token_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
            "decode_steps": s.decode_steps,
            # Host time per step: far below the step time when the CPU runs ahead of the GPU, as it should.
            "host_seconds_per_step_median": statistics.median(s.per_step_seconds) if s.per_step_seconds else None,
            "decode_tokens_per_second": len(prompts) * s.decode_steps / s.decode_seconds if s.decode_seconds else None,
            "output_tokens_per_second": len(prompts) * new_tokens / (s.prefill_seconds + s.decode_seconds),
            "first_output_ids": results[0].output_ids[:16]}


__all__ = ["Workload", "log", "percentiles", "log_uniform", "mixed_workload", "prefix_workload", "random_workload",
           "report_path", "run_generate", "write_report"]
