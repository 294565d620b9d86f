"""LLM presets: shapes from the public model configs, and what follows from them.

Only the architecture is stored (layers, heads, dims, FFN widths, vocabulary, experts, byte
widths); KV bytes per token, weight bytes and FLOPs are derived. The presets are dense with
16-bit weights and KV (PAM_SPEC §6).

Counting conventions (the tests write them out by hand):

* Linear parameters per layer: Q and O projections ``2 * hidden * Hq * D``, K and V
  ``2 * hidden * Hkv * D``; an FFN of width ``w`` is ``3 * hidden * w`` for gated (SwiGLU)
  MLPs and ``2 * hidden * w`` for plain (GELU/ReLU) MLPs. Norms and biases are ignored
  (< 0.1%), as are learned position embeddings (OPT) and per-expert or shared-expert gating
  vectors (Qwen2-MoE's ``hidden x 1`` shared-expert gate).
* Embedding ``vocab * hidden``, plus an equal LM head unless the embeddings are tied.
* Mixture of experts (``num_experts > 0``): the first ``first_dense_layers`` layers have a
  dense FFN of width ``ffn``; every other layer has ``num_experts`` routed experts and
  ``shared_experts`` always-active experts, each an FFN of width ``moe_ffn`` (``ffn`` when
  ``moe_ffn`` is 0), and a router of ``hidden * num_experts`` weights. A token runs the
  router, its ``experts_per_token`` routed experts and the shared ones. Weights
  (:attr:`Model.params`, :attr:`Model.weight_bytes`) count every expert; FLOPs count the
  active ones only.
* FLOPs: 2 per multiply-accumulate. A decode step of one token costs ``2 * (active linear
  params + LM head)`` for the FC layers plus ``4 * layers * Hq * D * context`` for attention
  (QK and PV). Prefill of ``n`` tokens costs ``n`` times the FC part plus causal attention
  ``4 * layers * Hq * D * n * (n + 1) / 2``.
* Bytes: weights take ``weight_bytes_per_value`` bytes per parameter and the KV cache
  ``kv_bytes_per_value`` bytes per element (e.g. FP8 KV with BF16 weights).

Out of scope: where the experts live. Expert parallelism (experts spread over GPUs, the
all-to-all that routes tokens to them, load imbalance) is not modelled; the weights are
streamed as tensor parallelism streams a dense model's. Multi-head latent attention
(DeepSeek-V2/V3) is not modelled either: its compressed KV cache and attention FLOPs do not
follow the grouped-query formulas above.
"""

from __future__ import annotations

import dataclasses
import math

