"""Platform and model files (pamjax.config_files): round trips, overrides, every error."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from pamjax import config_files as cf
from pamjax.errors import ConfigError
from pamjax.hardware import TIER_NAMES, get_platform
from pamjax.models import MODELS, get_model
from pamjax.studies.bounds import bound
from pamjax.systems import make_params

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path, name: str, text: str | bytes) -> pathlib.Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def derived_figures(platform) -> dict:
    """What the simulator reads off a platform, beyond the stored fields."""
    out = {"gpus": platform.gpu.num_gpus}
    for tier in platform.tiers:
        out[tier.name] = (tier.capacity_gb, tier.effective_gbps(), tier.link_total_gbps,
                          tier.bank_groups_per_device, tier.device.internal_gbps(tier.kv_run_bytes),
                          tier.device.pu_peak_gflops)
    return out


def assert_same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_preset_platform_round_trips_exactly(tmp_path, suffix):
    preset = get_platform()
    loaded = cf.load_platform_file(cf.write_config_file(preset, tmp_path / f"p{suffix}"))
    assert loaded == preset
    assert derived_figures(loaded) == derived_figures(preset)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_preset_models_round_trip_exactly(tmp_path, name, suffix):
    preset = get_model(name)
    loaded = cf.load_model_file(cf.write_config_file(preset, tmp_path / f"m{suffix}"))
    assert loaded == preset
    assert (loaded.kv_bytes_per_token, loaded.params, loaded.fc_flops_per_token) == \
        (preset.kv_bytes_per_token, preset.params, preset.fc_flops_per_token)


def test_shipped_full_description_is_the_preset():
    assert cf.load_platform_file(EXAMPLES / "hardware" / "pam-dgx-h100-full.toml") \
        == get_platform()


def test_file_objects_give_the_same_simulation_parameters_and_bounds(tmp_path):
    model = cf.load_model_file(cf.write_config_file(get_model("llama3-8b"), tmp_path / "m.toml"))
    platform = cf.load_platform_file(EXAMPLES / "hardware" / "pam-dgx-h100-full.toml")
    assert_same_params(make_params("pam", model, platform, max_batch=8),
                       make_params("pam", "llama3-8b", None, max_batch=8))
    by_file = bound("pam", model, mean_prompt=200, mean_output=300, batch=32,
                    platform=platform)
    by_name = bound("pam", "llama3-8b", mean_prompt=200, mean_output=300, batch=32)
    assert by_file.tokens_per_s == by_name.tokens_per_s
    assert by_file.binding_resource == by_name.binding_resource


# -- overrides --------------------------------------------------------------------------------

def test_eighty_dimms_example_changes_ddr_only():
    preset = get_platform()
    p = cf.load_platform_file(EXAMPLES / "hardware" / "pam-80-dimms.toml")
    assert p.name == "pam-80-dimms"
    assert p.ddr.num_devices == 80
    assert p.ddr.capacity_gb == pytest.approx(2 * preset.ddr.capacity_gb)
    assert p.ddr.effective_gbps() == pytest.approx(2 * preset.ddr.effective_gbps())
    assert (p.gpu, p.hbm, p.ssd, p.energy) == (preset.gpu, preset.hbm, preset.ssd, preset.energy)


def test_section_fields_apply_together_and_device_overrides_propagate():
    p = cf.load_platform_file(EXAMPLES / "hardware" / "pam-16-gpus-slow-hbm-pim.toml")
    # num_gpus = 16 alone would violate TP x PP = GPUs; the section is applied at once.
    assert (p.gpu.num_gpus, p.gpu.tensor_parallel, p.gpu.pipeline_parallel) == (16, 8, 2)
    preset = get_platform().hbm.device
    assert p.hbm.device.tCCD_L == 8
    expected = dataclasses.replace(preset, tCCD_L=8).internal_gbps()
    assert p.hbm.device.internal_gbps() == expected < preset.internal_gbps()
    assert p.energy.ddr_pim_read == 1.5
    # Tier energy fields are stored, not derived: an energy override leaves them alone.
    assert p.ddr.pim_read_pj_per_bit == get_platform().ddr.pim_read_pj_per_bit


def test_tables_dotted_keys_and_json_agree_with_with_overrides(tmp_path):
    overrides = {"ddr.num_devices": 64, "hbm.device.tCCD_L": 6, "ssd.link_gbps": 7.0,
                 "energy.nvlink": 2.0}
    expected = get_platform(overrides=overrides)
    tables = write(tmp_path, "t.toml", 'base = "pam-dgx-h100"\nname = "pam-dgx-h100"\n'
                   "[ddr]\nnum_devices = 64\n[hbm.device]\ntCCD_L = 6\n[ssd]\nlink_gbps = 7\n"
                   "[energy]\nnvlink = 2.0\n")
    dotted = write(tmp_path, "d.toml", 'base = "pam-dgx-h100"\nname = "pam-dgx-h100"\n'
                   "ddr.num_devices = 64\nhbm.device.tCCD_L = 6\nssd.link_gbps = 7.0\n"
                   "energy.nvlink = 2\n")
    flat_json = write(tmp_path, "j.json", json.dumps(
        {"base": "pam-dgx-h100", "name": "pam-dgx-h100", **overrides}))
    for path in (tables, dotted, flat_json):
        assert cf.load_platform_file(path) == expected, path


def test_tRC_zero_is_allowed_as_in_the_preset(tmp_path):
    path = write(tmp_path, "h.toml", 'base = "pam-dgx-h100"\n[ddr.device]\ntRC = 0\n')
    assert cf.load_platform_file(path).ddr.device.tRC == 0


def test_names_default_to_the_file_stem(tmp_path):
    p = cf.load_platform_file(write(tmp_path, "my-box.toml", 'base = "pam-dgx-h100"\n'))
    assert p.name == "my-box"
    m = cf.load_model_file(write(tmp_path, "small.json", '{"base": "llama3-8b", "layers": 16}'))
    assert (m.name, m.layers, m.hidden) == ("small", 16, 4096)
    assert m.kv_bytes_per_token == get_model("llama3-8b").kv_bytes_per_token // 2


@pytest.mark.parametrize("name,kv_kib,params_b", [
    ("mistral-7b-like.toml", 128, 7.24),  # 2 x 32 layers x 8 heads x 128 x 2 B
    ("llama2-7b.toml", 512, 6.74),  # 2 x 32 x 32 x 128 x 2
    ("llama3-70b-8bit.json", 160, 70.55),  # llama3-70b at 1 byte per value
    ("mixtral-8x7b.toml", 128, 46.70),  # 2 x 32 x 8 x 128 x 2; Mistral AI: 46.7B
    ("qwen3-30b-a3b/config.json", 96, 30.53),  # 2 x 48 x 4 x 128 x 2; model card: 30.5B
])
def test_shipped_model_examples(name, kv_kib, params_b):
    m = cf.load_model_file(EXAMPLES / "models" / name)
    assert m.kv_bytes_per_token == kv_kib * 1024
    assert m.params / 1e9 == pytest.approx(params_b, abs=0.01)


def test_shipped_moe_example_is_mixtral():
    m = cf.load_model_file(EXAMPLES / "models" / "mixtral-8x7b.toml")
    assert (m.num_experts, m.experts_per_token, m.shared_experts, m.expert_ffn) == \
        (8, 2, 0, 14336)
    assert m.active_params / 1e9 == pytest.approx(12.88, abs=0.01)  # published: 12.9B


# -- byte widths: the older single key ---------------------------------------------------------

def test_bytes_per_value_sets_both_widths(tmp_path):
    full = cf.load_model_file(write(tmp_path, "a.toml", MODEL + "bytes_per_value = 1\n"))
    assert (full.weight_bytes_per_value, full.kv_bytes_per_value) == (1, 1)
    # The shipped example gives the two new keys; the old key gives the same model.
    old_key = cf.load_model_file(write(tmp_path, "llama3-70b-8bit.json", json.dumps(
        {"base": "llama3-70b", "bytes_per_value": 1})))
    assert old_key == cf.load_model_file(EXAMPLES / "models" / "llama3-70b-8bit.json")
    preset = get_model("llama3-70b")
    assert old_key.kv_bytes_per_token == preset.kv_bytes_per_token // 2
    assert old_key.weight_bytes == preset.params


def test_byte_widths_apart(tmp_path):
    m = cf.load_model_file(write(tmp_path, "fp8kv.toml", 'base = "llama3-8b"\n'
                                 "kv_bytes_per_value = 1\n"))
    preset = get_model("llama3-8b")
    assert (m.weight_bytes, m.kv_bytes_per_token) == \
        (preset.weight_bytes, preset.kv_bytes_per_token // 2)


def test_moe_model_round_trips(tmp_path):
    moe = cf.load_model_file(EXAMPLES / "models" / "mixtral-8x7b.toml")
    deepseek = dataclasses.replace(moe, shared_experts=2, moe_ffn=1408, first_dense_layers=1,
                                   kv_bytes_per_value=1)
    for model in (moe, deepseek):
        for suffix in (".toml", ".json"):
            assert cf.load_model_file(cf.write_config_file(model, tmp_path / f"m{suffix}")) \
                == model


# -- validation -------------------------------------------------------------------------------

BASE = 'base = "pam-dgx-h100"\n'

PLATFORM_ERRORS = [
    # (file text, dotted field, rejected value, words in the reason)
    (BASE + "[ddr]\nnum_devicez = 80\n", "ddr.num_devicez", 80, "unknown field"),
    (BASE + "[tpu]\ncount = 4\n", "tpu.count", 4, "unknown section"),
    (BASE + "frobnicate = 1\n", "frobnicate", 1, "unknown field"),
    (BASE + "ddr = 3\n", "ddr", 3, "must be a table"),
    (BASE + "hbm.device = 3\n", "hbm.device", 3, "must be a table"),
    (BASE + "[hbm.device]\nwarp_drive = 1\n", "hbm.device.warp_drive", 1, "unknown field"),
    (BASE + '[ddr]\nnum_devices = "80"\n', "ddr.num_devices", "80", "not a string"),
    (BASE + "[ddr]\nnum_devices = true\n", "ddr.num_devices", True, "not a boolean"),
    (BASE + "[ddr]\nnum_devices = [80]\n", "ddr.num_devices", [80], "not a list"),
    (BASE + "[ddr]\nnum_devices = 80.5\n", "ddr.num_devices", 80.5, "must be an integer"),
    (BASE + "[ddr]\nnum_devices = -1\n", "ddr.num_devices", -1, "must be > 0"),
    (BASE + "[ddr]\nnum_devices = 0\n", "ddr.num_devices", 0, "must be > 0"),
    (BASE + "[hbm.device]\ntCCD_L = 0\n", "hbm.device.tCCD_L", 0, "must be > 0"),
    (BASE + "[ssd.device]\ntR_us = -30.0\n", "ssd.device.tR_us", -30.0, "must be > 0"),
    (BASE + "[gpu]\npeak_tflops = inf\n", "gpu.peak_tflops", float("inf"), "finite"),
    (BASE + "[energy]\nnvlink = -0.5\n", "energy.nvlink", -0.5, "must be > 0"),
    (BASE + "[gpu]\nnum_gpus = 16\n", "gpu.tensor_parallel*pipeline_parallel", (4, 2),
     "must multiply to num_gpus=16"),
    (BASE + "[gpu]\ngemm_efficiency = 1.5\n", "gpu.gemm_efficiency", 1.5, "must be <= 1"),
    ('base = "dgx-a100"\n', "base", "dgx-a100", "unknown platform preset"),
    ("base = 3\n", "base", 3, "non-empty string"),
    (BASE + "name = 7\n", "name", 7, "non-empty string"),
    ("[ddr]\nnum_devices = 80\n", "gpu", None, "missing section"),
]


@pytest.mark.parametrize("text,field,value,reason", PLATFORM_ERRORS)
def test_platform_errors_name_file_field_and_value(tmp_path, text, field, value, reason):
    path = write(tmp_path, "hw.toml", text)
    with pytest.raises(ConfigError) as info:
        cf.load_platform_file(path)
    err = info.value
    assert isinstance(err, cf.ConfigFileError)
    assert err.field == field and err.path == str(path) and reason in err.reason
    assert err.value == value or (math.isnan(value) and math.isnan(err.value))
    assert str(err).startswith(f"{path}: invalid {field}=")


def test_nan_is_refused(tmp_path):
    with pytest.raises(cf.ConfigFileError, match="gpu.hbm_tbps=nan: must be a finite"):
        cf.load_platform_file(write(tmp_path, "hw.toml", BASE + "[gpu]\nhbm_tbps = nan\n"))


def test_full_description_needs_every_field(tmp_path):
    data = cf.platform_to_dict(get_platform())
    del data["ddr"]["device"]["tCCD_L"]
    with pytest.raises(cf.ConfigFileError, match="invalid ddr.device.tCCD_L=None: missing"):
        cf.load_platform_file(write(tmp_path, "full.json", json.dumps(data)))


def test_json_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, "hw.json", json.dumps(
        {"base": "pam-dgx-h100", "ddr": {"num_devices": 80}, "ddr.num_devices": 40}))
    with pytest.raises(cf.ConfigFileError, match="ddr.num_devices=40: given twice"):
        cf.load_platform_file(path)


MODEL = "layers = 32\nq_heads = 32\nkv_heads = 8\nhead_dim = 128\nhidden = 4096\n" \
        "ffn = 14336\nvocab = 32000\n"

MODEL_ERRORS = [
    (MODEL.replace("layers = 32\n", ""), "layers", None, "missing"),
    (MODEL.replace("vocab = 32000\n", ""), "vocab", None, "missing"),
    (MODEL + "heads = 32\n", "heads", 32, "unknown field"),
    (MODEL.replace("layers = 32", "layers = 0"), "layers", 0, "positive integer"),
    (MODEL.replace("layers = 32", "layers = -4"), "layers", -4, "positive integer"),
    (MODEL.replace("layers = 32", 'layers = "32"'), "layers", "32", "not a string"),
    (MODEL.replace("layers = 32", "layers = 32.0"), "layers", 32.0, "must be an integer"),
    (MODEL.replace("layers = 32", "layers = true"), "layers", True, "not a boolean"),
    (MODEL.replace("hidden = 4096", "hidden = nan"), "hidden", float("nan"), "finite"),
    (MODEL.replace("kv_heads = 8", "kv_heads = 5"), "kv_heads", 5, "must divide q_heads=32"),
    (MODEL + "gated_ffn = 1\n", "gated_ffn", 1, "true or false"),
    ('base = "gpt-5"\n', "base", "gpt-5", "unknown model preset"),
    (MODEL + "bytes_per_value = 1\nkv_bytes_per_value = 1\n", "bytes_per_value", 1,
     "conflicts with kv_bytes_per_value"),
    (MODEL + "weight_bytes_per_value = 2\nbytes_per_value = 1\n", "bytes_per_value", 1,
     "conflicts with weight_bytes_per_value"),
    (MODEL + "bytes_per_value = 0\n", "bytes_per_value", 0, "positive integer"),
    (MODEL + "bytes_per_value = 1.5\n", "bytes_per_value", 1.5, "must be an integer"),
    (MODEL + "kv_bytes_per_value = 0\n", "kv_bytes_per_value", 0, "positive integer"),
    (MODEL + "weight_bytes_per_value = 0.5\n", "weight_bytes_per_value", 0.5,
     "must be an integer"),
    (MODEL + "num_experts = 8\nexperts_per_token = 9\n", "experts_per_token", 9,
     "in 1..num_experts=8"),
    (MODEL + "num_experts = 8\n", "experts_per_token", 0, "in 1..num_experts=8"),
    (MODEL + "num_experts = 1\nexperts_per_token = 1\n", "num_experts", 1,
     "0 (dense) or >= 2"),
    (MODEL + "experts_per_token = 2\n", "experts_per_token", 2, "0 in a dense model"),
    (MODEL + "num_experts = 8\nexperts_per_token = 2\nshared_experts = -1\n",
     "shared_experts", -1, ">= 0"),
    (MODEL + "num_experts = 8\nexperts_per_token = 2\nfirst_dense_layers = 32\n",
     "first_dense_layers", 32, "< layers=32"),
    (MODEL + 'num_experts = 8\nexperts_per_token = 2\nmoe_ffn = "1408"\n', "moe_ffn", "1408",
     "not a string"),
]


@pytest.mark.parametrize("text,field,value,reason", MODEL_ERRORS)
def test_model_errors_name_file_field_and_value(tmp_path, text, field, value, reason):
    path = write(tmp_path, "m.toml", text)
    with pytest.raises(cf.ConfigFileError) as info:
        cf.load_model_file(path)
    err = info.value
    assert err.field == field and err.path == str(path) and reason in err.reason
    assert err.value == value or (math.isnan(value) and math.isnan(err.value))
    assert str(err).startswith(f"{path}: invalid {field}=")


FILE_ERRORS = [
    # (file name, content or None for no file, reason, line)
    ("missing.toml", None, "file not found", 0),
    ("hw.yaml", "base: pam-dgx-h100\n", "unknown file type '.yaml'", 0),
    ("hw", "base = 1\n", "unknown file type '(none)'", 0),
    ("empty.toml", "", "empty file", 0),
    ("blank.json", "  \n\n", "empty file", 0),
    ("comments.toml", "# nothing here\n\n", "no settings", 0),
    ("nul.toml", b'base = "pam"\n\x00\x01\x02', "binary content", 2),
    ("latin1.json", b'{"name": "caf\xe9"}', "not UTF-8 text", 1),
    ("png.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary content", 3),
    ("bad.toml", 'base = "pam-dgx-h100"\n[ddr\nnum_devices = 80\n', "malformed TOML", 2),
    ("bad2.toml", 'base = "pam-dgx-h100"\n\n[ddr]\nnum_devices = \n', "malformed TOML", 4),
    ("bad.json", '{\n  "base": "pam-dgx-h100",\n}\n', "malformed JSON", 3),
    ("list.json", "[1, 2]\n", "must be an object", 0),
]


@pytest.mark.parametrize("loader", [cf.load_platform_file, cf.load_model_file])
@pytest.mark.parametrize("name,content,reason,line", FILE_ERRORS)
def test_unusable_files_name_path_and_line(tmp_path, loader, name, content, reason, line):
    path = tmp_path / name
    if content is not None:
        write(tmp_path, name, content)
    with pytest.raises(cf.ConfigFileError) as info:
        loader(path)
    err = info.value
    assert err.field is None and err.line == line and reason in err.reason
    where = f"{path}:{line}" if line else str(path)
    assert str(err).startswith(f"{where}: ")
    assert "\n" not in str(err)


def test_a_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "hw.toml"
    folder.mkdir()
    with pytest.raises(cf.ConfigFileError, match="is a directory"):
        cf.load_platform_file(folder)


def test_write_refuses_unknown_suffix_and_objects(tmp_path):
    with pytest.raises(cf.ConfigFileError, match="unknown file type"):
        cf.write_config_file(get_platform(), tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="must be a Platform or a Model"):
        cf.write_config_file({"layers": 1}, tmp_path / "p.toml")


def test_every_tier_section_is_accepted(tmp_path):
    text = BASE + "".join(f"[{t}]\nlink_latency_us = 3.0\n" for t in TIER_NAMES)
    p = cf.load_platform_file(write(tmp_path, "hw.toml", text))
    assert all(t.link_latency_us == 3.0 for t in p.tiers)
