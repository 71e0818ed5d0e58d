"""Shared fixtures: tiny random checkpoints written by transformers, and the reference model loaded from them."""

import pytest
import torch

from minisgl.config import preset
from minisgl.loader import save_random_checkpoint


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    "Tiny tensors: on a shared 2-core CPU, intra-op threads cost far more than they save."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    "A single-file tiny checkpoint (model.safetensors) in the Hugging Face layout."
    return save_random_checkpoint(tiny_config, tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def sharded_tiny_checkpoint(tmp_path_factory, tiny_config):
    "The same shape split over several files with model.safetensors.index.json."
    return save_random_checkpoint(tiny_config, tmp_path_factory.mktemp("tiny_sharded"), seed=1,
                                  max_shard_size="100KB")


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    "transformers' Qwen3MoeForCausalLM in float32 on CPU, loaded from the tiny checkpoint."
    from transformers import Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def pytest_configure(config):
    "Without a GPU, Triton kernels run in Triton's interpreter; this must be set before triton is imported."
    import os
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
