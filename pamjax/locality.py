"""Access model with context locality, the retrieval selector and PAM's importance factor.

The simulator does not run a language model. It needs, per decode step, which KV units a
retrieval-style selector (Double Sparsity) attends and how much attention mass each carries.
Each unit has a latent log-importance ``z`` and its attention logit at step j is

    logit = z + sink_bonus * [unit holds one of the first sink_tokens tokens]
              + recency_bonus * exp(-age / recency_tokens)

where ``age`` is how many tokens ago the unit's last token was written. ``z`` starts as
``sigma * N(0, 1)`` and drifts as an AR(1) process, ``z <- rho z + sqrt(1 - rho^2) sigma e``,
so importance persists but decays. Attention mass is the softmax of the logits over the
request (a unit of ``n`` tokens counts ``n`` times). The selector attends the highest-logit
units until ``select_fraction`` of the request's tokens are covered; dense attention is
``select_fraction = 1``.

Defaults and what they are calibrated against (PAM_SPEC §5; the emergent statistics are
*measured* by the engine and reported, not forced):

=================  =======  ===============================================================
parameter          default  calibration
=================  =======  ===============================================================
sigma              2.5      log-normal weights with sigma 2.5 put Phi(2.5 - 1.15) = 91% of
                            the mass on the top 1/8 of tokens (Keyformer: ~90% on a small
                            subset); ~91% of entries fall below 1% of the row max at 1K
                            tokens (H2O: over 95%)
persistence        0.995    per-step AR(1) coefficient: the innovation is 10% of sigma;
                            measured, a unit attended at one step is attended at the next
                            with probability ~0.94 (``pamjax simulate`` prints it;
                            Scissorhands reports over 95% persistence of important tokens)
sink_tokens        4        StreamingLLM's attention sinks
sink_bonus         8.0      keeps the sinks selected regardless of content
recency_bonus      6.0      the most recent tokens are selected almost surely, so selected
recency_tokens     32.0     tokens cluster near the current position (local window)
select_fraction    1/8      Double Sparsity at 8x compression (the PAM evaluation)
ema_lambda         0.6      PAM's importance factor, I = lambda S + (1 - lambda) I
=================  =======  ===============================================================

A flat regime for stress tests (MagicPIG's counter-example) is ``sigma`` near 0 and no
bonuses. Recorded per-step scores from a user's own model replace the synthetic logits
(see :func:`load_recorded_scores`).

Random numbers come from a counter-based integer hash of (seed, request, unit, step): cheap
per unit, independent of slot assignment, and deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
from jax import lax

from pamjax.errors import ConfigError, TraceFormatError


@dataclasses.dataclass(frozen=True)
class AccessModel:
    """Access-model parameters (host-side; copied into SimParams). Defaults: module docstring.

    Fields:
      sigma: standard deviation of a unit's latent log-importance, logit units (>= 0).
      persistence: AR(1) coefficient of the latent per decode step, in [0, 1].
      sink_tokens: the first this many tokens of a request are attention sinks, tokens.
      sink_bonus: logit added to a unit holding a sink token (>= 0).
      recency_bonus: logit added to the newest unit, decaying with its age (>= 0).
      recency_tokens: e-folding length of the recency bonus, tokens (> 0).
      select_fraction: share of a request's tokens a sparse selector attends, in (0, 1].
      ema_lambda: lambda of PAM's importance EMA, in (0, 1].
    """

    sigma: float = 2.5
    persistence: float = 0.995
    sink_tokens: float = 4.0
    sink_bonus: float = 8.0
    recency_bonus: float = 6.0
    recency_tokens: float = 32.0
    select_fraction: float = 0.125
    ema_lambda: float = 0.6

    def __post_init__(self):
        for f in ("sigma", "sink_tokens", "sink_bonus", "recency_bonus"):
            if not np.isfinite(getattr(self, f)) or getattr(self, f) < 0:
                raise ConfigError(f"access.{f}", getattr(self, f), "must be finite and >= 0")
        if not 0 <= self.persistence <= 1:
            raise ConfigError("access.persistence", self.persistence, "must be in [0, 1]")
        if not self.recency_tokens > 0:
            raise ConfigError("access.recency_tokens", self.recency_tokens, "must be > 0")
        if not 0 < self.select_fraction <= 1:
            raise ConfigError("access.select_fraction", self.select_fraction,
                              "must be in (0, 1]")
        if not 0 < self.ema_lambda <= 1:
            raise ConfigError("access.ema_lambda", self.ema_lambda, "must be in (0, 1]")

    def dense(self) -> AccessModel:
        """The same access model with dense attention (``select_fraction = 1``)."""
        return dataclasses.replace(self, select_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers
# ---------------------------------------------------------------------------------------------

def _mix(x):
    """lowbias32 integer hash (uint32 -> uint32), a good avalanche for counters."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def unit_hash(seed, request, unit, salt):
    """uint32 hash of (seed, request id, unit index, salt), broadcasting.

    Args:
      seed: int scalar; request: int32 request ids; unit: int32 unit indices; salt: int32
        (0 for the initial draw, step + 1 for the innovation of a step). Any shapes that
        broadcast, e.g. request [R, 1] and unit [U].

    Returns:
      uint32 array of the broadcast shape.
    """
    h = _mix(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32(0x9E3779B9))
    h = _mix(h ^ jnp.asarray(request, jnp.int32).astype(jnp.uint32))
    h = _mix(h ^ (jnp.asarray(unit, jnp.int32).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))
    return _mix(h ^ (jnp.asarray(salt, jnp.int32).astype(jnp.uint32) * jnp.uint32(0xC2B2AE35)))


