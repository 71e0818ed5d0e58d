#!/usr/bin/env python
"""Compare greedy outputs of capstone runs (their --json reports), prompt by prompt.

    python scripts/compare_outputs.py results/capstone/capstone_*.json

The first file is the baseline. For each other run and prompt it prints where the tokens first differ,
and the top-2 logit gap of both runs at that step (reports written with --record_margins): a gap
within bfloat16's rounding of the logits means the two runs met a near-tie, not a bug.
"""
import json
import sys
from pathlib import Path


def first_divergence(a: list[int], b: list[int]) -> int | None:
    "Index of the first differing token, or None if one is a prefix of the other."
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def describe(run: dict) -> str:
    layout = run["layout"]
    return f"tp={layout['tp_size']} ep={layout['ep_size']}{'' if layout.get('fast_paths', True) else ' (fast paths off)'}"


def main(paths: list[str]) -> int:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = runs[0]
    print(f"baseline: {describe(base)} ({paths[0]})")
    for path, run in zip(paths[1:], runs[1:]):
        for i, (ref, out) in enumerate(zip(base["outputs"], run["outputs"])):
            n = min(len(ref["output_ids"]), len(out["output_ids"]))
            at = first_divergence(ref["output_ids"][:n], out["output_ids"][:n])
            if at is None:
                print(f"{describe(run)}: prompt {i}: the first {n} tokens agree")
            else:
                gaps = [m["margins"][at] if m.get("margins") else float("nan") for m in (ref, out)]
                print(f"{describe(run)}: prompt {i}: first differs at token {at} of {n}; top-2 logit gap there "
                      f"{gaps[0]:.4f} (baseline) / {gaps[1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
