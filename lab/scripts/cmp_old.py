"""The same two measurements on the old tree (FastForward)."""
import time, torch, dataclasses
from minisgl.config import preset
from minisgl.distributed import ParallelContext
from minisgl.fast import FastForward
from minisgl.loader import DummySource
from minisgl.model import Qwen3MoeForCausalLM
from minisgl.sampling import SamplingParams, sample
from torch.profiler import ProfilerActivity, profile
cfg = dataclasses.replace(preset("qwen3-30b-a3b"), num_hidden_layers=8)
ctx = ParallelContext.single("cuda")
model = Qwen3MoeForCausalLM(cfg, ctx, torch.bfloat16, max_positions=1024)
model.load(DummySource(cfg, device="cuda"))
fast = FastForward(model)
padded = fast.prepare(1, 1024)
prompt = torch.randint(0, 1000, (512,)).tolist()
def prefill():
    return fast.prefill([prompt])
for _ in range(3): prefill()
torch.cuda.synchronize()
ts = []
for _ in range(10):
    t = time.perf_counter(); prefill(); t1 = time.perf_counter(); torch.cuda.synchronize(); ts.append((t1 - t, time.perf_counter() - t))
print("old prefill host launch ms %.2f, total ms %.2f" % (1e3 * sorted(ts)[5][0], 1e3 * sorted(ts)[5][1]))
with profile(activities=[ProfilerActivity.CPU]) as prof:
    prefill(); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
params = SamplingParams()
tokens = torch.zeros(1, dtype=torch.long, device="cuda")
lens = torch.tensor([512], device="cuda")
def step(s):
    global tokens
    logits = fast.decode(tokens, lens + s, padded)
    tokens = sample(logits, params)
for s in range(8): step(s)
torch.cuda.synchronize()
n = 200; t = time.perf_counter()
for s in range(8, 8 + n): step(s)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
g = fast.graphs[padded][0]
e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
e0.record()
for _ in range(n): g.replay()
e1.record(); torch.cuda.synchronize()
print("old decode step us %.1f, graph replay alone us %.1f" % (1e6 * dt, 1e3 * e0.elapsed_time(e1) / n))