def normal_from_hash(h):
    """Standard normal via Box-Muller from one uint32 hash (two 16-bit uniforms).

    Args:
      h: uint32 array, any shape.

    Returns:
      float32 array of the same shape, approximately N(0, 1).
    """
    u1 = ((h >> 16).astype(jnp.float32) + 0.5) / 65536.0
    u2 = ((h & jnp.uint32(0xFFFF)).astype(jnp.float32) + 0.5) / 65536.0
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def small_normal_from_hash(h):
    """Approximately standard normal (Irwin-Hall sum of the hash's 4 bytes), for innovations.

    Four byte-uniforms have variance 4 * (256^2 - 1) / 12; cheaper than Box-Muller and
    exact in the first two moments, which is all an AR(1) innovation needs.

    Args:
      h: uint32 array, any shape.

    Returns:
      float32 array of the same shape, mean 0 and variance 1.
    """
    total = ((h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)).astype(jnp.float32)
    return (total - 510.0) / np.float32(np.sqrt(4 * (256.0**2 - 1) / 12))


# ---------------------------------------------------------------------------------------------
# Per-step access model. Shapes: [R, U] for units, [R] for requests.
# ---------------------------------------------------------------------------------------------

def initial_latent(params, seed, request, unit):
    """Latent log-importance of new units: sigma * N(0, 1).

    Args:
      params: SimParams or AccessModel (uses ``sigma``); seed: int scalar;
      request: int32 [R, 1] request ids; unit: int32 [U] unit indices (any broadcast).

    Returns:
      f32 [R, U] latent log-importance, logit units.
    """
    return params.sigma * normal_from_hash(unit_hash(seed, request, unit, 0))


def evolve_latent(params, latent, seed, request, unit, step):
    """One AR(1) step of the latent log-importance (persistence with slow drift).

    Args:
      params: uses ``persistence`` and ``sigma``; latent: f32 [R, U]; seed: int scalar;
      request: int32 [R, 1]; unit: int32 [U]; step: int32 scalar decode step.

    Returns:
      f32 [R, U], ``rho * latent + sqrt(1 - rho^2) * sigma * noise``; the stationary
      standard deviation stays ``sigma``.
    """
    rho = params.persistence
    noise = small_normal_from_hash(unit_hash(seed, request, unit, step + 1))
    return rho * latent + jnp.sqrt(1.0 - rho * rho) * params.sigma * noise


