#!/usr/bin/env python
"""An OpenAI-compatible server for Qwen3-MoE over a tp x ep grid of processes.

    torchrun --nproc_per_node=4 scripts/serve.py --tp_size 2 --ep_size 2 --device cpu --port 30000
    python scripts/serve.py --device cpu            # the tiny built-in model, one process

Then: curl http://127.0.0.1:30000/v1/completions -H 'Content-Type: application/json' \
          -d '{"model": "tiny", "prompt": "Beautiful is", "max_tokens": 16}'

All of the logic lives in minisgl/server/ (exported from the book's server chapter).
"""
import sys

from minisgl.server.main import main

if __name__ == "__main__":
    sys.exit(main())
