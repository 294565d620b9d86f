"""Model presets: derived sizes and FLOPs against hand arithmetic (PAM_SPEC §6)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.models import MODELS, Model, get_model


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


# -- the presets' derived figures, pinned ------------------------------------------------------

# (layers, q_heads, kv_heads, head_dim, hidden, ffn, vocab, gated, tied) from each release's
# public config.json, and the four figures the simulator reads, worked out by hand below and
# written out as numbers (computed on a calculator, not by pamjax).
PRESET_CONFIGS = {
    "llama3-8b": ((32, 32, 8, 128, 4096, 14336, 128256, True, False),
                  (131_072, 16_059_990_016, 15_009_316_864, 15_009_316_864)),
    "qwen2.5-32b": ((64, 40, 8, 128, 5120, 27648, 152064, True, False),
                    (262_144, 65_525_514_240, 63_968_378_880, 63_968_378_880)),
    "llama3-70b": ((80, 64, 8, 128, 8192, 28672, 128256, True, False),
                   (327_680, 141_104_775_168, 139_003_428_864, 139_003_428_864)),
    "opt-175b": ((96, 96, 96, 128, 12288, 49152, 50272, False, True),
                 (4_718_592, 349_127_835_648, 349_127_835_648, 349_127_835_648)),
}


@pytest.mark.parametrize("name", sorted(PRESET_CONFIGS))
def test_preset_derived_figures_are_pinned(name):
    """Separate byte widths and MoE fields leave every dense 16-bit preset as it was."""
    (layers, hq, hkv, d, h, ffn, vocab, gated, tied), pinned = PRESET_CONFIGS[name]
    linear = layers * (2 * h * hq * d + 2 * h * hkv * d + (3 if gated else 2) * h * ffn)
    params = linear + vocab * h * (1 if tied else 2)
    by_hand = (2 * layers * hkv * d * 2,  # K and V, 2 bytes each
               2 * params,  # every weight, 2 bytes
               2 * (linear + vocab * h),  # 2 FLOPs per MAC, LM head included even when tied
               2 * (linear + vocab * h))  # streamed: all linear weights and the LM head
    assert by_hand == pinned
    m = get_model(name)
    assert (m.kv_bytes_per_token, m.weight_bytes, m.fc_flops_per_token,
            m.streamed_weight_bytes) == pinned
    assert not m.is_moe and m.active_params == m.params
    # A dense model reads all its weights whatever the batch.
    for tokens in (0, 1, 7.5, 4096):
        assert m.streamed_weight_bytes_for_batch(tokens) == pinned[3]


# -- mixture of experts -----------------------------------------------------------------------

def mixtral_8x7b(**changes) -> Model:
    """Mixtral-8x7B from its public config.json (8 experts as wide as ffn, top 2)."""
    fields = dict(layers=32, q_heads=32, kv_heads=8, head_dim=128, hidden=4096, ffn=14336,
                  vocab=32000, num_experts=8, experts_per_token=2)
    return Model("mixtral-8x7b", **{**fields, **changes})


def test_mixtral_counts_every_expert_in_weights_and_the_active_ones_in_flops():
    m = mixtral_8x7b()
    attention = 2 * 4096 * 32 * 128 + 2 * 4096 * 8 * 128
    expert = 3 * 4096 * 14336
    router = 4096 * 8
    embeddings = 2 * 32000 * 4096
    assert m.params == 32 * (attention + 8 * expert + router) + embeddings == 46_702_526_464
    assert m.active_params == 32 * (attention + 2 * expert + router) + embeddings \
        == 12_879_659_008
    assert m.weight_bytes == 2 * m.params
    assert m.fc_flops_per_token == 2 * (32 * (attention + 2 * expert + router) + 32000 * 4096)
    assert m.streamed_weight_bytes == 2 * (32 * (attention + 8 * expert + router)
                                           + 32000 * 4096)
    # MoE leaves attention and the KV cache alone.
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert m.attention_flops(100) == 4 * 32 * 32 * 128 * 100
    assert m.prefill_flops(10) == pytest.approx(m.fc_flops_per_token * 10
                                                + 4 * 32 * 32 * 128 * 55)
    assert (m.gqa_group, m.moe_layers, m.expert_ffn) == (4, 32, 14336)


def test_streamed_experts_follow_uniform_routing():
    m = mixtral_8x7b()
    expert_bytes = 2 * 3 * 4096 * 14336
    always = m.streamed_weight_bytes - 32 * 8 * expert_bytes  # everything but routed experts
    # 8 x (1 - (3/4)^t) distinct experts per layer: t=4 gives 8 x (1 - 81/256) = 5.46875.
    assert m.expected_distinct_experts(4) == pytest.approx(5.46875, rel=1e-12)
    assert m.streamed_weight_bytes_for_batch(4) == pytest.approx(
        always + 32 * 5.46875 * expert_bytes, rel=1e-12)
    # One token reads its 2 experts: the active weights; none reads no expert.
    assert m.streamed_weight_bytes_for_batch(1) == pytest.approx(
        2 * (m.active_params - 32000 * 4096), rel=1e-12)
    assert m.streamed_weight_bytes_for_batch(0) == always
    # A large batch touches every expert: the all-experts limit streamed_weight_bytes.
    assert m.streamed_weight_bytes_for_batch(10_000) == m.streamed_weight_bytes
    # A mean batch (a float) and arrays work; the curve rises with the batch.
    curve = m.streamed_weight_bytes_for_batch(np.array([0.0, 1.0, 2.5, 8.0, 64.0]))
    assert np.all(np.diff(curve) > 0) and curve[2] == m.streamed_weight_bytes_for_batch(2.5)
    # Top-k = E routes every token everywhere: all experts from the first token.
    dense_like = mixtral_8x7b(experts_per_token=8)
    assert dense_like.streamed_weight_bytes_for_batch(1) == dense_like.streamed_weight_bytes
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="tokens"):
            m.streamed_weight_bytes_for_batch(bad)


def test_deepseek_moe_dense_layers_shared_experts_and_narrow_experts_by_hand():
    # DeepSeekMoE-16B (public config.json): layer 0 dense (ffn 10944), 27 MoE layers of 64
    # routed + 2 shared experts 1408 wide, top 6, multi-head attention.
    m = Model("deepseek-moe-16b", layers=28, q_heads=16, kv_heads=16, head_dim=128,
              hidden=2048, ffn=10944, vocab=102400, num_experts=64, experts_per_token=6,
              shared_experts=2, moe_ffn=1408, first_dense_layers=1)
    attention = 4 * 2048 * 2048
    dense_ffn = 3 * 2048 * 10944
    expert = 3 * 2048 * 1408
    router = 2048 * 64
    embeddings = 2 * 102400 * 2048
    assert m.params == 28 * attention + dense_ffn + 27 * (66 * expert + router) + embeddings
    assert m.active_params == 28 * attention + dense_ffn + 27 * (8 * expert + router) \
        + embeddings
    assert m.streamed_weight_bytes_for_batch(0) == 2 * (
        28 * attention + dense_ffn + 27 * (2 * expert + router) + 102400 * 2048)
    assert (m.moe_layers, m.expert_ffn, m.gqa_group) == (27, 1408, 1)


def test_weight_and_kv_byte_widths_are_separate():
    base = get_model("llama3-70b")
    fp8_kv = dataclasses.replace(base, kv_bytes_per_value=1)
    assert fp8_kv.kv_bytes_per_token == base.kv_bytes_per_token // 2
    assert (fp8_kv.weight_bytes, fp8_kv.streamed_weight_bytes) == \
        (base.weight_bytes, base.streamed_weight_bytes)
    int8_weights = dataclasses.replace(base, weight_bytes_per_value=1)
    assert int8_weights.kv_bytes_per_token == base.kv_bytes_per_token
    assert int8_weights.weight_bytes == base.params
    assert int8_weights.streamed_weight_bytes == base.streamed_weight_bytes // 2
    assert int8_weights.fc_flops_per_token == base.fc_flops_per_token  # FLOPs are not bytes


@pytest.mark.parametrize("changes,field,reason", [
    (dict(num_experts=8, experts_per_token=9), "experts_per_token", "in 1..num_experts=8"),
    (dict(num_experts=8, experts_per_token=0), "experts_per_token", "in 1..num_experts=8"),
    (dict(num_experts=1, experts_per_token=1), "num_experts", "0 (dense) or >= 2"),
    (dict(num_experts=-8), "num_experts", ">= 0"),
    (dict(num_experts=8, experts_per_token=2, shared_experts=-1), "shared_experts", ">= 0"),
    (dict(num_experts=8, experts_per_token=2, moe_ffn=1.5), "moe_ffn", "integer >= 0"),
    (dict(num_experts=8, experts_per_token=2, first_dense_layers=32), "first_dense_layers",
     "< layers=32"),
    (dict(experts_per_token=2), "experts_per_token", "0 in a dense model"),
    (dict(shared_experts=1), "shared_experts", "0 in a dense model"),
    (dict(moe_ffn=1408), "moe_ffn", "0 in a dense model"),
    (dict(first_dense_layers=1), "first_dense_layers", "0 in a dense model"),
    (dict(weight_bytes_per_value=0), "weight_bytes_per_value", "positive integer"),
    (dict(kv_bytes_per_value=True), "kv_bytes_per_value", "positive integer"),
])
def test_moe_and_byte_fields_are_validated(changes, field, reason):
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(get_model("llama3-8b"), **changes)
    assert info.value.field == f"llama3-8b.{field}" and reason in info.value.reason
