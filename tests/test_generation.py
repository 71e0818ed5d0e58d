"""Chapter 07: the whole model and the generation loop against transformers, for every layout; sampling, stop
tokens, bad prompts, idle replicas, vocabulary padding and tokenizers."""

import pytest
import torch

from minisgl.config import ModelConfig, preset
from minisgl.distributed import ParallelContext, ParallelLayout, run_on_ranks
from minisgl.generation import check_prompts
from minisgl.model import Qwen3MoeForCausalLM, check_layout
from minisgl.sampling import SamplingParams, SamplingTensors, sample
from minisgl.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from engines import build_engine

# Lengths 7, 3, 11, 1, 5: uneven, and with ep_size 4 replica 0 gets two prompts.
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [100, 20, 30, 40, 50, 60, 70, 80, 90, 10, 11], [5], [42, 17, 250, 3, 99]]
NEW_TOKENS = 8
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (2, 4)]


@pytest.fixture(scope="module")
def reference(reference_model):
    "transformers' greedy continuations and teacher-forced log-probs of PROMPTS."
    with torch.no_grad():
        greedy = [reference_model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
        logprobs = [reference_model(torch.tensor([p])).logits[0, :-1].log_softmax(-1)
                    .gather(1, torch.tensor(p[1:])[:, None])[:, 0] for p in PROMPTS]
    return greedy, logprobs


@pytest.fixture(scope="module")
def single_engine(tiny_checkpoint):
    return build_engine(tiny_checkpoint)


def run_layout(tp_size, ep_size, checkpoint, prompts, new_tokens, stop_tokens):
    "What one rank of a layout returns: greedy runs (all prompts, one prompt, with stop tokens), scores, samples."
    generator = build_engine(checkpoint, tp_size, ep_size)
    greedy = [r.output_ids for r in generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens))]
    steps = generator.stats.decode_steps
    one_prompt = [r.output_ids for r in generator.generate(prompts[:1], SamplingParams(max_new_tokens=new_tokens))]
    stopped = [(r.output_ids, r.finish_reason) for r in
               generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens, stop_token_ids=stop_tokens))]
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=5)
    sampled = [[r.output_ids for r in generator.generate(prompts, sampling)] for _ in range(2)]
    return {"greedy": greedy, "steps": steps, "scores": generator.score(prompts), "one_prompt": one_prompt,
            "stopped": stopped, "sampled": sampled}


def cut_at_stop(tokens, stop_tokens):
    for j, t in enumerate(tokens):
        if t in stop_tokens:
            return tokens[:j + 1], "stop"
    return tokens, "length"


@pytest.mark.parametrize("tp_size,ep_size", LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
def test_layout_matches_transformers(tp_size, ep_size, tiny_checkpoint, reference):
    ref_greedy, ref_logprobs = reference
    stop_tokens = (ref_greedy[0][2], ref_greedy[2][4])
    args = (tiny_checkpoint, PROMPTS, NEW_TOKENS, stop_tokens)
    if tp_size * ep_size == 1:
        per_rank = [run_layout(1, 1, *args)]
    else:
        per_rank = run_on_ranks(run_layout, tp_size * ep_size, tp_size, ep_size, *args, timeout_s=120)
    for rank, got in enumerate(per_rank):
        assert got["greedy"] == ref_greedy, rank
        error = max((ours - ref).abs().max().item() for ours, ref in zip(got["scores"], ref_logprobs) if len(ref))
        assert error < 1e-4, (rank, error)
        assert all(len(s) == len(p) - 1 for s, p in zip(got["scores"], PROMPTS))
        assert got["one_prompt"] == ref_greedy[:1], rank  # ep_size - 1 replicas idle, with empty batches
        assert got["stopped"] == [cut_at_stop(ref, stop_tokens) for ref in ref_greedy], rank
        assert got["sampled"][0] == got["sampled"][1], rank  # same seed, same layout: same tokens
        assert got["steps"] == per_rank[0]["steps"] == NEW_TOKENS - 1  # lockstep
        # every rank returns every result
        assert {k: v for k, v in got.items() if k != "scores"} == {k: v for k, v in per_rank[0].items() if k != "scores"}


def test_sampling_is_reproducible_and_seeded(single_engine):
    generator = single_engine

    def run(seed, **kwargs):
        params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed, **kwargs)
        return [r.output_ids for r in generator.generate(PROMPTS, params)]
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1, top_k=5, top_p=0.8) == run(1, top_k=5, top_p=0.8)
    # Seeded per request: a prompt gets the same tokens alone as in a batch.
    alone = generator.generate(PROMPTS[2:3], SamplingParams(max_new_tokens=6, temperature=1.0, seed=1))
    assert alone[0].output_ids == run(1)[2]


def test_top_k_1_equals_greedy(single_engine, reference):
    outputs = single_engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.7,
                                                                       top_k=1, seed=3))
    assert [r.output_ids for r in outputs] == reference[0]


