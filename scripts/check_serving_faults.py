#!/usr/bin/env python
"""Keep an OpenAI-compatible server busy with valid and invalid requests for a while, some clients hanging
up mid-stream; then check that it is still up, that every valid request got its whole answer and every
invalid one a 400 with OpenAI's error body, and that every KV-cache page came back.

    python scripts/check_serving_faults.py --base_url http://127.0.0.1:30000 --seconds 300 \\
        --concurrency 64 --out results/serving

Each of --concurrency clients sends one request after another, of a kind drawn at random (seeded):
  stream, whole, chat   valid: prompts of token ids (chat: text), `ignore_eos`, so each must return exactly
                        max_tokens tokens with finish_reason "length";
  disconnect            a streamed request whose client reads a few chunks and closes the connection;
  bad_json, unknown_model, bad_value, too_long
                        must be answered 400 with {"error": {"message", "type", ...}}.
Writes a JSON report (counts per kind, the first failures, /health before and after) and exits non-zero
if any check failed. Needs only httpx.
"""
import argparse
import asyncio
import datetime
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench_common import write_report

KINDS = {"stream": 4, "whole": 2, "chat": 1, "disconnect": 2, "bad_json": 1, "unknown_model": 1, "bad_value": 1,
         "too_long": 1}  # relative frequencies


