"""The one-shot and two-shot symmetric-memory all-reduces against NCCL's, on two GPUs of one machine
(skipped elsewhere: symmetric memory is CUDA only). Runs scripts/check_all_reduce.py under torchrun, which
exits non-zero if the sums differ."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_symmetric_all_reduces_equal_nccl(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "scripts" / "check_all_reduce.py"), "--tokens", "1,3,64,256",
                             "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert report["agree"] and [row["numel"] for row in report["sizes"]] == [2048, 3 * 2048, 64 * 2048, 256 * 2048]
