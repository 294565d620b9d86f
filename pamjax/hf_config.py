"""Models from Hugging Face ``config.json`` files.

``--model-file`` and :func:`pamjax.config_files.load_model_file` hand a file with a
``model_type`` or ``architectures`` key to :func:`model_from_hf_config`, which maps the
transformers keys onto :class:`~pamjax.models.Model` fields. Only the keys below are read;
the many others of a config.json (rope, dropout, token ids, ...) change nothing counted here.

=========================== =============================================================
Model field                 config.json key
=========================== =============================================================
layers                      ``num_hidden_layers``
q_heads                     ``num_attention_heads``
kv_heads                    ``num_key_value_heads`` (llama, deepseek: ``num_attention_heads``
                            when absent, as transformers does; opt: always
                            ``num_attention_heads``)
head_dim                    ``head_dim``, else ``hidden_size / num_attention_heads``
                            (qwen3, qwen3_moe: required, their configs always give it)
hidden                      ``hidden_size``
ffn                         ``intermediate_size`` (opt: ``ffn_dim``)
vocab                       ``vocab_size``
gated_ffn                   true (SwiGLU), opt: false (ReLU, two matrices)
tied_embeddings             ``tie_word_embeddings`` (default: false; opt: true)
weight_bytes_per_value      ``torch_dtype`` (or ``dtype``): float32 4, float16/bfloat16 2,
                            float8 1; absent: 2. ``quantization_config`` with
                            ``quant_method = "fp8"``: 1
kv_bytes_per_value          ``torch_dtype`` (or ``dtype``), as above
num_experts                 ``num_local_experts`` (mixtral), ``num_experts`` (qwen2_moe,
                            qwen3_moe), ``n_routed_experts`` (deepseek)
experts_per_token           ``num_experts_per_tok``
shared_experts              deepseek: ``n_shared_experts``; qwen2_moe:
                            ``shared_expert_intermediate_size / moe_intermediate_size``
moe_ffn                     ``moe_intermediate_size`` (mixtral: the experts are ``ffn`` wide)
first_dense_layers          ``first_k_dense_replace`` (deepseek)
=========================== =============================================================

Families (``model_type``): llama, mistral, qwen2, qwen3 (dense, SwiGLU, grouped-query
attention), mixtral, qwen2_moe, qwen3_moe, deepseek (DeepSeekMoE: multi-head attention with
leading dense layers, shared and routed experts) and opt. What the simulator cannot represent
is refused with the key that shows it, rather than modelled wrongly:

* multi-head latent attention (``deepseek_v2``, ``deepseek_v3`` and any config with
  ``kv_lora_rank``): its compressed KV cache and attention FLOPs are not grouped-query ones;
* sliding-window attention (mistral ``sliding_window`` other than null, which transformers
  defaults to 4096 when absent; qwen ``use_sliding_window = true``): pamjax keeps every
  token's KV;
* MoE layers that are not every layer after the first ``first_k_dense_replace``
  (``decoder_sparse_step`` other than 1, a non-empty ``mlp_only_layers``, ``moe_layer_freq``
  other than 1);
* OPT's projected embeddings (``word_embed_proj_dim`` other than ``hidden_size``, OPT-350m);
* quantized weights other than FP8 (4-bit AWQ/GPTQ are not whole bytes).

Norm placement (OPT's ``do_layer_norm_before``), biases (``attention_bias``, qwen2's QKV
biases) and learned position embeddings are not counted (see :mod:`pamjax.models`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

from pamjax import models
from pamjax._file_values import check_type, default_name
from pamjax.errors import ConfigError, ConfigFileError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
            "deepseek", "opt")
"""The ``model_type`` values :func:`model_from_hf_config` reads."""

_MLA_TYPES = ("deepseek_v2", "deepseek_v3")

# Byte widths of the dtype names transformers writes in torch_dtype / dtype.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                "float8_e5m2": 1}

_REQUIRED = object()


class _Reader:
    """Typed access to the keys of one config.json, every failure naming the key."""

    def __init__(self, path, data: Mapping[str, Any], model_type: str):
        self.path, self.data, self.model_type = path, data, model_type

    def get(self, key: str, kind: str = "int", default=_REQUIRED):
        """``data[key]`` checked as ``kind``; ``default`` when absent or null."""
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigFileError(self.path, key, None, "missing (required for model_type "
                                      f"{self.model_type!r})")
            return default
        return check_type(self.path, key, value, kind)

    def refuse(self, key: str, value, reason: str) -> ConfigFileError:
        """The error for a present key whose value pamjax cannot model."""
        return ConfigFileError(self.path, key, value, reason)


def model_from_hf_config(data: Mapping[str, Any], source: str | os.PathLike = "<dict>"
                         ) -> models.Model:
    """Build a :class:`~pamjax.models.Model` from a parsed Hugging Face config.json.

    Args:
      data: the file's content (e.g. ``{"model_type": "mixtral", "num_hidden_layers": 32,
        ...}``); the key mapping is in the module docstring.
      source: the file name used in error messages and for the default name: the last
        part of ``_name_or_path`` if given, else the file stem, or the folder's name for a
        file called ``config.json``.

    Returns:
      The Model.

    Raises:
      ConfigFileError: naming the file and the key: no or an unsupported ``model_type``, a
        missing or mistyped key, an architecture pamjax does not model (module docstring),
        or a value the Model refuses (e.g. ``num_experts_per_tok`` above the experts).
    """
    path = source
    if "model_type" not in data:
        raise ConfigFileError(path, "model_type", None, "missing: a Hugging Face config.json "
                              "needs it to tell its family (one of: " + ", ".join(FAMILIES)
                              + ")")
    model_type = check_type(path, "model_type", data["model_type"], "str")
    hf = _Reader(path, data, model_type)
    if model_type in _MLA_TYPES or data.get("kv_lora_rank") is not None:
        key = "model_type" if model_type in _MLA_TYPES else "kv_lora_rank"
        raise hf.refuse(key, data.get(key), "multi-head latent attention (DeepSeek-V2/V3) is "
                        "not modelled: its compressed KV cache and attention FLOPs differ "
                        "from grouped-query attention")
    if model_type not in FAMILIES:
        raise hf.refuse("model_type", model_type, "unsupported Hugging Face model_type; "
                        "supported: " + ", ".join(FAMILIES) + " (or write a pamjax model "
                        "file, examples/models/)")
    _refuse_sliding_window(hf)

    q_heads = hf.get("num_attention_heads")
    hidden = hf.get("hidden_size")
    values = {
        "layers": hf.get("num_hidden_layers"),
        "q_heads": q_heads,
        "hidden": hidden,
        "vocab": hf.get("vocab_size"),
        "tied_embeddings": hf.get("tie_word_embeddings", "bool", model_type == "opt"),
        **_byte_widths(hf),
    }
    keys = {"layers": "num_hidden_layers", "q_heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "hidden": "hidden_size",
            "vocab": "vocab_size", "ffn": "intermediate_size"}
    if model_type == "opt":
        projected = hf.get("word_embed_proj_dim", default=hidden)
        if projected != hidden:
            raise hf.refuse("word_embed_proj_dim", projected, f"differs from hidden_size="
                            f"{hidden}: projected embeddings (OPT-350m) are not modelled")
        values.update(kv_heads=q_heads, head_dim=_head_dim(hf, hidden, q_heads),
                      ffn=hf.get("ffn_dim"), gated_ffn=False)
        keys.update(kv_heads="num_attention_heads", ffn="ffn_dim")
    else:
        fallback = q_heads if model_type in ("llama", "deepseek") else _REQUIRED
        head_dim = hf.get("head_dim") if model_type in ("qwen3", "qwen3_moe") \
            else _head_dim(hf, hidden, q_heads)
        values.update(kv_heads=hf.get("num_key_value_heads", default=fallback),
                      head_dim=head_dim, ffn=hf.get("intermediate_size"), gated_ffn=True)
    moe_values, moe_keys = _experts(hf)
    values.update(moe_values)
    keys.update(moe_keys)
    values["name"] = _hf_name(data, path)
    try:
        return models.Model(**values)
    except ConfigError as err:
        field = str(err.field).rsplit(".", 1)[-1]
        raise ConfigFileError(path, keys.get(field, field), err.value, err.reason) from None


def _head_dim(hf: _Reader, hidden: int, q_heads: int) -> int:
    """``head_dim`` if given, else ``hidden_size / num_attention_heads`` (must divide)."""
    head_dim = hf.get("head_dim", default=None)
    if head_dim is not None:
        return head_dim
    if q_heads <= 0:
        raise hf.refuse("num_attention_heads", q_heads, "must be a positive integer")
    if hidden % q_heads:
        raise hf.refuse("hidden_size", hidden, f"must be a multiple of num_attention_heads="
                        f"{q_heads} when head_dim is not given")
    return hidden // q_heads


def _refuse_sliding_window(hf: _Reader) -> None:
    """Sliding-window attention caps a request's KV, which pamjax does not model."""
    if hf.model_type in ("mistral", "mixtral"):
        # transformers' MistralConfig defaults the window to 4096, MixtralConfig to none.
        default = 4096 if hf.model_type == "mistral" else None
        # An explicit null means no window, so absent and null differ here.
        window = hf.data.get("sliding_window", default)
        if window is not None:
            raise hf.refuse("sliding_window", window, "sliding-window attention is not "
                            "modelled (pamjax keeps every token's KV); set it to null to "
                            "model full attention")
    elif hf.model_type.startswith("qwen") and hf.get("use_sliding_window", "bool", False):
        raise hf.refuse("use_sliding_window", True, "sliding-window attention is not "
                        "modelled (pamjax keeps every token's KV); set it to false to model "
                        "full attention")


