"""The capstone: parse the command line, join the torchrun job, load, generate, report."""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from .config import ModelConfig, preset
from .distributed import init_distributed
from .generation import Generator, check_prompts
from .loader import DummySource, SafetensorsSource, check_checkpoint, resolve_model_path, weight_bytes
from .model import Qwen3MoeForCausalLM, check_layout
from .sampling import SamplingParams
from .tokenizer import load_tokenizer
from .weights import CheckpointError

DEFAULT_PROMPT = "The capital of France is"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Qwen3-MoE inference with tensor and expert parallelism. "
                                "Launch with: torchrun --nproc_per_node=N scripts/run_inference.py --tp_size T "
                                "--ep_size E ... (N = T * E).")
    p.add_argument("--model_path", help="checkpoint directory or hub id; omit for the tiny built-in model")
    p.add_argument("--preset", choices=["tiny", "qwen3-30b-a3b"],
                   help="a built-in shape with random weights (implies --dummy); default without --model_path: tiny")
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--ep_size", type=int, default=1)
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt_ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--dummy", action="store_true", help="random weights at the config's full shape, no files read")
    p.add_argument("--max_seq_len", type=int, default=None, help="context length (default: the config's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait before failing")
    p.add_argument("--json", help="write prompts, outputs, layout and timing here (rank 0)")
    return p.parse_args(argv)


def _prompt_ids(args, tokenizer) -> list[list[int]]:
    prompts = []
    for text in args.prompt or ([] if args.prompt_ids else [DEFAULT_PROMPT]):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer and its vocabulary is too small for bytes; "
                             "pass --prompt_ids instead of --prompt")
        prompts.append(tokenizer.encode(text))
    for ids in args.prompt_ids:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            raise ValueError(f"--prompt_ids {ids!r} is not a comma-separated list of integers") from None
    return prompts


def _load_config(args) -> tuple[ModelConfig, Path | None]:
    if args.model_path and args.preset:
        raise ValueError("give --model_path or --preset, not both")
    if args.model_path:
        model_dir = resolve_model_path(args.model_path)
        return ModelConfig.from_pretrained(model_dir), model_dir
    return preset(args.preset or "tiny"), None


def run(args) -> dict:
    "Everything after argument parsing; returns the report rank 0 prints and writes."
    config, model_dir = _load_config(args)
    check_layout(config, args.tp_size, args.ep_size)
    ctx = init_distributed(args.tp_size, args.ep_size, args.device, args.timeout)
    dtype = getattr(torch, args.dtype or ("bfloat16" if ctx.device.type == "cuda" else "float32"))
    tokenizer = load_tokenizer(model_dir, config.vocab_size)
    prompts = _prompt_ids(args, tokenizer)
    max_seq_len = args.max_seq_len or config.max_position_embeddings
    check_prompts(prompts, args.max_new_tokens, max_seq_len, config.vocab_size)
    if model_dir is None or args.dummy:
        source = DummySource(config, seed=args.seed, device=ctx.device)
    else:
        source = SafetensorsSource(model_dir)
        check_checkpoint(source, config)

    start = time.perf_counter()
    model = Qwen3MoeForCausalLM(config, ctx, dtype=dtype, max_positions=max_seq_len)
    model.load(source)
    load_seconds = time.perf_counter() - start

    stop_ids = () if args.ignore_eos else tuple(config.eos_token_ids) or (
        (tokenizer.eos_token_id,) if getattr(tokenizer, "eos_token_id", None) is not None else ())
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_token_ids=stop_ids)
    generator = Generator(model, max_seq_len)
    results = generator.generate(prompts, params)
    stats = generator.stats
    decode_tokens = stats.decode_steps * len(prompts)
    return {
        "outputs": [{"prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "finish_reason": r.finish_reason,
                     "text": tokenizer.decode(r.output_ids) if tokenizer else None} for r in results],
        "layout": {"tp_size": ctx.tp_size, "ep_size": ctx.ep_size, "world_size": ctx.world_size,
                   "device": str(ctx.device.type), "dtype": str(dtype).removeprefix("torch."),
                   "gpu": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None,
                   "model": str(args.model_path or f"preset:{args.preset or 'tiny'}"),
                   "dummy_weights": model_dir is None or args.dummy,
                   "date": datetime.date.today().isoformat()},
        "timing": {"load_seconds": load_seconds, "time_to_first_token_seconds": stats.prefill_seconds,
                   "decode_seconds": stats.decode_seconds, "decode_steps": stats.decode_steps,
                   "decode_tokens_per_second": decode_tokens / stats.decode_seconds if stats.decode_seconds else None,
                   "weight_bytes_per_rank": weight_bytes(model),
                   "peak_memory_bytes_per_rank": (torch.cuda.max_memory_allocated(ctx.device)
                                                  if ctx.device.type == "cuda" else None)},
    }


def _print_report(report: dict) -> None:
    layout, timing = report["layout"], report["timing"]
    print(f"layout: tp={layout['tp_size']} ep={layout['ep_size']} world={layout['world_size']} "
          f"on {layout['gpu'] or layout['device']} ({layout['dtype']}), model {layout['model']}")
    for i, out in enumerate(report["outputs"]):
        shown = repr(out["text"]) if out["text"] is not None else out["output_ids"]
        print(f"[{i}] {len(out['prompt_ids'])} prompt tokens -> {shown}")
    rate = timing["decode_tokens_per_second"]
    print(f"time to first token: {timing['time_to_first_token_seconds'] * 1000:.1f} ms; decode: "
          f"{f'{rate:.1f} tok/s' if rate else 'n/a'} over {timing['decode_steps']} steps; "
          f"weights per rank: {timing['weight_bytes_per_rank'] / 2**30:.2f} GiB")


def main(argv=None) -> int:
    "Run, print on rank 0, and turn every expected failure into one line and exit code 1."
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        report = run(args)
    except (ValueError, CheckpointError, FileNotFoundError) as exc:
        # Layout and input errors are found identically on every rank: rank 0 speaks for all.
        # A checkpoint error may be one rank's own, so that rank names itself.
        if rank == 0 or isinstance(exc, CheckpointError):
            print(f"error{'' if rank == 0 else f' (rank {rank})'}: {exc}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        _print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