def unit_tokens(context, page_size: int, num_units: int):
    """Tokens held by each unit of ``page_size`` tokens.

    Args:
      context: int32 [R] context length of each request, tokens; page_size: tokens per
      unit; num_units: U, units tracked per request.

    Returns:
      int32 [R, U] tokens in each unit, in [0, page_size] (0 = the unit does not exist).
    """
    start = jnp.arange(num_units, dtype=jnp.int32) * page_size
    return jnp.clip(context[:, None] - start[None, :], 0, page_size)


def logits(params, latent, context, page_size: int):
    """Attention logits of every unit: latent + sink bonus + recency bonus.

    Args:
      params: uses ``sink_tokens``, ``sink_bonus``, ``recency_bonus``, ``recency_tokens``;
      latent: f32 [R, U]; context: int32 [R] tokens; page_size: tokens per unit.

    Returns:
      f32 [R, U] logits (meaningless where the unit is empty).
    """
    num_units = latent.shape[-1]
    start = jnp.arange(num_units, dtype=jnp.float32) * page_size
    last = jnp.minimum(start + page_size, context[:, None].astype(jnp.float32)) - 1.0
    age = jnp.maximum(context[:, None].astype(jnp.float32) - 1.0 - last, 0.0)
    sink = (start < params.sink_tokens).astype(jnp.float32)[None, :]
    recency = jnp.exp(-age / params.recency_tokens)
    return latent + params.sink_bonus * sink + params.recency_bonus * recency


