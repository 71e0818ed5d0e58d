#!/usr/bin/env python
"""The capstone: Qwen3-MoE inference over a tp x ep grid of processes.

    torchrun --nproc_per_node=8 scripts/run_inference.py --model_path Qwen/Qwen3-30B-A3B \
        --tp_size 2 --ep_size 4 --prompt "The capital of France is"

Without --model_path it runs the tiny built-in model, so it works on a laptop:

    torchrun --nproc_per_node=4 scripts/run_inference.py --tp_size 2 --ep_size 2 --device cpu

All of the logic lives in minisgl/launch.py (exported from notebooks/08_capstone.ipynb).
"""
import sys

from minisgl.launch import main

if __name__ == "__main__":
    sys.exit(main())