class Check:
    "One client's requests: each kind's outcome counted, the first failures kept."

    def __init__(self, args, model: str, context: int):
        self.args, self.model, self.context = args, model, context
        self.counts, self.failures = Counter(), []

    def fail(self, kind: str, why: str) -> None:
        self.counts[kind + ":failed"] += 1
        if len(self.failures) < 20:
            self.failures.append(f"{kind}: {why}")

    def prompt(self, rng: random.Random) -> list[int]:
        return [rng.randrange(self.args.vocab) for _ in range(rng.randint(1, self.args.max_prompt))]

    async def valid(self, client, kind: str, rng: random.Random) -> None:
        max_tokens = rng.randint(1, self.args.max_tokens)
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]),
                "seed": rng.randrange(1000), "ignore_eos": True}
        url = self.args.base_url + ("/v1/chat/completions" if kind == "chat" else "/v1/completions")
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "Say something. " * rng.randint(1, 8)}]
        else:
            body["prompt"] = self.prompt(rng)
        if kind == "stream":
            body.update(stream=True, stream_options={"include_usage": True})
            finish, usage, done = None, None, False
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    return self.fail(kind, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data:"):
                        chunk = json.loads(line[5:])
                        finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                        usage = chunk.get("usage") or usage
            tokens = usage and usage["completion_tokens"]
            if not done or finish != "length" or tokens != max_tokens:
                return self.fail(kind, f"[DONE] {done}, finish_reason {finish}, {tokens} of {max_tokens} tokens")
        else:
            r = await client.post(url, json=body)
            if r.status_code != 200:
                return self.fail(kind, f"HTTP {r.status_code}: {r.text[:200]}")
            reply = r.json()
            finish, tokens = reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]
            if finish != "length" or tokens != max_tokens:
                return self.fail(kind, f"finish_reason {finish}, {tokens} of {max_tokens} tokens")
        self.counts[kind] += 1

    async def disconnect(self, client, rng: random.Random) -> None:
        body = {"model": self.model, "prompt": self.prompt(rng), "max_tokens": self.args.max_tokens,
                "stream": True, "ignore_eos": True}
        chunks = rng.randint(0, 5)
        async with client.stream("POST", self.args.base_url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return self.fail("disconnect", f"HTTP {r.status_code}")
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen > chunks:
                    break  # leaving the block closes the connection mid-stream
        self.counts["disconnect"] += 1

    async def invalid(self, client, kind: str, rng: random.Random) -> None:
        url = self.args.base_url + "/v1/completions"
        good = {"model": self.model, "prompt": self.prompt(rng), "max_tokens": 4}
        if kind == "bad_json":
            r = await client.post(url, content=b'{"model": "x", "prompt": [1, 2', headers={
                "Content-Type": "application/json"})
        elif kind == "unknown_model":
            r = await client.post(url, json={**good, "model": "no-such-model"})
        elif kind == "bad_value":
            bad = rng.choice([{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 3}, {"top_p": 2},
                              {"prompt": [self.args.vocab + 5]}, {"prompt": []}])
            r = await client.post(url, json={**good, **bad})
        else:  # too_long: a prompt, or a prompt and max_tokens, beyond the context
            over = rng.choice([{"prompt": [1] * (self.context + 1)}, {"max_tokens": self.context + 1}])
            r = await client.post(url, json={**good, **over})
        try:
            error = r.json()["error"]
            well_formed = bool(error["message"]) and error["type"] == "invalid_request_error"
        except (ValueError, KeyError, TypeError):
            well_formed = False
        if r.status_code != 400 or not well_formed:
            return self.fail(kind, f"HTTP {r.status_code}: {r.text[:200]}")
        self.counts[kind] += 1

    async def client_loop(self, client, rng: random.Random, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                if kind in ("stream", "whole", "chat"):
                    await self.valid(client, kind, rng)
                elif kind == "disconnect":
                    await self.disconnect(client, rng)
                else:
                    await self.invalid(client, kind, rng)
            except httpx.HTTPError as exc:
                self.fail(kind, f"{type(exc).__name__}: {exc}")


async def health(client, base_url: str) -> dict | None:
    try:
        r = await client.get(base_url + "/health")
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def all_pages_back(h: dict | None) -> bool:
    "Nothing runs or waits, and every page is free or held only by the prefix cache (reclaimable)."
    return (h is not None and h["running"] == 0 and h["waiting"] == 0
            and h["kv_pages"]["free"] + h["kv_pages"]["cached"] == h["kv_pages"]["total"])


async def run(args) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout),
                                 limits=httpx.Limits(max_connections=None)) as client:
        models = (await client.get(args.base_url + "/v1/models")).json()["data"][0]
        check = Check(args, models["id"], models["max_model_len"])
        before = await health(client, args.base_url)
        start = time.monotonic()
        deadline = start + args.seconds
        await asyncio.gather(*[check.client_loop(client, random.Random(args.seed * 1000 + i), deadline)
                               for i in range(args.concurrency)])
        seconds = time.monotonic() - start
        # The last aborts and requests settle within a few steps.
        settle = time.monotonic() + args.settle_seconds
        after = await health(client, args.base_url)
        while not all_pages_back(after) and time.monotonic() < settle:
            await asyncio.sleep(0.5)
            after = await health(client, args.base_url)
    valid = sum(check.counts[k] + check.counts[k + ":failed"] for k in ("stream", "whole", "chat"))
    return {"base_url": args.base_url, "model": check.model, "context": check.context, "seconds": seconds,
            "concurrency": args.concurrency, "seed": args.seed, "counts": dict(sorted(check.counts.items())),
            "valid_requests": valid, "failures": check.failures, "server_up": after is not None,
            "all_pages_back": all_pages_back(after), "health_before": before, "health_after": after,
            "date": datetime.date.today().isoformat()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:30000")
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max_prompt", type=int, default=1024, help="valid prompts: 1 to this many token ids")
    p.add_argument("--max_tokens", type=int, default=256, help="valid requests: 1 to this many new tokens")
    p.add_argument("--vocab", type=int, default=151936, help="token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request_timeout", type=float, default=600)
    p.add_argument("--settle_seconds", type=float, default=60)
    p.add_argument("--out", default=None, help="write the JSON report into this directory")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    report = asyncio.run(run(args))
    failed = sum(n for k, n in report["counts"].items() if k.endswith(":failed"))
    ok = failed == 0 and report["server_up"] and report["all_pages_back"]
    print(f"{sum(report['counts'].values())} requests in {report['seconds']:.0f} s ({report['valid_requests']} valid), "
          f"{failed} failed; server up: {report['server_up']}; every page back: {report['all_pages_back']}")
    for failure in report["failures"]:
        print("  " + failure)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = write_report(report, out / f"faults_{report['date']}{args.tag}.json")
        print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