from pamjax.errors import ConfigError, UnknownNameError


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder-only transformer, dense or mixture-of-experts.

    Fields:
      name: preset name.
      layers, q_heads, kv_heads, head_dim, hidden, ffn, vocab: public config values
        (``ffn`` is the dense FFN width; in an MoE model, that of the leading dense layers).
      gated_ffn: SwiGLU-style three-matrix MLP (LLaMA, Qwen, Mixtral) vs two-matrix (OPT);
        the experts have the same form.
      tied_embeddings: LM head shares the embedding matrix (OPT).
      weight_bytes_per_value: bytes per weight (2 for 16-bit, 1 for 8-bit).
      kv_bytes_per_value: bytes per K or V element of the cache (2 for 16-bit, 1 for FP8).
      num_experts: routed experts per MoE layer; 0 for a dense model (the convention: never
        1), else at least 2.
      experts_per_token: routed experts each token runs (top-k); 0 for a dense model, else
        1..num_experts.
      shared_experts: always-active experts per MoE layer (DeepSeek, Qwen2-MoE), >= 0.
      moe_ffn: FFN width of one expert (routed or shared) when it differs from ``ffn``
        (DeepSeek/Qwen ``moe_intermediate_size``); 0 means ``ffn``.
      first_dense_layers: leading layers with a dense FFN instead of experts (DeepSeek's
        ``first_k_dense_replace``), 0..layers-1.

    The MoE fields must all be 0 in a dense model.
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
    weight_bytes_per_value: int = 2
    kv_bytes_per_value: int = 2
    num_experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    moe_ffn: int = 0
    first_dense_layers: int = 0

    def __post_init__(self):
        def bad(field, why):
            return ConfigError(f"{self.name}.{field}", getattr(self, field), why)

        for f in ("layers", "q_heads", "kv_heads", "head_dim", "hidden", "ffn", "vocab",
                  "weight_bytes_per_value", "kv_bytes_per_value"):
            value = getattr(self, f)
            if not _is_int(value) or value <= 0:
                raise bad(f, "must be a positive integer")
        moe_fields = ("num_experts", "experts_per_token", "shared_experts", "moe_ffn",
                      "first_dense_layers")
        for f in moe_fields:
            value = getattr(self, f)
            if not _is_int(value) or value < 0:
                raise bad(f, "must be an integer >= 0")
        if self.q_heads % self.kv_heads:
            raise bad("kv_heads", f"must divide q_heads={self.q_heads}")
        if self.num_experts == 0:
            for f in moe_fields[1:]:
                if getattr(self, f):
                    raise bad(f, "must be 0 in a dense model (num_experts = 0)")
            return
        if self.num_experts == 1:
            raise bad("num_experts", "must be 0 (dense) or >= 2 (one expert is a dense FFN)")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise bad("experts_per_token", f"must be in 1..num_experts={self.num_experts}")
        if self.first_dense_layers >= self.layers:
            raise bad("first_dense_layers", f"must be < layers={self.layers} (an MoE model "
                      f"needs at least one MoE layer)")

    # -- shape ----------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model (``num_experts > 0``)."""
        return self.num_experts > 0

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head (``q_heads / kv_heads``; 1 for multi-head attention)."""
        return self.q_heads // self.kv_heads

    @property
    def moe_layers(self) -> int:
        """Layers with experts: ``layers - first_dense_layers``, or 0 for a dense model."""
        return self.layers - self.first_dense_layers if self.is_moe else 0

    @property
    def expert_ffn(self) -> int:
        """FFN width of one expert: ``moe_ffn``, or ``ffn`` when ``moe_ffn`` is 0."""
        return self.moe_ffn or self.ffn

    # -- KV -------------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_value

    @property
    def key_bytes_per_token(self) -> int:
        """K of one token over all layers, bytes (half of :attr:`kv_bytes_per_token`)."""
        return self.kv_bytes_per_token // 2

    # -- parameters -----------------------------------------------------------------------

    @property
    def attention_params_per_layer(self) -> int:
        """Q, K, V and O projections of one layer, parameters."""
        return 2 * self.hidden * (self.q_heads + self.kv_heads) * self.head_dim

    @property
    def dense_ffn_params(self) -> int:
        """The FFN of one dense layer (width ``ffn``), parameters."""
        return (3 if self.gated_ffn else 2) * self.hidden * self.ffn

    @property
    def expert_params(self) -> int:
        """One expert, routed or shared (an FFN of width :attr:`expert_ffn`), parameters."""
        return (3 if self.gated_ffn else 2) * self.hidden * self.expert_ffn

    @property
    def router_params(self) -> int:
        """The router of one MoE layer (``hidden x num_experts``; 0 when dense), parameters."""
        return self.hidden * self.num_experts

    @property
    def routed_expert_params(self) -> int:
        """Every routed expert of every MoE layer, parameters (0 for a dense model)."""
        return self.moe_layers * self.num_experts * self.expert_params

    def _linear_params(self, routed_experts: float) -> float:
        """Linear parameters of all layers with ``routed_experts`` routed experts per MoE
        layer (attention, dense FFNs, shared experts and routers always included)."""
        dense = (self.layers - self.moe_layers) * self.dense_ffn_params
        moe = self.moe_layers * (self.router_params
                                 + (self.shared_experts + routed_experts) * self.expert_params)
        return self.layers * self.attention_params_per_layer + dense + moe

    @property
    def linear_params(self) -> int:
        """Linear weights of all layers, every expert included, parameters (norms and
        biases ignored)."""
        return self._linear_params(self.num_experts)

    @property
    def active_linear_params(self) -> int:
        """Linear weights one token runs through: attention, dense FFNs, and in each MoE
        layer the router, ``experts_per_token`` routed and all shared experts, parameters.
        Equal to :attr:`linear_params` for a dense model."""
        return self._linear_params(self.experts_per_token)

    @property
    def lm_head_params(self) -> int:
        """LM head weights, parameters (vocab x hidden; counted for FLOPs even when tied)."""
        return self.vocab * self.hidden

    @property
    def embedding_params(self) -> int:
        """Embedding and, if untied, LM head weights, parameters."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        """All parameters (layers with every expert, embedding and, if untied, the LM head)."""
        return self.linear_params + self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: :attr:`active_linear_params` plus the embeddings as in
        :attr:`params` (the convention of published "active" counts, e.g. Mixtral's 12.9B).
        Equal to :attr:`params` for a dense model."""
        return self.active_linear_params + self.embedding_params

    # -- bytes and FLOPs ------------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        """All weights in memory, bytes = :attr:`params` x ``weight_bytes_per_value``."""
        return self.params * self.weight_bytes_per_value

    @property
    def fc_flops_per_token(self) -> int:
        """FLOPs of the linear layers one token runs (active experts only) plus the LM head."""
        return 2 * (self.active_linear_params + self.lm_head_params)

    @property
    def streamed_weight_bytes(self) -> int:
        """Weight bytes a decode step reads (the embedding lookup reads one row only).

        Dense model: every linear weight and the LM head, whatever the batch. MoE model:
        every expert is counted, the large-batch limit of
        :meth:`streamed_weight_bytes_for_batch` (a step of few tokens reads fewer experts).
        """
        return (self.linear_params + self.lm_head_params) * self.weight_bytes_per_value

    def expected_distinct_experts(self, tokens):
        """Expected routed experts a batch of ``tokens`` tokens touches in one MoE layer.

        Uniform routing is assumed: each token picks ``experts_per_token`` of the
        ``num_experts`` experts, so an expert is missed by one token with probability
        ``1 - k / E`` and by all of them with ``(1 - k / E) ** tokens`` (a token's k picks are
        distinct, and tokens route independently). Real routers are skewed, which touches
        fewer distinct experts than this.

        Args:
          tokens: tokens in the step (float or array, >= 0; a mean batch works).

        Returns:
          ``E * (1 - (1 - k / E) ** tokens)`` experts (float; 0 for a dense model): k at one
          token, tending to E as the batch grows.
        """
        _check_tokens(tokens)
        if not self.is_moe:
            return 0.0 * tokens
        miss = 1.0 - self.experts_per_token / self.num_experts
        return self.num_experts * (1.0 - miss ** tokens)

    def streamed_weight_bytes_for_batch(self, tokens):
        """Weight bytes a decode step of ``tokens`` tokens reads, counting the experts it
        touches.

        Every non-expert weight (attention, dense FFNs, routers, shared experts, LM head) is
        read once, plus in each MoE layer :meth:`expected_distinct_experts` (``tokens``)
        routed experts, the expectation under uniform routing. For a dense model this is
        :attr:`streamed_weight_bytes` whatever the batch; for an MoE model it rises from
        the active weights (one token) to :attr:`streamed_weight_bytes` (every expert).

        Args:
          tokens: tokens decoded in the step, e.g. the batch (float or array, >= 0).

        Returns:
          bytes (float).
        """
        routed = self.moe_layers * self.expected_distinct_experts(tokens) * self.expert_params
        return (self._linear_params(0) + self.lm_head_params + routed) \
            * self.weight_bytes_per_value

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


def _is_int(value) -> bool:
    """An integer that is not a bool (True would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tokens(tokens) -> None:
    """Refuse a negative or non-finite Python number (arrays pass through unchecked, so a
    traced value is never branched on)."""
    if isinstance(tokens, (int, float)) and not (math.isfinite(tokens) and tokens >= 0):
        raise ConfigError("tokens", tokens, "must be a finite number >= 0")


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
