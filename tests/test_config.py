"""Chapter 00: reading config.json. Every bad config is one ValueError sentence naming the file and
the field, raised before any weight is read; good configs in either spelling read the same."""
import dataclasses
import json
import re

import pytest

from minisgl.config import (QWEN3_30B_A3B_CONFIG, TINY_CONFIG, ModelConfig, active_parameter_counts,
                            parameter_counts, preset, read_json_file)


def write_config(directory, config) -> str:
    "Write `config` as directory/config.json (a str is written as it is); return the file's path."
    path = directory / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    return str(path)


def config_error(tmp_path, config) -> str:
    "The message of the ValueError that reading `config` from a file raises; it must be one line."
    path = write_config(tmp_path, config)
    with pytest.raises(ValueError) as info:
        ModelConfig.from_pretrained(tmp_path)
    assert type(info.value) is ValueError  # not a JSONDecodeError, TypeError or AttributeError
    message = str(info.value)
    assert "\n" not in message and path in message, message
    return message


def test_good_configs_read_in_both_spellings(tmp_path):
    qwen3 = preset("qwen3-30b-a3b")
    write_config(tmp_path, QWEN3_30B_A3B_CONFIG)
    assert ModelConfig.from_pretrained(tmp_path) == ModelConfig.from_pretrained(tmp_path / "config.json") == qwen3
    for config in (qwen3, preset("tiny")):  # transformers 5's spelling, as to_hf_dict writes it
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.head_dim, qwen3.eos_token_ids) == (128, 8, 128, (151645,))


def test_edge_values_that_are_fine():
    top_k_is_all = ModelConfig.from_dict({**TINY_CONFIG, "num_experts_per_tok": TINY_CONFIG["num_experts"]})
    assert top_k_is_all.num_experts_per_tok == top_k_is_all.num_experts == 8
    int_floats = ModelConfig.from_dict({**TINY_CONFIG, "rope_theta": 10000, "rms_norm_eps": 1})
    assert int_floats.rope_theta == 10000.0 and int_floats.rms_norm_eps == 1
    no_dense = ModelConfig.from_dict({k: v for k, v in TINY_CONFIG.items() if k != "intermediate_size"})
    assert no_dense.intermediate_size == 0  # no layer needs the dense MLP
    derived = ModelConfig.from_dict({**TINY_CONFIG, "head_dim": None})
    assert derived.head_dim == TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    eos_list = ModelConfig.from_dict({**TINY_CONFIG, "eos_token_id": [257, 258]})
    assert eos_list.eos_token_ids == (257, 258)


def test_malformed_json_names_the_file_and_where(tmp_path):
    text = json.dumps(TINY_CONFIG, indent=2).replace('"hidden_size": 64', '"hidden_size": ,')
    line = next(i for i, row in enumerate(text.splitlines(), 1) if '"hidden_size"' in row)
    column = text.splitlines()[line - 1].index(",") + 1
    path = write_config(tmp_path, text)
    message = config_error(tmp_path, text)
    assert message == f"config.json ({path}) is not valid JSON: Expecting value: line {line} column {column}"


@pytest.mark.parametrize("text", ["", "{", '{"model_type": "qwen3_moe",}', "not json"])
def test_more_malformed_json(tmp_path, text):
    assert "is not valid JSON: " in config_error(tmp_path, text)


def test_read_json_file(tmp_path):
    good = tmp_path / "generation_config.json"
    good.write_text('{"temperature": 0.7}')
    assert read_json_file(good, "generation_config.json") == {"temperature": 0.7}
    missing = tmp_path / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tokenizer.json at {missing}")):
        read_json_file(missing, "tokenizer.json")
    with pytest.raises(ValueError, match=re.escape(f"tokenizer.json ({tmp_path}) could not be read: ")):
        read_json_file(tmp_path, "tokenizer.json")  # a directory
    not_utf8 = tmp_path / "bytes.json"
    not_utf8.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"tokenizer.json ({not_utf8}) could not be read: ")):
        read_json_file(not_utf8, "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}\n{"b": 2}')
    with pytest.raises(ValueError, match=re.escape(f"generation_config.json ({bad}) is not valid JSON: "
                                                   "Extra data: line 2 column 1")):
        read_json_file(bad, "generation_config.json")


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no config.json at {tmp_path / 'config.json'}")):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, kind", [([TINY_CONFIG], "a list"), ("qwen3_moe", "a string"), (3, "an integer"),
                                          (None, "null")])
def test_config_that_is_not_an_object(tmp_path, config, kind):
    message = config_error(tmp_path, json.dumps(config))
    assert message == f"config.json ({tmp_path / 'config.json'}) holds {kind}, not an object of fields"


@pytest.mark.parametrize("top_k, problem", [(9, "num_experts_per_tok is 9, more than num_experts (8)"),
                                            (100, "num_experts_per_tok is 100, more than num_experts (8)"),
                                            (0, "num_experts_per_tok is 0; it must be at least 1"),
                                            (-2, "num_experts_per_tok is -2; it must be at least 1")])
def test_experts_per_token(tmp_path, top_k, problem):
    message = config_error(tmp_path, {**TINY_CONFIG, "num_experts_per_tok": top_k})
    assert message == f"config.json ({tmp_path / 'config.json'}): {problem}"


