#!/usr/bin/env python
"""Probe the fast forward on one GPU at the real shape: agreement with the plain model, step times, profile.

    python scripts/probe_fast.py --out DIR
"""
import argparse
import json
import time
from pathlib import Path

import torch

from minisgl.config import preset
from minisgl.distributed import ParallelContext
from minisgl.fast import FastForward
from minisgl.layers.attention import AttentionBatch
from minisgl.loader import DummySource
from minisgl.model import Qwen3MoeForCausalLM


def timed(fn, repeat=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def sweep():
    "Block sizes of the MoE and gemv kernels at the real shape, weights rotated so L2 does not flatter them."
    import itertools
    import triton.testing
    from minisgl.kernels.triton_kernels import gemv, moe_down, moe_gate_up
    torch.manual_seed(0)
    dev = "cuda"
    w13 = torch.randn(128, 1536, 2048, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(128, 2048, 768, device=dev, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    id_sets = [torch.randperm(128, device=dev)[:8] for _ in range(16)]
    h = torch.randn(8, 768, device=dev, dtype=torch.bfloat16)
    res = {}
    def bench(fn):
        i = [0]
        def call():
            i[0] = (i[0] + 1) % 16
            fn(id_sets[i[0]])
        return triton.testing.do_bench(call, warmup=20, rep=60, return_mode="median") * 1e3  # us
    best = {}
    for name, nbytes, make in [("gate_up", 8 * 1536 * 2048 * 2, lambda cfg: (lambda ids: moe_gate_up(x, w13, ids, 8, cfg))),
                               ("down", 8 * 2048 * 768 * 2, lambda cfg: (lambda ids: moe_down(h, w2, ids, None, 1, cfg)))]:
        rows = []
        for cfg in itertools.product((8, 16, 32), (128, 256, 512), (2, 4, 8)):
            try:
                us = bench(make(cfg))
            except Exception as e:
                continue
            rows.append((us, cfg))
        rows.sort()
        res[name] = [(round(us, 2), cfg, round(nbytes / us / 1e3, 1)) for us, cfg in rows[:6]]
        best[name] = rows[0][1]
        print(name, res[name], flush=True)
    ws = {"qkv": [torch.randn(5120, 2048, device=dev, dtype=torch.bfloat16) for _ in range(8)],
          "o": [torch.randn(2048, 4096, device=dev, dtype=torch.bfloat16) for _ in range(8)]}
    gemv_rows = []
    for cfg in itertools.product((8, 16, 32), (128, 256, 512), (2, 4, 8)):
        total = 0
        for name, wl in ws.items():
            xx = torch.randn(1, wl[0].shape[1], device=dev, dtype=torch.bfloat16)
            total += triton.testing.do_bench(lambda: [gemv(xx, w, cfg) for w in wl], warmup=20, rep=60,
                                             return_mode="median") * 1e3 / 8
        gemv_rows.append((total, cfg))
    gemv_rows.sort()
    cublas = 0
    for name, wl in ws.items():
        xx = torch.randn(1, wl[0].shape[1], device=dev, dtype=torch.bfloat16)
        cublas += triton.testing.do_bench(lambda: [torch.nn.functional.linear(xx, w) for w in wl], warmup=20,
                                          rep=60, return_mode="median") * 1e3 / 8
    res["gemv"] = [(round(t, 2), c) for t, c in gemv_rows[:6]]
    res["cublas_qkv_plus_o_us"] = round(cublas, 2)
    print("gemv qkv+o", res["gemv"], "cublas", cublas, flush=True)
    res["gate_up_best"], res["down_best"], res["gemv_best"] = best["gate_up"], best["down"], gemv_rows[0][1]
    del w13, w2, ws
    torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=48)
    args = p.parse_args()
    out = {}
    torch.cuda.set_device(0)
    out["sweep"] = sweep()
    import minisgl.kernels.triton_kernels as K
    import minisgl.fast as FF
    K.MOE_BLOCKS["gate_up"] = tuple(out["sweep"]["gate_up_best"])
    K.MOE_BLOCKS["down"] = tuple(out["sweep"]["down_best"])
    K.GEMV_BLOCKS = tuple(out["sweep"]["gemv_best"])
    print("chosen", K.MOE_BLOCKS, K.GEMV_BLOCKS, flush=True)
    ctx = ParallelContext.single("cuda")
    hf = dict(__import__("minisgl.config", fromlist=["x"]).QWEN3_30B_A3B_CONFIG)
    hf["num_hidden_layers"] = args.layers
    from minisgl.config import ModelConfig
    config = ModelConfig.from_dict(hf)
    t = time.perf_counter()
    model = Qwen3MoeForCausalLM(config, ctx, dtype=torch.bfloat16, max_positions=1024)
    model.load(DummySource(config, seed=0, device="cuda"))
    torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t
    print("loaded", out["load_s"], flush=True)

    prompt = torch.randint(0, config.vocab_size, (512,)).tolist()
    # reference: prefill + 8 decode steps
    kv = model.make_kv_cache(1, 1024)
    with torch.no_grad():
        b = AttentionBatch.build([512], [0], device="cuda")
        ids = torch.tensor(prompt, device="cuda")
        ref_logits = [model(ids, b, kv, logits_index=torch.tensor([511], device="cuda"))]
        toks = ref_logits[0].argmax(-1)
        ref_toks = [toks.item()]
        for s in range(8):
            b = AttentionBatch.build([1], [512 + s], device="cuda")
            ref_logits.append(model(toks, b, kv))
            toks = ref_logits[-1].argmax(-1)
            ref_toks.append(toks.item())

        def ref_step():
            bb = AttentionBatch.build([1], [600], device="cuda")
            model(toks, bb, kv)
        out["eager_decode_step_ms"] = timed(ref_step, 5) * 1e3
        print("eager step ms", out["eager_decode_step_ms"], flush=True)

        fast = FastForward(model)
        padded = fast.prepare(1, 1024)
        logits = fast.prefill([prompt])
        errs = [(logits.float() - ref_logits[0].float()).abs().max().item()]
        toks = ref_logits[0].argmax(-1)
        fast_toks = [logits.argmax(-1).item()]
        for s in range(8):
            lg = fast.decode(toks, torch.tensor([512 + s], device="cuda"), padded)
            errs.append((lg.float() - ref_logits[s + 1].float()).abs().max().item())
            fast_toks.append(lg.argmax(-1).item())
            toks = ref_logits[s + 1].argmax(-1)  # teacher-force the reference's tokens
        out["fast_vs_ref_max_abs_logit_err"] = errs
        out["ref_tokens"], out["fast_tokens"] = ref_toks, fast_toks
        top2 = ref_logits[0].float().topk(2).values
        out["ref_logit_scale"] = ref_logits[0].float().abs().max().item()
        print("errs", errs, ref_toks, fast_toks, flush=True)

        pos = torch.tensor([600], device="cuda")
        for use_gemv in (0, 1):
            FF.GEMV_MAX_TOKENS = use_gemv
            fast.graphs = {}
            padded = fast.prepare(1, 1024)
            tk = torch.randint(0, 1000, (1,), device="cuda")
            ps = torch.full((1,), 600, device="cuda")
            ms = timed(lambda: fast.decode(tk, ps, padded), 50) * 1e3
            out[f"graph_decode_step_ms_b1_gemv{use_gemv}"] = ms
            print(f"graph decode b1 gemv={use_gemv}: {ms:.3f} ms/step = {1 / ms * 1e3:.0f} tok/s", flush=True)
        FF.GEMV_MAX_TOKENS = 1 if out["graph_decode_step_ms_b1_gemv1"] < out["graph_decode_step_ms_b1_gemv0"] else 0
        fast.graphs = {}
        for bsz in [1, 8, 64, 256]:
            padded = fast.prepare(bsz, 1024)
            tk = torch.randint(0, 1000, (bsz,), device="cuda")
            ps = torch.full((bsz,), 600, device="cuda")
            ms = timed(lambda: fast.decode(tk, ps, padded), 20) * 1e3
            out[f"graph_decode_step_ms_b{bsz}"] = ms
            print(f"graph decode b{bsz}: {ms:.3f} ms/step = {bsz / ms * 1e3:.0f} tok/s", flush=True)
            ms = timed(lambda: fast._decode_eager(tk, ps, fixed_shapes=True), 5) * 1e3
            out[f"fasteager_decode_step_ms_b{bsz}"] = ms
            print(f"fast eager decode b{bsz}: {ms:.3f} ms/step", flush=True)

        prompts = [torch.randint(0, 1000, (512,)).tolist() for _ in range(16)]
        fast.prepare(16, 1024)
        ms = timed(lambda: fast.prefill(prompts), 3) * 1e3
        out["prefill_8192_ms"] = ms
        print(f"prefill 8192 tokens: {ms:.1f} ms = {8192 / ms * 1e3:.0f} tok/s", flush=True)

        fast.prepare(1, 1024)
        from torch.profiler import ProfilerActivity, profile
        tk, ps = torch.tensor([5], device="cuda"), torch.tensor([600], device="cuda")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fast._decode_eager(tk, ps, fixed_shapes=True)
            torch.cuda.synchronize()
        try:
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        except Exception:
            table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
        Path(args.out, "profile_fast_b1.txt").write_text(table)
        print(table[:2500], flush=True)
        for name, fn in [("prefill8192", lambda: (fast.prepare(16, 1024), fast.prefill(prompts))),
                         ("decode_b256", lambda: (fast.prepare(256, 1024), fast._decode_eager(
                             torch.randint(0, 1000, (256,), device="cuda"), torch.full((256,), 600, device="cuda"),
                             fixed_shapes=True)))]:
            fn()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            try:
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
            except Exception:
                table = prof.key_averages().table(sort_by="device_time_total", row_limit=20)
            Path(args.out, f"profile_{name}.txt").write_text(table)
    Path(args.out, "probe.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