def test_stop_token_ends_a_sequence(single_engine, reference):
    stop = reference[0][1][3]
    results = single_engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(stop,)))
    for result, ref in zip(results, reference[0]):
        assert (result.output_ids, result.finish_reason) == cut_at_stop(ref, (stop,))
    assert results[1].finish_reason == "stop" and len(results[1].output_ids) <= 4


def test_bad_prompts_raise_value_error_naming_the_numbers(tiny_checkpoint):
    generator = build_engine(tiny_checkpoint, max_seq_len=16)
    with pytest.raises(ValueError, match=r"prompt 1 has 12 tokens; with max_new_tokens=8 it needs 20 positions, "
                                         r"but the context is 16"):
        generator.generate([[1, 2], list(range(12))], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens.*context is 16"):
        generator.score([list(range(17))])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=r"token id 320 outside the vocabulary \[0, 320\)"):
        check_prompts([[1, 320]], 1, 16, 320)
    with pytest.raises(ValueError, match="no prompts"):
        generator.generate([], SamplingParams())
    with pytest.raises(ValueError, match="1000 positions exceeds the model's 512"):
        generator.runner.model.make_kv_cache(8, 16, 1, 1000)


def test_sampling_params_and_sample():
    for bad in [dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                dict(temperature=1e-45), dict(temperature=float("inf")), dict(top_k=-1), dict(top_p=0.0),
                dict(top_p=1.5), dict(seed=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    rows = 4000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).expand(rows, -1)
    positions = torch.arange(rows)  # different noise for every row

    def draw(**kwargs):
        return sample(logits, SamplingTensors.from_params([SamplingParams(**kwargs)] * rows), positions)
    assert (draw() == 0).all()
    assert set(draw(temperature=1.0, top_k=3).tolist()) == {0, 1, 2}
    # probabilities at T=1: 0.42, 0.25, 0.16, ... -> top_p 0.6 keeps tokens 0 and 1 (0.42 < 0.6 <= 0.67)
    assert set(draw(temperature=1.0, top_p=0.6).tolist()) == {0, 1}
    plain = draw(temperature=1.0)
    frequency = torch.bincount(plain, minlength=6).float() / rows
    assert (frequency - logits[0].softmax(-1)).abs().max() < 0.03
    # One call, different parameters per row: greedy rows stay greedy, the others sample.
    mixed = [SamplingParams(), SamplingParams(temperature=1.0, seed=1)] * (rows // 2)
    ids = sample(logits, SamplingTensors.from_params(mixed), positions)
    assert (ids[0::2] == 0).all() and len(set(ids[1::2].tolist())) > 1


def test_check_layout_names_the_numbers(tiny_config):
    qwen3 = preset("qwen3-30b-a3b")
    with pytest.raises(ValueError, match=r"num_attention_heads \(32\) is not divisible by tp_size \(3\)"):
        check_layout(qwen3, 3, 1)
    with pytest.raises(ValueError, match=r"num_experts \(128\) is not divisible by ep_size \(3\)"):
        check_layout(qwen3, 1, 3)
    with pytest.raises(ValueError, match=r"num_experts \(8\) is not divisible by ep_size \(16\)"):
        Qwen3MoeForCausalLM(tiny_config, ParallelContext(ParallelLayout(1, 16), 0, None, None, torch.device("meta")))
    check_layout(qwen3, 2, 4)


def vocab_layers(vocab_sizes, hidden):
    "On each rank of TP=4: the vocab-parallel embedding and LM head against the full matrices."
    from minisgl.layers.vocab import ParallelLMHead, VocabParallelEmbedding
    from minisgl.weights import StateDictSource
    ctx = ParallelContext.from_process_group(4, 1)
    errors = []
    with torch.no_grad():
        for vocab in vocab_sizes:
            table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(vocab))
            x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(1))
            ids = torch.arange(vocab).repeat(2)[:max(vocab, 6)]
            layers = [cls(vocab, hidden, ctx.tp_rank, 4, ctx.tp_group, torch.float32, ctx.device)
                      for cls in (VocabParallelEmbedding, ParallelLMHead)]
            for layer in layers:
                layer.load(StateDictSource({"w": table}), "w")
            embed, head = layers
            errors.append(max((embed(ids) - table[ids]).abs().max().item(),
                              (head(x) - x @ table.T).abs().max().item()))
    return errors


def test_vocab_parallel_layers_with_padding():
    # 10 rows over 4 ranks: 3, 3, 3, 1 (+2 padding); 3 rows: 1, 1, 1, 0 (the last rank holds none).
    for errors in run_on_ranks(vocab_layers, 4, [10, 3, 16], 8, timeout_s=60):
        assert max(errors) < 1e-6, errors


def test_tokenizers(tmp_path, tiny_config):
    tokenizer = load_tokenizer(None, tiny_config.vocab_size)
    assert isinstance(tokenizer, ByteTokenizer)
    text = "naïve café"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eos_token_id]) == text
    assert load_tokenizer(None, 200) is None  # no room for bytes: ids only

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat " * 10], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path, tiny_config.vocab_size)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_token_id == 0
    assert tokenizer.decode(tokenizer.encode("the cat sat")) == "the cat sat"