@pytest.mark.parametrize("name, value, shown, wanted", [
    ("num_attention_heads", "8", '"8" (a string)', "not an integer"),
    ("hidden_size", True, "true (a boolean)", "not an integer"),
    ("num_experts", 8.0, "8.0 (a float)", "not an integer"),
    ("num_hidden_layers", [2], "[2] (a list)", "not an integer"),
    ("vocab_size", {"n": 320}, '{"n": 320} (an object)', "not an integer"),
    ("num_experts_per_tok", False, "false (a boolean)", "not an integer"),
    ("moe_intermediate_size", 32.5, "32.5 (a float)", "not an integer"),
    ("rms_norm_eps", "1e-6", '"1e-6" (a string)', "not a positive number"),
    ("rope_theta", True, "true (a boolean)", "not a positive number"),
    ("norm_topk_prob", "false", '"false" (a string)', "not true or false"),
    ("tie_word_embeddings", 0, "0 (an integer)", "not true or false"),
    ("torch_dtype", 16, "16 (an integer)", "not a string"),
    ("mlp_only_layers", 1, "1 (an integer)", "not a list of layer indices below 2"),
    ("eos_token_id", "</s>", '"</s>" (a string)', "not a token id in [0, vocab_size = 320)"),
    ("bos_token_id", 1.5, "1.5 (a float)", "not a token id in [0, vocab_size = 320)"),
])
def test_wrong_types_are_one_sentence_naming_file_and_field(tmp_path, name, value, shown, wanted):
    message = config_error(tmp_path, {**TINY_CONFIG, name: value})
    field_name = "dtype" if name == "torch_dtype" else name
    assert message == f"config.json ({tmp_path / 'config.json'}): {field_name} is {shown}, {wanted}"


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size",
                                  "max_position_embeddings", "decoder_sparse_step"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes(tmp_path, name, value):
    message = config_error(tmp_path, {**TINY_CONFIG, name: value})
    assert message.endswith(f": {name} is {value}; it must be at least 1"), message


@pytest.mark.parametrize("change, problem", [
    ({"rms_norm_eps": 0}, "rms_norm_eps is 0 (an integer), not a positive number"),
    ({"rope_theta": -1.0}, "rope_theta is -1.0 (a float), not a positive number"),
    ({"intermediate_size": -5}, "intermediate_size is -5; it must be at least 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads (8) is not a multiple of num_key_value_heads (3)"),
    ({"mlp_only_layers": [0, 2]}, "mlp_only_layers is [0, 2] (a list), not a list of layer indices below 2"),
    ({"mlp_only_layers": [1], "intermediate_size": 0}, "layers [1] use the dense MLP, but intermediate_size is "
                                                       "missing or 0"),
    ({"eos_token_id": [257, 320]}, "eos_token_id is 320 (an integer), not a token id in [0, vocab_size = 320)"),
    ({"bos_token_id": -1}, "bos_token_id is -1 (an integer), not a token id in [0, vocab_size = 320)"),
    ({"rope_parameters": "default"}, "rope_parameters is 'default', not an object"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'; only 'silu' is supported"),
    ({"model_type": "qwen3"}, "model_type is 'qwen3'; minisgl builds only 'qwen3_moe'"),
])
def test_values_that_cannot_be_served(tmp_path, change, problem):
    message = config_error(tmp_path, {**TINY_CONFIG, **change})
    assert message == f"config.json ({tmp_path / 'config.json'}): {problem}"


def test_missing_field_names_the_file(tmp_path):
    config = {k: v for k, v in TINY_CONFIG.items() if k != "num_experts"}
    message = config_error(tmp_path, config)
    assert message == f"config.json ({tmp_path / 'config.json'}) has no 'num_experts' or 'num_local_experts'"


def test_from_dict_without_a_file_and_replace():
    with pytest.raises(ValueError, match=r"^config.json: num_experts_per_tok is 9, more than num_experts \(8\)$"):
        ModelConfig.from_dict({**TINY_CONFIG, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match=r"^my config: hidden_size is \"64\" \(a string\), not an integer$"):
        ModelConfig.from_dict({**TINY_CONFIG, "hidden_size": "64"}, "my config")
    with pytest.raises(ValueError, match=r"^num_experts_per_tok is 16, more than num_experts \(8\)$"):
        dataclasses.replace(preset("tiny"), num_experts_per_tok=16)
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        preset("huge")


def test_active_parameters_count_one_embedding_row():
    qwen3 = preset("qwen3-30b-a3b")
    total, active = parameter_counts(qwen3), active_parameter_counts(qwen3)
    assert active["embedding"] == qwen3.hidden_size and active["lm_head"] == total["lm_head"]
    assert active["experts"] * qwen3.num_experts == total["experts"] * qwen3.num_experts_per_tok
    read, stored = sum(active.values()), sum(total.values())
    assert round(stored / 1e9, 1) == 30.5 and round(read / 1e9, 1) == 3.0
    assert 3.3 <= (read - active["embedding"] + total["embedding"]) / 1e9 < 3.4  # the model card's 3.3 B
    tied = ModelConfig.from_dict({**TINY_CONFIG, "tie_word_embeddings": True})
    tied_total, tied_active = parameter_counts(tied), active_parameter_counts(tied)
    assert tied_total["lm_head"] == 0 and tied_active["lm_head"] == tied.vocab_size * tied.hidden_size
