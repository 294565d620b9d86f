"""Model presets: derived sizes and FLOPs against hand arithmetic (PAM_SPEC §6)."""

from __future__ import annotations

import dataclasses

import pytest

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.models import MODELS, get_model


@pytest.mark.parametrize("name,kv", [
    ("qwen2.5-32b", 256 * 1024),  # 2 x 64 layers x 8 heads x 128 x 2 B
    ("llama3-70b", 320 * 1024),  # 2 x 80 x 8 x 128 x 2
    ("opt-175b", 4.5 * 1024 * 1024),  # 2 x 96 x 96 x 128 x 2
    ("llama3-8b", 128 * 1024),  # 2 x 32 x 8 x 128 x 2
])
def test_kv_bytes_per_token_matches_spec_table(name, kv):
    assert get_model(name).kv_bytes_per_token == kv


def test_llama3_70b_parameters_by_hand():
    m = get_model("llama3-70b")
    attention = 2 * 8192 * 64 * 128 + 2 * 8192 * 8 * 128  # Q, O + K, V
    ffn = 3 * 8192 * 28672
    layers = 80 * (attention + ffn)
    embeddings = 2 * 128256 * 8192  # untied embedding + LM head
    assert m.params == layers + embeddings
    assert m.params / 1e9 == pytest.approx(70.55, abs=0.01)  # the published "70B"
    assert m.weight_bytes == 2 * m.params
    assert m.fc_flops_per_token == 2 * (layers + 128256 * 8192)


def test_opt_175b_parameters_by_hand():
    m = get_model("opt-175b")
    per_layer = 4 * 12288 * 12288 + 2 * 12288 * 49152  # MHA projections + 2-matrix MLP
    assert m.params == 96 * per_layer + 50272 * 12288  # tied embeddings
    assert m.params / 1e9 == pytest.approx(174.56, abs=0.01)
    # 256 requests x 2048 tokens of OPT-175B KV ~ 2304 GB (PAM_SPEC §6 states it).
    assert 256 * 2048 * m.kv_bytes_per_token / 2**30 == pytest.approx(2304)


def test_qwen_parameters_close_to_published_size():
    assert get_model("qwen2.5-32b").params / 1e9 == pytest.approx(32.8, abs=0.3)


def test_flops_by_hand():
    m = get_model("llama3-8b")
    ctx = 1000
    assert m.attention_flops(ctx) == 4 * 32 * 32 * 128 * ctx
    assert m.decode_flops_per_token(ctx) == m.fc_flops_per_token + 4 * 32 * 32 * 128 * ctx
    n = 500
    assert m.prefill_flops(n) == pytest.approx(
        m.fc_flops_per_token * n + 4 * 32 * 32 * 128 * n * (n + 1) / 2)


def test_validation_and_unknown_names():
    with pytest.raises(UnknownNameError, match="gpt-9"):
        get_model("gpt-9")
    base = MODELS["llama3-8b"]
    with pytest.raises(ConfigError, match="layers"):
        dataclasses.replace(base, layers=0)
    with pytest.raises(ConfigError, match="kv_heads"):
        dataclasses.replace(base, kv_heads=5)
