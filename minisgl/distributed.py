"""Ranks, the tp x ep grid, its process groups, the collectives the engine uses, and simulated ranks."""

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    "The rank grid as arithmetic: `world = tp * ep`, TP groups are runs of consecutive ranks."
    tp_size: int = 1
    ep_size: int = 1

    def __post_init__(self):
        if self.tp_size < 1 or self.ep_size < 1:
            raise ValueError(f"tp_size and ep_size must be >= 1, got tp_size={self.tp_size}, ep_size={self.ep_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size

    def grid(self) -> torch.Tensor:
        "Rank of each (ep_rank, tp_rank): row i is TP group i (one attention replica), column j is EP group j."
        return torch.arange(self.world_size).view(self.ep_size, self.tp_size)

    def coords(self, rank: int) -> tuple[int, int]:
        "(tp_rank, ep_rank) of a rank."
        return rank % self.tp_size, rank // self.tp_size

    def tp_group_ranks(self) -> list[list[int]]:
        return self.grid().tolist()

    def ep_group_ranks(self) -> list[list[int]]:
        return self.grid().t().tolist()

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(f"world size {world_size} != tp_size {self.tp_size} x ep_size {self.ep_size} "
                             f"= {self.world_size}; launch {self.world_size} processes or change the layout")


@dataclass
class ParallelContext:
    """What one rank knows about the layout: its coordinates and its two process groups.

    A group of size 1 is stored as None, and every collective below is then a no-op, so
    single-process code runs the same path without a process group."""
    layout: ParallelLayout
    rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    @property
    def tp_size(self) -> int: return self.layout.tp_size
    @property
    def ep_size(self) -> int: return self.layout.ep_size
    @property
    def world_size(self) -> int: return self.layout.world_size
    @property
    def tp_rank(self) -> int: return self.layout.coords(self.rank)[0]
    @property
    def ep_rank(self) -> int: return self.layout.coords(self.rank)[1]

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelContext":
        "One process, no process group: tp = ep = 1."
        return cls(ParallelLayout(1, 1), 0, None, None, torch.device(device))

    @classmethod
    def from_process_group(cls, tp_size: int, ep_size: int,
                           device: str | torch.device | None = None) -> "ParallelContext":
        "Build every TP and EP group (each rank must create all of them, in the same order) and keep its own."
        layout = ParallelLayout(tp_size, ep_size)
        layout.check_world_size(dist.get_world_size())
        rank = dist.get_rank()
        tp_rank, ep_rank = layout.coords(rank)
        tp_group = ep_group = None
        for ranks in layout.tp_group_ranks():
            group = dist.new_group(ranks) if tp_size > 1 else None
            if rank in ranks:
                tp_group = group
        for ranks in layout.ep_group_ranks():
            group = dist.new_group(ranks) if ep_size > 1 else None
            if rank in ranks:
                ep_group = group
        return cls(layout, rank, tp_group, ep_group, torch.device(device or "cpu"))


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    "Sum `x` in place over `group`."
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    "Concatenate every rank's `x` along `dim`, in rank order."
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None,
               output_split_sizes: list[int] | None = None,
               input_split_sizes: list[int] | None = None) -> torch.Tensor:
    "Send chunk i of `x` (rows) to rank i of `group`; return what every rank sent here, in rank order."
    if group is None:
        return x
    rows = sum(output_split_sizes) if output_split_sizes is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=group)
    return out


def init_distributed(tp_size: int = 1, ep_size: int = 1, device: str | None = None,
                     timeout_s: float = 600.0) -> ParallelContext:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK in the environment) and build the grid.

    Without torchrun's variables this is one process. NCCL on CUDA, gloo on CPU; several nodes work the
    same way because torchrun gives each process its global RANK and its LOCAL_RANK on the node."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout(tp_size, ep_size)
    layout.check_world_size(world_size)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size == 1:
        return ParallelContext.single(torch_device)
    if not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return ParallelContext.from_process_group(tp_size, ep_size, torch_device)


class RankError(RuntimeError):
    "A simulated rank raised; the message carries that rank's traceback."


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 120.0, start_method: str | None = None,
                 **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks and return each rank's result, in rank order.

    Each rank is a fresh process with the default process group initialised (`dist.get_rank()` tells
    it which one it is). The first rank to fail raises RankError here with its traceback, and the
    others are stopped; if any rank is still running after `timeout_s` seconds (a rank stuck in a
    collective its peers never reach, say), all are stopped and TimeoutError names them. Every
    child is reaped before this returns.

    Linux forks, so `fn` may be defined in a notebook cell. Elsewhere (macOS) the default is spawn,
    and `fn` travels by value through cloudpickle: it must not rely on notebook globals other than
    imports it makes itself."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("run_on_ranks cannot start ranks from a process that already has a process group; "
                           "call torch.distributed.destroy_process_group() first")
    start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
    ctx = mp.get_context(start_method)
    payload = fn
    if start_method != "fork":
        import cloudpickle
        payload = cloudpickle.dumps((fn, args, kwargs))
        args, kwargs = (), {}
    store_dir = tempfile.mkdtemp(prefix="minisgl-ranks-")
    store_path = os.path.join(store_dir, "store")
    procs, conns = [], {}
    try:
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, daemon=True,
                               args=(payload, rank, world_size, store_path, timeout_s, child_conn, args, kwargs))
            proc.start()
            child_conn.close()
            procs.append(proc)
            conns[parent_conn] = rank
        return _collect(procs, conns, world_size, timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
        for path in (store_path, store_dir):
            try:
                os.remove(path) if path == store_path else os.rmdir(path)
            except OSError:
                pass


def _collect(procs, conns, world_size, timeout_s):
    results, pending = {}, dict(conns)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            ranks = sorted(pending.values())
            raise TimeoutError(f"ranks {ranks} of {world_size} had not finished after {timeout_s:g} s "
                               f"(a rank waiting in a collective that another rank never reached?); all were stopped")
        for conn in mp.connection.wait(list(pending), timeout=min(left, 0.5)):
            rank = pending.pop(conn)
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except EOFError:
                procs[rank].join(timeout=1.0)
                raise RankError(f"rank {rank} exited (code {procs[rank].exitcode}) without returning a result") from None
            if status == "error":
                raise RankError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    return [results[rank] for rank in range(world_size)]


def _rank_main(payload, rank, world_size, store_path, timeout_s, conn, args, kwargs):
    # A forked child inherits the parent's OpenMP pool, which deadlocks in its first matmul.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    try:
        fn = payload
        if isinstance(payload, bytes):
            import cloudpickle
            fn, args, kwargs = cloudpickle.loads(payload)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        message = ("ok", fn(*args, **kwargs))
    except BaseException:
        message = ("error", traceback.format_exc())
    try:
        data = pickle.dumps(message)
    except Exception:
        data = pickle.dumps(("error", f"rank {rank}'s result could not be pickled:\n{traceback.format_exc()}"))
    conn.send_bytes(data)
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()
