"""The runtime's scheduler on the mixed workload with a cost model of one H200's steps instead of a GPU:
how many steps of which size continuous and static batching take, and the time the model predicts."""
import bisect
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_common import mixed_workload  # noqa: E402

from minisgl.runtime.request import Request
from minisgl.runtime.scheduler import Scheduler
from minisgl.sampling import SamplingParams

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
POINTS = [(1, 2.7), (8, 8.0), (16, 12.0), (32, 15.0), (64, 17.5), (128, 19.5), (256, 22.6)]  # ms per graph step


def graph_ms(b):
    for (b0, t0), (b1, t1) in zip(POINTS, POINTS[1:]):
        if b <= b1:
            return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
    return POINTS[-1][1]


def simulate(static, max_rows=256, prefill_tok_s=73e3, eager_ms=50.0, admit_group=None):
    s = Scheduler(39066, 16, max_rows, 4096, 8192, True, static)
    if admit_group:
        s.admit_group = admit_group
    for i, (p, n) in enumerate(mixed_workload(1000, 151936)):
        s.add(Request(i, p, SamplingParams(max_new_tokens=n)))
    rng, ms, steps, mixed, batch_sum, prev = random.Random(0), 0.0, 0, 0, 0, None
    while s.num_unfinished or prev:
        plan = s.schedule()
        if plan.requests:
            steps += 1
            if plan.is_decode:
                b = next(x for x in SIZES if x >= len(plan.requests))
                ms += graph_ms(b)
                batch_sum += len(plan.requests)
            else:
                mixed += 1
                ms += eager_ms + 1e3 * (plan.num_tokens - plan.num_decodes) / prefill_tok_s + 1.3 * graph_ms(plan.num_decodes)
        if prev is not None:
            s.update(prev, [rng.randrange(1000) for _ in range(prev.num_sampled)])
        prev = plan if plan.requests else None
    out = 240033
    return {"static": static, "steps": steps, "mixed": mixed, "mean_decode_batch": batch_sum / max(1, steps - mixed),
            "seconds": ms / 1e3, "tok_s": out / (ms / 1e3)}


if __name__ == "__main__":
    for kw in ({"static": False}, {"static": True}):
        print(simulate(**kw))
