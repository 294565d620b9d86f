"""Hugging Face config.json import (pamjax.hf_config): public configs against public
parameter counts and the presets, and every refusal naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from pamjax import config_files as cf
from pamjax.hf_config import FAMILIES
from pamjax.models import get_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "hf_configs"  # public config.json files, copied as published
QWEN3_MOE = ROOT / "examples" / "models" / "qwen3-30b-a3b" / "config.json"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def load(tmp_path, data: dict, name: str = "config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return cf.load_model_file(path), path


# -- public parameter counts ------------------------------------------------------------------

# Published figures are rounded to their last digit and pamjax ignores norms, biases and
# position embeddings by design, so a derived count must be within 0.5% of the figure plus
# half a unit of its last digit (e.g. +-0.05B for "3.3B").
PUBLIC_COUNTS = [
    # (config, total B, active B or None, digits after the point, source)
    ("meta-llama-3-8b", 8.03, None, 2,
     "huggingface.co/meta-llama/Meta-Llama-3-8B, safetensors: 8.03B params"),
    ("meta-llama-3-70b", 70.6, None, 1,
     "huggingface.co/meta-llama/Meta-Llama-3-70B, safetensors: 70.6B params"),
    ("mistral-7b-instruct-v0.2", 7.24, None, 2,
     "huggingface.co/mistralai/Mistral-7B-Instruct-v0.2, safetensors: 7.24B params"),
    ("qwen3-8b", 8.2, None, 1,
     "huggingface.co/Qwen/Qwen3-8B model card: 8.2B parameters (6.95B non-embedding)"),
    ("mixtral-8x7b-v0.1", 46.7, 12.9, 1,
     "mistral.ai/news/mixtral-of-experts: 46.7B total parameters, 12.9B per token"),
    ("qwen1.5-moe-a2.7b", 14.3, 2.7, 1,
     "qwenlm.github.io/blog/qwen-moe and the model card: 14.3B total, 2.7B activated"),
    ("deepseek-moe-16b-base", 16.4, 2.8, 1,
     "DeepSeekMoE paper (arXiv:2401.06066) and README: 16.4B total, 2.8B activated"),
]


def within_published(derived: float, public: float, digits: int) -> bool:
    return abs(derived - public) <= 0.005 * public + 0.5 * 10.0 ** -digits


@pytest.mark.parametrize("name,total,active,digits,source", PUBLIC_COUNTS)
def test_public_parameter_counts(name, total, active, digits, source):
    m = cf.load_model_file(CONFIGS / f"{name}.json")
    assert m.name == name
    assert within_published(m.params / 1e9, total, digits), (m.params, source)
    if active is None:
        assert not m.is_moe and m.active_params == m.params
    else:
        assert m.is_moe
        assert within_published(m.active_params / 1e9, active, digits), (m.active_params, source)


def test_qwen3_moe_example_matches_its_model_card():
    # huggingface.co/Qwen/Qwen3-30B-A3B model card: 30.5B in total, 3.3B activated,
    # 29.9B non-embedding.
    m = cf.load_model_file(QWEN3_MOE)
    assert m.name == "qwen3-30b-a3b"  # a file called config.json takes its folder's name
    assert within_published(m.params / 1e9, 30.5, 1)
    assert within_published(m.active_params / 1e9, 3.3, 1)
    assert within_published(m.linear_params / 1e9, 29.9, 1)
    # head_dim is given (128), as is the 4-KV-head GQA; experts are moe_intermediate_size wide.
    assert (m.head_dim, m.kv_heads, m.gqa_group, m.expert_ffn) == (128, 4, 8, 768)
    assert m.kv_bytes_per_token == 2 * 48 * 4 * 128 * 2


# -- the presets are the public configs -------------------------------------------------------

@pytest.mark.parametrize("name,preset", [("meta-llama-3-8b", "llama3-8b"),
                                         ("meta-llama-3-70b", "llama3-70b"),
                                         ("qwen2.5-32b", "qwen2.5-32b")])
def test_public_configs_give_the_presets(name, preset):
    m = cf.load_model_file(CONFIGS / f"{name}.json")
    assert dataclasses.replace(m, name=preset) == get_model(preset)


def test_opt_configs_read_ffn_dim_tied_embeddings_and_relu_mlp(tmp_path):
    m = cf.load_model_file(CONFIGS / "opt-66b.json")
    assert m.name == "opt-66b"  # from _name_or_path "facebook/opt-66b"
    assert (m.kv_heads, m.head_dim, m.ffn, m.gated_ffn, m.tied_embeddings) == \
        (72, 128, 36864, False, True)
    assert m.params == 64 * (4 * 9216 ** 2 + 2 * 9216 * 36864) + 50272 * 9216
    # OPT-175B's shape (metaseq; not on the Hub) in the same form is the preset.
    shape = {"hidden_size": 12288, "ffn_dim": 49152, "num_attention_heads": 96,
             "num_hidden_layers": 96, "word_embed_proj_dim": 12288, "_name_or_path": "opt-175b"}
    m, _ = load(tmp_path, {**config("opt-66b"), **shape})
    assert m == get_model("opt-175b")


def test_byte_widths_follow_dtype_and_fp8_quantization(tmp_path):
    base = config("meta-llama-3-8b")
    m, _ = load(tmp_path, {**base, "torch_dtype": "float32"})
    assert (m.weight_bytes_per_value, m.kv_bytes_per_value) == (4, 4)
    del base["torch_dtype"]
    m, _ = load(tmp_path, {**base, "dtype": "float16"})  # the key newer transformers write
    assert (m.weight_bytes_per_value, m.kv_bytes_per_value) == (2, 2)
    m, _ = load(tmp_path, base)  # absent: 16-bit
    assert (m.weight_bytes_per_value, m.kv_bytes_per_value) == (2, 2)
    fp8 = {**base, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    m, _ = load(tmp_path, fp8)
    assert (m.weight_bytes_per_value, m.kv_bytes_per_value) == (1, 2)
    assert m.weight_bytes == get_model("llama3-8b").params


def test_names_come_from_name_or_path_then_file(tmp_path):
    folder = tmp_path / "My-Model"
    folder.mkdir()
    m, _ = load(folder, config("mixtral-8x7b-v0.1"))
    assert m.name == "My-Model"
    m, _ = load(tmp_path, config("mixtral-8x7b-v0.1"), "mixtral.json")
    assert m.name == "mixtral"
    m, _ = load(tmp_path, {**config("mixtral-8x7b-v0.1"),
                           "_name_or_path": "mistralai/Mixtral-8x7B-v0.1"})
    assert m.name == "Mixtral-8x7B-v0.1"


def test_llama_without_kv_heads_is_multi_head_as_in_transformers(tmp_path):
    data = config("meta-llama-3-8b")
    del data["num_key_value_heads"]
    m, _ = load(tmp_path, data)
    assert m.kv_heads == 32 and m.head_dim == 128


# -- refusals ---------------------------------------------------------------------------------

def edit(name: str, **changes) -> dict:
    """A public config with keys changed (None removes the key)."""
    data = config(name)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


HF_ERRORS = [
    # (config, key named in the error, rejected value, words of the reason)
    (edit("meta-llama-3-8b", model_type="gemma"), "model_type", "gemma",
     "unsupported Hugging Face model_type"),
    (edit("meta-llama-3-8b", model_type=None), "model_type", None, "missing"),
    (edit("meta-llama-3-8b", num_hidden_layers=None), "num_hidden_layers", None,
     "missing (required for model_type 'llama')"),
    (edit("mixtral-8x7b-v0.1", num_local_experts=None), "num_local_experts", None, "missing"),
    (edit("mistral-7b-instruct-v0.2", num_key_value_heads=None), "num_key_value_heads", None,
     "missing"),
    (edit("meta-llama-3-8b", num_hidden_layers="32"), "num_hidden_layers", "32",
     "not a string"),
    (edit("meta-llama-3-8b", num_hidden_layers=0), "num_hidden_layers", 0, "positive integer"),
    (edit("meta-llama-3-8b", num_key_value_heads=5), "num_key_value_heads", 5,
     "must divide q_heads=32"),
    (edit("meta-llama-3-8b", tie_word_embeddings="no"), "tie_word_embeddings", "no",
     "true or false"),
    (edit("qwen3-8b", head_dim=None), "head_dim", None,
     "missing (required for model_type 'qwen3')"),
    (edit("meta-llama-3-8b", hidden_size=4100), "hidden_size", 4100,
     "multiple of num_attention_heads=32"),
    (edit("mixtral-8x7b-v0.1", num_experts_per_tok=9), "num_experts_per_tok", 9,
     "in 1..num_experts=8"),
    (edit("meta-llama-3-8b", model_type="deepseek_v3", kv_lora_rank=512), "model_type",
     "deepseek_v3", "multi-head latent attention"),
    (edit("deepseek-moe-16b-base", model_type="deepseek_v2", kv_lora_rank=512), "model_type",
     "deepseek_v2", "multi-head latent attention"),
    (edit("deepseek-moe-16b-base", kv_lora_rank=512), "kv_lora_rank", 512,
     "multi-head latent attention"),
    (config("mistral-7b-v0.1"), "sliding_window", 4096, "sliding-window attention"),
    (edit("mistral-7b-instruct-v0.2", sliding_window=None), "sliding_window", 4096,
     "sliding-window attention"),  # absent: transformers' MistralConfig uses 4096
    (edit("qwen2.5-32b", use_sliding_window=True), "use_sliding_window", True,
     "sliding-window attention"),
    (edit("qwen1.5-moe-a2.7b", decoder_sparse_step=2), "decoder_sparse_step", 2,
     "every layer"),
    (edit("qwen1.5-moe-a2.7b", mlp_only_layers=[0, 5]), "mlp_only_layers", [0, 5],
     "every layer"),
    (edit("qwen1.5-moe-a2.7b", shared_expert_intermediate_size=5000),
     "shared_expert_intermediate_size", 5000, "multiple of moe_intermediate_size=1408"),
    (edit("deepseek-moe-16b-base", moe_layer_freq=2), "moe_layer_freq", 2, "every layer"),
    (edit("deepseek-moe-16b-base", first_k_dense_replace=28), "first_k_dense_replace", 28,
     "< layers=28"),
    (edit("opt-66b", word_embed_proj_dim=512), "word_embed_proj_dim", 512,
     "projected embeddings"),
    (edit("meta-llama-3-8b", torch_dtype="int4"), "torch_dtype", "int4", "unknown dtype"),
    (edit("meta-llama-3-8b", quantization_config={"quant_method": "awq", "bits": 4}),
     "quantization_config.quant_method", "awq", "only fp8"),
]


@pytest.mark.parametrize("data,key,value,reason", HF_ERRORS)
def test_refusals_name_file_key_and_value(tmp_path, data, key, value, reason):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(cf.ConfigFileError) as info:
        cf.load_model_file(path)
    err = info.value
    assert err.field == key and err.value == value and reason in err.reason
    assert str(err).startswith(f"{path}: invalid {key}=") and "\n" not in str(err)


def test_unsupported_model_type_lists_the_families(tmp_path):
    with pytest.raises(cf.ConfigFileError) as info:
        load(tmp_path, edit("meta-llama-3-8b", model_type="gemma"))
    assert all(family in str(info.value) for family in FAMILIES)


def test_every_family_is_exercised():
    types = {json.loads(p.read_text())["model_type"] for p in CONFIGS.glob("*.json")}
    types.add(json.loads(QWEN3_MOE.read_text())["model_type"])
    assert types == set(FAMILIES)
