"""LLM presets: shapes from the public model configs, and what follows from them.

Only the architecture is stored (layers, heads, dims, FFN width, vocabulary); KV bytes per
token, weight bytes and FLOPs are derived. 16-bit weights and KV (PAM_SPEC §6).

Counting conventions (the tests write them out by hand):

* Linear parameters per layer: Q and O projections ``2 * hidden * Hq * D``, K and V
  ``2 * hidden * Hkv * D``; FFN ``3 * hidden * ffn`` for gated (SwiGLU) MLPs and
  ``2 * hidden * ffn`` for plain (GELU/ReLU) MLPs. Norms and biases are ignored (< 0.1%).
* Embedding ``vocab * hidden``, plus an equal LM head unless the embeddings are tied.
* FLOPs: 2 per multiply-accumulate. A decode step of one token costs ``2 * (linear params +
  LM head)`` for the FC layers plus ``4 * layers * Hq * D * context`` for attention (QK and
  PV). Prefill of ``n`` tokens costs ``n`` times the FC part plus causal attention
  ``4 * layers * Hq * D * n * (n + 1) / 2``.
"""

from __future__ import annotations

import dataclasses

from pamjax.errors import ConfigError, UnknownNameError


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder-only transformer.

    Fields:
      name: preset name.
      layers, q_heads, kv_heads, head_dim, hidden, ffn, vocab: public config values.
      gated_ffn: SwiGLU-style three-matrix MLP (LLaMA, Qwen) vs two-matrix (OPT).
      tied_embeddings: LM head shares the embedding matrix (OPT).
      bytes_per_value: bytes per weight and per KV element (2 for 16-bit).
    """

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    gated_ffn: bool = True
    tied_embeddings: bool = False
    bytes_per_value: int = 2

    def __post_init__(self):
        for f in ("layers", "q_heads", "kv_heads", "head_dim", "hidden", "ffn", "vocab",
                  "bytes_per_value"):
            value = getattr(self, f)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{self.name}.{f}", value, "must be a positive integer")
        if self.q_heads % self.kv_heads:
            raise ConfigError(f"{self.name}.kv_heads", self.kv_heads,
                              f"must divide q_heads={self.q_heads}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value

    @property
    def key_bytes_per_token(self) -> int:
        """K of one token over all layers, bytes (half of :attr:`kv_bytes_per_token`)."""
        return self.kv_bytes_per_token // 2

    @property
    def linear_params_per_layer(self) -> int:
        """Q, K, V, O and MLP weights of one layer, parameters (norms and biases ignored)."""
        attn = 2 * self.hidden * self.q_heads * self.head_dim
        attn += 2 * self.hidden * self.kv_heads * self.head_dim
        ffn = (3 if self.gated_ffn else 2) * self.hidden * self.ffn
        return attn + ffn

    @property
    def lm_head_params(self) -> int:
        """LM head weights, parameters (vocab x hidden; counted for FLOPs even when tied)."""
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters (layers, embedding and, if untied, the LM head)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.linear_params_per_layer + embeddings

    @property
    def weight_bytes(self) -> int:
        """All weights in memory, bytes = :attr:`params` x ``bytes_per_value``."""
        return self.params * self.bytes_per_value

    @property
    def fc_flops_per_token(self) -> int:
        """FLOPs of every linear layer plus the LM head for one token."""
        return 2 * (self.layers * self.linear_params_per_layer + self.lm_head_params)

    @property
    def streamed_weight_bytes(self) -> int:
        """Weight bytes a decode step reads (the embedding lookup reads one row only)."""
        return (self.layers * self.linear_params_per_layer + self.lm_head_params) \
            * self.bytes_per_value

    def attention_flops(self, context: float) -> float:
        """Attention FLOPs (QK and PV, all layers) for one query over ``context`` tokens.

        Args:
          context: attended tokens (a float, so a mean or a selected fraction works).

        Returns:
          FLOPs = 4 x layers x q_heads x head_dim x context.
        """
        return 4.0 * self.layers * self.q_heads * self.head_dim * context

    def decode_flops_per_token(self, context: float) -> float:
        """FLOPs to generate one token attending ``context`` tokens: FC layers + attention.

        Args:
          context: attended tokens.

        Returns:
          FLOPs = :attr:`fc_flops_per_token` + :meth:`attention_flops` (context).
        """
        return self.fc_flops_per_token + self.attention_flops(context)

    def prefill_flops(self, prompt_tokens: float) -> float:
        """FLOPs to prefill a prompt of ``prompt_tokens`` tokens (causal attention).

        Args:
          prompt_tokens: prompt length, tokens.

        Returns:
          FLOPs = n x FC FLOPs per token + attention over n (n + 1) / 2 query-key pairs.
        """
        n = prompt_tokens
        return self.fc_flops_per_token * n + self.attention_flops(n * (n + 1) / 2)


MODELS = {
    # [E] public configs (config.json of each release).
    "llama3-8b": Model("llama3-8b", layers=32, q_heads=32, kv_heads=8, head_dim=128,
                       hidden=4096, ffn=14336, vocab=128256),
    "qwen2.5-32b": Model("qwen2.5-32b", layers=64, q_heads=40, kv_heads=8, head_dim=128,
                         hidden=5120, ffn=27648, vocab=152064),
    "llama3-70b": Model("llama3-70b", layers=80, q_heads=64, kv_heads=8, head_dim=128,
                        hidden=8192, ffn=28672, vocab=128256),
    "opt-175b": Model("opt-175b", layers=96, q_heads=96, kv_heads=96, head_dim=128,
                      hidden=12288, ffn=49152, vocab=50272, gated_ffn=False,
                      tied_embeddings=True),
}
"""Model presets by name."""


def get_model(name: str) -> Model:
    """Look up a model preset.

    Args:
      name: a key of :data:`MODELS`. For a custom model, build a :class:`Model` or read one
        with :func:`pamjax.config_files.load_model_file`.

    Returns:
      The :class:`Model`.

    Raises:
      UnknownNameError: an unknown name.
    """
    if name not in MODELS:
        raise UnknownNameError("model", name, MODELS)
    return MODELS[name]
