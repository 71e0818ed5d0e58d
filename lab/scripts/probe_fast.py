#!/usr/bin/env python
"""Probe the fast forward on one GPU at the real shape: block-size sweeps of the MoE kernels (and of a
Triton gemv tried against cuBLAS for the attention projections), agreement with the plain model, step
times at several batch sizes, and kernel profiles. Wrote results/probe/ (chapter 09, results/LOG.md).

    python scripts/probe_fast.py --out DIR
"""
import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

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


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)  # y[row, n block] = x[row] @ W[n block]^T, accumulated elementwise, reduced once
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + k, mask=k < K, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :],
                       other=0.0).to(tl.float32) * x[None, :]
    tl.store(y_ptr + row * N + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n < N)


def gemv(x, weight, blocks):
    "The experiment of results/LOG.md step 4: a Triton gemv for one token (it lost to cuBLAS)."
    block_n, block_k, warps = blocks
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _gemv_kernel[(x.shape[0], triton.cdiv(weight.shape[0], block_n))](
        x, weight, y, N=weight.shape[0], K=x.shape[1], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def sweep():
    "Block sizes of the MoE and gemv kernels at the real shape, weights rotated so L2 does not flatter them."
    import itertools
    import triton.testing
    from minisgl.kernels.moe import moe_down, moe_gate_up
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


def graph_time_us(fns, repeat=10):
    """Microseconds per call of the callables `fns`, captured one after another into one CUDA graph (no
    launch overhead) and replayed `repeat` times. Also used by probe_kernels.py and probe_pdl.py."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat / len(fns) * 1e6


def sweep_attention_and_projections():
    """Decode attention block sizes at batch 1 and 256 (600 cached tokens), and ways to run the attention
    projections at one token, each as a CUDA graph; weights rotate through 8 copies so L2 does not hold them."""
    from minisgl.kernels.attention import decode_attention
    result = {"attention": [], "projections": {}}
    for seqs in (1, 256):
        k_cache = torch.randn(seqs, 4, 1024, 128, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(seqs, 32, 128, dtype=torch.bfloat16, device="cuda")
        rows = torch.arange(seqs, device="cuda")
        lens = torch.full((seqs,), 600, device="cuda")
        ref = decode_attention(q, k_cache, v_cache, rows, lens, 128 ** -0.5, num_splits=16)
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    def call():
                        return decode_attention(q, k_cache, v_cache, rows, lens, 128 ** -0.5, block_n=block_n,
                                                num_warps=warps, num_stages=stages)
                    err = (call().float() - ref.float()).abs().max().item()
                    us = graph_time_us([call] * 20)
                    result["attention"].append({"seqs": seqs, "block_n": block_n, "num_warps": warps,
                                                "num_stages": stages, "us": us, "max_err": err})
                    print("attention", result["attention"][-1], flush=True)
    for name, out_features, in_features in [("qkv", 5120, 2048), ("o", 2048, 4096)]:
        weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
        x = torch.randn(1, in_features, dtype=torch.bfloat16, device="cuda")
        variants = {"F.linear": lambda w: torch.nn.functional.linear(x, w),
                    "torch.mv": lambda w: torch.mv(w, x[0])[None],
                    "w @ x.T": lambda w: (w @ x.t()).t()}
        for label, fn in variants.items():
            state = {"i": 0}

            def call():
                state["i"] = (state["i"] + 1) % 8
                return fn(weights[state["i"]])
            us = graph_time_us([call] * 48)
            result["projections"][f"{name} {label}"] = {"us": us, "tb_per_s": out_features * in_features * 2 / us / 1e6}
            print("projection", name, label, result["projections"][f"{name} {label}"], flush=True)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--skip_sweep", action="store_true", help="keep the block sizes in minisgl.kernels.moe")
    p.add_argument("--only_attention_sweep", action="store_true",
                   help="only sweep decode attention and the attention projections, then stop")
    args = p.parse_args()
    out = {}
    torch.cuda.set_device(0)
    if args.only_attention_sweep:
        Path(args.out, "attention_sweep.json").write_text(json.dumps(sweep_attention_and_projections(), indent=2))
        return
    import minisgl.kernels.moe as moe_kernels
    if not args.skip_sweep:
        out["sweep"] = sweep()
        moe_kernels.MOE_BLOCKS["gate_up"] = tuple(out["sweep"]["gate_up_best"])
        moe_kernels.MOE_BLOCKS["down"] = tuple(out["sweep"]["down_best"])
    print("MoE blocks", moe_kernels.MOE_BLOCKS, flush=True)
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
        out["ref_logit_scale"] = ref_logits[0].float().abs().max().item()
        print("errs", errs, ref_toks, fast_toks, flush=True)

        def decode_inputs(bsz):
            "Cache rows for bsz sequences at position 600 (captured size, tokens, positions)."
            return (fast.prepare(bsz, 1024), torch.randint(0, 1000, (bsz,), device="cuda"),
                    torch.full((bsz,), 600, device="cuda"))

        fast.graphs = {}
        for bsz in [1, 8, 64, 256]:
            padded, tk, ps = decode_inputs(bsz)
            ms = timed(lambda: fast.decode(tk, ps, padded), 20) * 1e3
            out[f"graph_decode_step_ms_b{bsz}"] = ms
            print(f"graph decode b{bsz}: {ms:.3f} ms/step = {bsz / ms * 1e3:.0f} tok/s", flush=True)
            ms = timed(lambda: fast._decode_eager(tk, ps, fixed_shapes=True), 5) * 1e3
            out[f"fasteager_decode_step_ms_b{bsz}"] = ms
            print(f"fast eager decode b{bsz}: {ms:.3f} ms/step", flush=True)

        # The same graphs without programmatic dependent launch: what the early launches buy.
        import minisgl.kernels.launch as launch
        launch.USE_PDL = False
        for bsz in [1, 256]:
            fast.graphs = {}
            padded, tk, ps = decode_inputs(bsz)
            ms = timed(lambda: fast.decode(tk, ps, padded), 20) * 1e3
            out[f"graph_decode_step_ms_b{bsz}_no_pdl"] = ms
            print(f"graph decode b{bsz} without PDL: {ms:.3f} ms/step = {bsz / ms * 1e3:.0f} tok/s", flush=True)
        launch.USE_PDL = True
        fast.graphs = {}

        # The generation loop around the graph: sampling, bookkeeping, and any gap between replays.
        from torch.profiler import ProfilerActivity, profile
        from minisgl.generation import Generator
        from minisgl.sampling import SamplingParams
        generator = Generator(model, 1024, fast=fast)
        generator.generate([prompt], SamplingParams(max_new_tokens=8))  # warm-up
        generator.generate([prompt], SamplingParams(max_new_tokens=129))
        out["generate_decode_ms_per_step_b1"] = generator.stats.decode_seconds / generator.stats.decode_steps * 1e3
        print("generate: decode ms/step at batch 1", out["generate_decode_ms_per_step_b1"], flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generator.generate([prompt], SamplingParams(max_new_tokens=17))
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=40)
        Path(args.out, "profile_generate_b1.txt").write_text(table)
        prof.export_chrome_trace(str(Path(args.out, "trace_generate_b1.json")))
        print(table[:6000], flush=True)

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
