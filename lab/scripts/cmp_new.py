"""Host and device time of a 1x512 prefill and of one batch-1 decode step (new tree), 8 layers of the real shape."""
import time, torch, dataclasses, sys
from minisgl.config import preset
from minisgl.distributed import ParallelContext
from minisgl.fast_ops import fast_ops
from minisgl.generation import StaticEngine
from minisgl.launch import make_runner
from minisgl.loader import DummySource
from minisgl.model import Qwen3MoeForCausalLM
from minisgl.sampling import SamplingParams, SamplingTensors
from torch.profiler import ProfilerActivity, profile
cfg = dataclasses.replace(preset("qwen3-30b-a3b"), num_hidden_layers=8)
ctx = ParallelContext.single("cuda")
ops = fast_ops(ctx, cfg.hidden_size, torch.bfloat16)
model = Qwen3MoeForCausalLM(cfg, ctx, torch.bfloat16, max_positions=1024, ops=ops)
model.load(DummySource(cfg, device="cuda"))
runner = make_runner(model, 1, 1024, graphs=True)
eng = StaticEngine(runner)
eng.reserve_rows(1, 1024)
prompt = torch.randint(0, 1000, (512,)).tolist()
def prefill():
    return runner.extend(prompt, [512], [0], [0])
for _ in range(3): prefill()
torch.cuda.synchronize()
ts = []
for _ in range(10):
    t = time.perf_counter(); prefill(); t1 = time.perf_counter(); torch.cuda.synchronize(); ts.append((t1 - t, time.perf_counter() - t))
print("new prefill host launch ms %.2f, total ms %.2f" % (1e3 * sorted(ts)[5][0], 1e3 * sorted(ts)[5][1]))
with profile(activities=[ProfilerActivity.CPU]) as prof:
    prefill(); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
sampling = SamplingTensors.from_params([SamplingParams()], "cuda")
def step(pos):
    logits = runner.decode([0], [pos], 1)
    return runner.sample(logits, sampling)
for p in range(512, 520): step(p)
torch.cuda.synchronize()
n = 200; t = time.perf_counter()
for p in range(520, 520 + n): step(p)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
g = runner.graphs[1]
e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
e0.record()
for _ in range(n): g.replay()
e1.record(); torch.cuda.synchronize()
print("new decode step us %.1f, graph replay alone us %.1f" % (1e6 * dt, 1e3 * e0.elapsed_time(e1) / n))
