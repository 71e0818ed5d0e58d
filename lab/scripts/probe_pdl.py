#!/usr/bin/env python
"""What programmatic dependent launch (PDL) buys between small kernels, on one GPU: a chain of 400 small
dependent Triton kernels (an RMSNorm-like pass over 2,048 values per program) captured in a CUDA graph,
with and without PDL, alone and with a cuBLAS gemv after every fourth kernel (as cuBLAS projections
interrupt chapter 09's chains). Wrote results/probe/h200_pdl_micro_2026-11-28.json (results/LOG.md).

    python scripts/probe_pdl.py OUT_DIR      # writes OUT_DIR/pdl_micro.json
"""
import json, os, sys
import torch, triton, triton.language as tl

from probe_fast import graph_time_us

@triton.jit
def _step(x_ptr, y_ptr, N: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N).to(tl.float32)
    s = tl.sum(x * x, axis=0)
    tl.store(y_ptr + i, (x * tl.rsqrt(s / BLOCK + 1e-6)).to(y_ptr.dtype.element_ty), mask=i < N)

def chain(bufs, progs, pdl, gemv_every=0, w=None):
    for j in range(len(bufs) - 1):
        _step[(progs,)](bufs[j], bufs[j + 1], N=2048 * progs, BLOCK=2048, USE_GDC=pdl, launch_pdl=pdl, num_warps=4)
        if gemv_every and j % gemv_every == 0:
            torch.nn.functional.linear(bufs[j + 1][None, :2048], w)

res = {}
n = 400
w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
for progs in (1, 16, 128):
    bufs = [torch.randn(2048 * progs, device="cuda", dtype=torch.bfloat16) for _ in range(n + 1)]
    for pdl in (False, True):
        for gemv_every in (0, 4):
            key = f"progs{progs}_pdl{int(pdl)}_gemv{gemv_every}"
            res[key] = graph_time_us([lambda: chain(bufs, progs, pdl, gemv_every, w)], repeat=20) / n
            print(key, f"{res[key]:.2f} us per small kernel", flush=True)
    # same result?
    outs = []
    for pdl in (False, True):
        chain(bufs, progs, pdl); torch.cuda.synchronize(); outs.append(bufs[-1].clone())
    print("same output:", torch.equal(outs[0], outs[1]))
json.dump(res, open(os.path.join(sys.argv[1], "pdl_micro.json"), "w"), indent=1)