def attention_mass(unit_logits, tokens):
    """Share of the request's attention mass on each unit (softmax, a unit counted per token).

    Args:
      unit_logits: f32 [R, U]; tokens: int32 [R, U] tokens per unit (0 = no unit).

    Returns:
      f32 [R, U] in [0, 1]; each row with a unit sums to 1, empty rows are all 0.
    """
    present = tokens > 0
    weighted = jnp.where(present, unit_logits + jnp.log(jnp.maximum(tokens, 1)), -jnp.inf)
    peak = jnp.max(weighted, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    p = jnp.where(present, jnp.exp(weighted - peak), 0.0)
    return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def threshold_bracket(values, weights, target, iters: int):
    """Per-row bracket (lo, hi) with sum(w[v >= lo]) >= target > sum(w[v >= hi]).

    A fixed-iteration bisection: no sort (XLA's CPU sort costs ~150 ns per element), so each
    iteration is one masked sum over [R, U]. Rows whose total weight is below ``target``
    keep the lowest ``lo`` (everything counts).

    Args:
      values: f32 [R, U]; weights: f32 [R, U], 0 where a unit does not count;
      target: f32 [R]; iters: bisection iterations (bracket width = span / 2**iters).

    Returns:
      (lo, hi) f32 [R] each.
    """
    present = weights > 0
    lo = jnp.min(jnp.where(present, values, jnp.inf), axis=-1) - 1.0
    hi = jnp.max(jnp.where(present, values, -jnp.inf), axis=-1) + 1.0
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    hi = jnp.where(jnp.isfinite(hi), hi, 1.0)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        covered = jnp.sum(jnp.where(values >= mid[:, None], weights, 0.0), axis=-1)
        ok = covered >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # Unrolled: the iterations are tiny, and a rolled loop pays per-iteration thunk overhead.
    return lax.fori_loop(0, iters, body, (lo, hi), unroll=True)


def top_count(values, present, count, iters: int):
    """Exactly ``count`` present units per row with the highest values, ties by position.

    Units at or above the bracket's upper end are taken; the units inside the bracket (equal
    or nearly equal values) are taken in position order until ``count`` is reached.

    Args:
      values: f32 [R, U]; present: bool [R, U]; count: i32 [R] (clipped to the present
        count); iters: bisection iterations.

    Returns:
      bool [R, U].
    """
    lo, hi = threshold_bracket(values, present.astype(jnp.float32),
                               count.astype(jnp.float32), iters)
    sure = present & (values >= hi[:, None])
    band = present & ~sure & (values >= lo[:, None])
    missing = count - sure.sum(-1)
    band_rank = jnp.cumsum(band, axis=-1) - 1
    return sure | (band & (band_rank < missing[:, None]))


def select(params, unit_logits, tokens, iters: int):
    """Retrieval selector: highest-logit units covering select_fraction of the tokens.

    Units clearly above the bisection bracket are taken; units inside it (ties, e.g. equal
    recorded scores) are taken in position order until the token target is covered.

    Args:
      params: uses ``select_fraction``; unit_logits: f32 [R, U]; tokens: i32 [R, U]
      tokens per unit (0 = no unit); iters: bisection iterations (static).

    Returns:
      bool [R, U], the attended units (every unit when select_fraction >= 1).
    """
    weights = tokens.astype(jnp.float32)
    present = tokens > 0
    target = jnp.maximum(jnp.ceil(params.select_fraction * weights.sum(-1)), 1.0)
    lo, hi = threshold_bracket(unit_logits, weights, target, iters)
    sure = present & (unit_logits >= hi[:, None])
    band = present & ~sure & (unit_logits >= lo[:, None])
    missing = target - jnp.sum(jnp.where(sure, weights, 0.0), axis=-1)
    band_weight = jnp.where(band, weights, 0.0)

    def in_position_order(band_weight):
        band_before = jnp.cumsum(band_weight, axis=-1) - band_weight
        return band & (band_before < missing[:, None])

    # Usually the bracket is so narrow that the whole band fits the token target; the
    # prefix sum (a costly op on CPU) is only needed where it does not.
    overfull = jnp.any(jnp.sum(band_weight, axis=-1) > missing)
    chosen = sure | lax.cond(overfull, in_position_order, lambda _: band, band_weight)
    return present & ((params.select_fraction >= 1.0) | chosen)


def update_importance(params, importance, mass, present):
    """PAM importance factor EMA, I = lambda * S + (1 - lambda) * I, on present units.

    Args:
      params: uses ``ema_lambda``; importance: f32 [R, U] previous I; mass: f32 [R, U] this
      step's score S (attention mass share); present: bool [R, U] units that exist.

    Returns:
      f32 [R, U] new importance, 0 where a unit is absent.
    """
    lam = params.ema_lambda
    return jnp.where(present, lam * mass + (1.0 - lam) * importance, 0.0)


def load_recorded_scores(path) -> np.ndarray:
    """Load recorded per-step attention log-scores from a user's own model.

    File format: a ``.npy`` file, or a ``.npz`` file with array ``scores``, of shape
    [steps, tokens] (float), the attention logit of every token position at each decode step
    (positions not yet generated are ignored). In the engine, a request at its k-th decode
    step uses row ``k mod steps`` and its units' logit is the largest logit of their tokens.

    Args:
      path: the ``.npy`` / ``.npz`` file.

    Returns:
      float32 [S, N] logits, S steps x N token positions, all finite.

    Raises:
      TraceFormatError: missing or unreadable file, wrong shape, or non-finite values.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise TraceFormatError(path, 0, "file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        scores = loaded["scores"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (ValueError, OSError, KeyError, EOFError) as exc:
        raise TraceFormatError(path, 0, f"not a .npy/.npz with array 'scores' ({exc})") from None
    if scores.ndim != 2 or min(scores.shape) < 1:
        raise TraceFormatError(path, 0, f"scores must be 2-D [steps, tokens], got {scores.shape}")
    if scores.dtype.kind not in "biuf":
        raise TraceFormatError(path, 0, f"scores must be numbers, got dtype {scores.dtype}")
    if not np.all(np.isfinite(scores)):
        raise TraceFormatError(path, 0, "scores contain NaN or infinity")
    return scores.astype(np.float32)


def recorded_unit_logits(scores: np.ndarray, page_size: int) -> np.ndarray:
    """Coarsen recorded token logits to unit logits: the largest logit of each unit's tokens.

    Args:
      scores: float32 [S, N] recorded logits (:func:`load_recorded_scores`); page_size:
        tokens per unit.

    Returns:
      float32 [S, ceil(N / page_size)] unit logits.
    """
    steps, tokens = scores.shape
    units = -(-tokens // page_size)
    padded = np.full((steps, units * page_size), -np.inf, np.float32)
    padded[:, :tokens] = scores
    return padded.reshape(steps, units, page_size).max(-1)
