#!/usr/bin/env python
"""Load an OpenAI-compatible server (ours or another engine's) with a seeded workload and measure it.

    python scripts/bench_serving.py --base_url http://127.0.0.1:30000 --model NAME \\
        --workload mixed --requests 1000 --request_rate inf --out results/serving

Requests go out as a Poisson process at --request_rate per second (inf: all at once), or with at most
--concurrency in flight. Every request streams (`stream: true`), so the client sees each token arrive:
time to first token (TTFT), time per output token after the first (TPOT), and the gaps between
consecutive chunks (inter-token latency, ITL), each at p50/p90/p99, with request and output
throughput, as one JSON file. Workloads (token-id prompts, so any tokenizer works):
  mixed    prompts of 16-2,048 tokens and outputs of 16-1,024, log-uniform (the runtime bench's);
  prefix   --systems shared system prompts of --system_len tokens, each request adding 64 tokens;
  random   prompts and outputs uniform in [--min_len, --max_len].
"""
import argparse
import asyncio
import datetime
import json
import math
import random
import sys
import time
from pathlib import Path

import httpx

from bench_common import Workload, mixed_workload, percentiles, prefix_workload, random_workload, write_report


def workload(args) -> Workload:
    "(prompt token ids, max_tokens) per request: the offline bench's workloads, seed for seed."
    seed = {} if args.seed is None else {"seed": args.seed}  # None: the workload's own default seed
    if args.workload == "mixed":
        return mixed_workload(args.requests, args.vocab, **seed)
    if args.workload == "prefix":
        return prefix_workload(args.requests, args.vocab, args.systems, args.system_len, **seed)
    return random_workload(args.requests, args.vocab, args.min_len, args.max_len, **seed)


async def one_request(client: httpx.AsyncClient, args, prompt: list[int], max_tokens: int) -> dict:
    "Send one streamed completion; time each chunk's arrival."
    body = {"model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens, error = [], 0, None
    try:
        async with client.stream("POST", args.base_url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices"):  # tokens arrived (text may be held back: half a character)
                        arrivals.append(time.perf_counter() - start)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - start
    return {"prompt_tokens": len(prompt), "output_tokens": tokens, "latency": latency, "arrivals": arrivals,
            "error": error}


async def run(args) -> dict:
    requests = workload(args)
    limits = httpx.Limits(max_connections=None if args.concurrency == 0 else args.concurrency)
    semaphore = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    rng = random.Random((args.seed or 0) + 1)  # the arrival times' own stream
    progress = None
    try:
        from tqdm import tqdm
        progress = tqdm(total=len(requests), desc="requests", file=sys.stderr)
    except ImportError:
        pass

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def send(i, prompt, max_tokens, delay):
            await asyncio.sleep(delay)
            if semaphore is not None:
                async with semaphore:
                    result = await one_request(client, args, prompt, max_tokens)
            else:
                result = await one_request(client, args, prompt, max_tokens)
            if progress is not None:
                progress.update(1)
            return result

        delays, t = [], 0.0
        for _ in requests:
            delays.append(t)
            if math.isfinite(args.request_rate):
                t += rng.expovariate(args.request_rate)
        start = time.perf_counter()
        results = await asyncio.gather(*[send(i, p, n, d) for i, ((p, n), d) in enumerate(zip(requests, delays))])
        seconds = time.perf_counter() - start
    if progress is not None:
        progress.close()
    good = [r for r in results if r["error"] is None]
    ttft = [r["arrivals"][0] for r in good if r["arrivals"]]
    tpot = [(r["latency"] - r["arrivals"][0]) / (r["output_tokens"] - 1) for r in good
            if r["arrivals"] and r["output_tokens"] > 1]
    itl = [b - a for r in good for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    output_tokens = sum(r["output_tokens"] for r in good)
    return {"base_url": args.base_url, "model": args.model, "workload": args.workload, "requests": len(results),
            "failed": len(results) - len(good), "errors": sorted({r["error"] for r in results if r["error"]})[:5],
            "request_rate": args.request_rate, "concurrency": args.concurrency, "seconds": seconds,
            "request_throughput": len(good) / seconds, "output_tokens": output_tokens,
            "output_tokens_per_second": output_tokens / seconds,
            "prompt_tokens": sum(r["prompt_tokens"] for r in good),
            "time_to_first_token_seconds": percentiles(ttft), "time_per_output_token_seconds": percentiles(tpot),
            "inter_token_latency_seconds": percentiles(itl), "date": datetime.date.today().isoformat()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:30000")
    p.add_argument("--model", required=True, help="the name the server serves (GET /v1/models)")
    p.add_argument("--workload", choices=["mixed", "prefix", "random"], default="mixed")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--request_rate", type=float, default=math.inf, help="requests per second, Poisson (inf: all at once)")
    p.add_argument("--concurrency", type=int, default=0, help="at most this many in flight (0: no limit)")
    p.add_argument("--seed", type=int, default=None, help="the workload's seed (default: bench_runtime.py's)")
    p.add_argument("--vocab", type=int, default=151936, help="token ids are drawn below this")
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--system_len", type=int, default=1024)
    p.add_argument("--min_len", type=int, default=16)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--out", default=None, help="write the JSON report into this directory")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    report = asyncio.run(run(args))
    summary = (f"{report['requests'] - report['failed']}/{report['requests']} requests in {report['seconds']:.1f} s: "
               f"{report['output_tokens_per_second']:.0f} output tok/s")
    if report["time_to_first_token_seconds"]:
        summary += (f", TTFT p50 {report['time_to_first_token_seconds']['p50'] * 1e3:.0f} ms, TPOT p50 "
                    f"{report['time_per_output_token_seconds'].get('p50', 0) * 1e3:.1f} ms")
    print(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = write_report(report, out / f"serving_{args.workload}_{report['date']}{args.tag}.json")
        print(f"wrote {path}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
