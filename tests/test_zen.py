"""Appendix A: the Zen of Python as training text, the training rows, a
deterministic training loop, and the committed checkpoint, which recites the
poem through transformers and through the engine."""

import json
import subprocess
import sys

import pytest
import torch

from minisgl.config import ModelConfig
from minisgl.llm import LLM
from minisgl.sampling import SamplingParams
from minisgl.tokenizer import ByteTokenizer, load_tokenizer
from minisgl.zen import (ZEN_CONFIG, ZEN_PROMPTS, to_batch, train_zen_model,
                         training_rows, zen_checkpoint_path, zen_text)

NEW_TOKENS = 80
# The committed model's top-2 gaps along these continuations are 4 logits or
# more; chapter 07 finds every layout within 1e-4 of transformers. A gap under
# 1 would mean the checkpoint has changed for the worse.
MIN_MARGIN = 1.0


def poem_after(prompt: str, length: int) -> str:
    "The `length` characters that follow `prompt` in the poem (fewer at its end)."
    text = zen_text()
    start = text.index(prompt) + len(prompt)
    return text[start:start + length]


def test_zen_text_is_what_import_this_prints():
    printed = subprocess.run([sys.executable, "-c", "import this"], capture_output=True, text=True,
                             timeout=60).stdout
    assert printed == zen_text() + "\n"
    assert zen_text().startswith("The Zen of Python, by Tim Peters\n\nBeautiful is better than ugly.\n"
                                 "Explicit is better than implicit.\n")


def test_training_rows_start_at_lines_and_end_with_eos():
    text, eos = zen_text(), ByteTokenizer.eos_token_id
    rows = training_rows(text)
    assert len(rows) == text.count("\n") + 1
    assert rows[0] == list(text.encode()) + [eos]
    for row in rows:
        assert row[-1] == eos and eos not in row[:-1]
        assert rows[0][-len(row):] == row  # a suffix of the whole text
        assert row == rows[0] or rows[0][-len(row) - 1] == ord("\n")  # that starts a line


def test_to_batch_shifts_targets_and_ignores_padding():
    inputs, targets = to_batch([[1, 2, 3, 4], [5, 6]], pad_id=257)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 257]]
    assert targets.tolist() == [[2, 3, 4], [6, -100, -100]]


def test_training_is_deterministic_and_leaves_threads_and_rng_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    (model_a, losses_a), (model_b, losses_b) = (train_zen_model(steps=3, rows_per_step=2) for _ in range(2))
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected_draw)
    assert losses_a == losses_b and losses_a[0] > losses_a[-1]
    state_b = model_b.state_dict()
    assert all(torch.equal(tensor, state_b[name]) for name, tensor in model_a.state_dict().items())


def test_checkpoint_is_small_float32_bytes_and_splits_over_every_layout():
    path = zen_checkpoint_path()
    assert (path / "model.safetensors").stat().st_size < 2_000_000
    hf = json.loads((path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"] and hf["dtype"] == "float32"
    for key, value in ZEN_CONFIG.items():
        if key != "num_experts":  # transformers 5 writes num_local_experts
            assert hf[key] == value, key
    config = ModelConfig.from_pretrained(path)
    assert (config.bos_token_id, config.eos_token_ids, config.vocab_size) == (256, (257,), 258)
    assert isinstance(load_tokenizer(path, config.vocab_size), ByteTokenizer)
    assert config.max_position_embeddings >= 512 and not config.tie_word_embeddings
    assert all(config.is_moe_layer(i) for i in range(config.num_hidden_layers)) and config.norm_topk_prob
    for size in (1, 2, 4):
        assert config.num_attention_heads % size == 0 and config.moe_intermediate_size % size == 0
        assert config.num_experts % size == 0 and config.intermediate_size % size == 0
        kv = config.num_key_value_heads
        assert kv % size == 0 or size % kv == 0


@pytest.fixture(scope="module")
def transformers_recitals():
    "transformers' greedy continuation of each of ZEN_PROMPTS: (ids, top-2 margins)."
    from transformers import Qwen3MoeForCausalLM as ReferenceModel
    model = ReferenceModel.from_pretrained(zen_checkpoint_path(), dtype=torch.float32).eval()
    recitals = {}
    with torch.no_grad():
        for prompt in ZEN_PROMPTS:
            ids = torch.tensor([ByteTokenizer().encode(prompt)])
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=257, pad_token_id=257)
            top2 = torch.cat(out.logits).topk(2, dim=-1).values
            recitals[prompt] = out.sequences[0, ids.shape[1]:].tolist(), (top2[:, 0] - top2[:, 1]).tolist()
    return recitals


def test_transformers_recites_the_poem(transformers_recitals):
    tokenizer = ByteTokenizer()
    ids, margins = transformers_recitals["Beautiful is better than"]
    assert tokenizer.decode(ids).startswith(" ugly.\nExplicit is better than implicit.\nSimple is")
    for prompt, (ids, margins) in transformers_recitals.items():
        assert tokenizer.decode(ids) == poem_after(prompt, NEW_TOKENS), prompt
        assert min(margins) > MIN_MARGIN, (prompt, min(margins))


def test_engine_recites_what_transformers_does(transformers_recitals):
    llm = LLM(str(zen_checkpoint_path()), device="cpu")
    tokenizer = ByteTokenizer()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(tokenizer.eos_token_id,))
    results = llm.generate(list(ZEN_PROMPTS), params)
    for prompt, result in zip(ZEN_PROMPTS, results):
        expected_ids, _ = transformers_recitals[prompt]
        assert result.output_ids == expected_ids, prompt
        assert tokenizer.decode(result.output_ids) == poem_after(prompt, NEW_TOKENS), prompt