def _byte_widths(hf: _Reader) -> dict[str, int]:
    """weight_bytes_per_value and kv_bytes_per_value from the dtype and quantization."""
    key = "torch_dtype" if "torch_dtype" in hf.data else "dtype"
    dtype = hf.get(key, "str", "bfloat16")
    name = dtype.removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise hf.refuse(key, dtype, "unknown dtype; known: " + ", ".join(_DTYPE_BYTES))
    width = _DTYPE_BYTES[name]
    weights = width
    quantization = hf.data.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
        if method != "fp8":
            raise hf.refuse("quantization_config.quant_method", method, "only fp8 weights "
                            "are modelled (1 byte per value); for other formats write a "
                            "pamjax model file with weight_bytes_per_value")
        weights = 1
    return {"weight_bytes_per_value": weights, "kv_bytes_per_value": width}


def _experts(hf: _Reader) -> tuple[dict[str, int], dict[str, str]]:
    """(Model MoE fields, Model field -> config key) of an MoE family; empty when dense."""
    t = hf.model_type
    if t == "mixtral":
        return ({"num_experts": hf.get("num_local_experts"),
                 "experts_per_token": hf.get("num_experts_per_tok")},
                {"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"})
    if t in ("qwen2_moe", "qwen3_moe"):
        step = hf.get("decoder_sparse_step", default=1)
        if step != 1:
            raise hf.refuse("decoder_sparse_step", step, "only an MoE FFN in every layer is "
                            "modelled (decoder_sparse_step = 1)")
        dense = hf.data.get("mlp_only_layers") or []
        if dense:
            raise hf.refuse("mlp_only_layers", dense, "only an MoE FFN in every layer is "
                            "modelled (mlp_only_layers = [])")
        moe_ffn = hf.get("moe_intermediate_size")
        values = {"num_experts": hf.get("num_experts"),
                  "experts_per_token": hf.get("num_experts_per_tok"), "moe_ffn": moe_ffn}
        keys = {"num_experts": "num_experts", "experts_per_token": "num_experts_per_tok",
                "moe_ffn": "moe_intermediate_size"}
        if t == "qwen2_moe":
            # One shared expert of width s acts as s / w experts of width w (same weights,
            # same FLOPs); a width that is no multiple of w has no such form.
            shared = hf.get("shared_expert_intermediate_size")
            if moe_ffn <= 0 or shared % moe_ffn:
                raise hf.refuse("shared_expert_intermediate_size", shared, "must be a multiple "
                                f"of moe_intermediate_size={moe_ffn}")
            values["shared_experts"] = shared // moe_ffn
            keys["shared_experts"] = "shared_expert_intermediate_size"
        return values, keys
    if t == "deepseek":
        freq = hf.get("moe_layer_freq", default=1)
        if freq != 1:
            raise hf.refuse("moe_layer_freq", freq, "only an MoE FFN in every layer after the "
                            "first first_k_dense_replace is modelled (moe_layer_freq = 1)")
        return ({"num_experts": hf.get("n_routed_experts"),
                 "experts_per_token": hf.get("num_experts_per_tok"),
                 "shared_experts": hf.get("n_shared_experts", default=0),
                 "moe_ffn": hf.get("moe_intermediate_size"),
                 "first_dense_layers": hf.get("first_k_dense_replace", default=0)},
                {"num_experts": "n_routed_experts", "experts_per_token": "num_experts_per_tok",
                 "shared_experts": "n_shared_experts", "moe_ffn": "moe_intermediate_size",
                 "first_dense_layers": "first_k_dense_replace"})
    return {}, {}


def _hf_name(data: Mapping[str, Any], source) -> str:
    """Last part of ``_name_or_path``, else the file stem (the folder for config.json)."""
    given = data.get("_name_or_path")
    if isinstance(given, str) and given.strip("/"):
        return given.rstrip("/").rsplit("/", 1)[-1]
    name = default_name(source)
    if name == "config" and source != "<dict>":
        return pathlib.Path(source).resolve().parent.name or name
    return name
