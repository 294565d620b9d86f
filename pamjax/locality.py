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
from flax import struct
from jax import lax

from pamjax._numerics import (
    normal_from_hash,
    small_normal_from_hash,
    threshold_bracket,
    unit_hash,
)
from pamjax.active_rows import narrow_columns, on_active_rows
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


def logits(params, latent, context, page_size: int, xp=jnp):
    """Attention logits of every unit: latent + sink bonus + recency bonus.

    The one definition of the access model's logit: the engine, the reference, the
    relaxation and the host-side x:y calibration (systems.calibrate_targets, with
    ``xp=numpy`` in float64) all call it.

    Args:
      params: uses ``sink_tokens``, ``sink_bonus``, ``recency_bonus``, ``recency_tokens``;
      latent: f32 [R, U]; context: int32 [R] tokens; page_size: tokens per unit;
      xp: the array module, ``jax.numpy`` (float32) or ``numpy`` (float64).

    Returns:
      [R, U] logits (meaningless where the unit is empty).
    """
    dtype = np.float64 if xp is np else jnp.float32
    num_units = latent.shape[-1]
    start = xp.arange(num_units, dtype=dtype) * page_size
    last = xp.minimum(start + page_size, context[:, None].astype(dtype)) - 1.0
    age = xp.maximum(context[:, None].astype(dtype) - 1.0 - last, 0.0)
    sink = (start < params.sink_tokens).astype(dtype)[None, :]
    recency = xp.exp(-age / params.recency_tokens)
    return latent + params.sink_bonus * sink + params.recency_bonus * recency


def unit_logits(config, params, latent, context, generated, recorded):
    """The logits the engine ranks and weighs units by: the synthetic access model's
    (:func:`logits`), or the recorded scores' row of each request's decode step when
    ``config.recorded_steps`` > 0 (row ``(generated - 1) mod steps``).

    Args:
      config: EngineConfig; params: SimParams; latent: f32 [R, U]; context, generated: i32
        [R] tokens in the KV and output tokens so far; recorded: f32 [S, U] or None.

    Returns:
      f32 [R, U] (U: the latents' width, which may be below the recorded scores').
    """
    if config.recorded_steps:
        row = (jnp.maximum(generated - 1, 0) % config.recorded_steps)
        return recorded[row][:, :latent.shape[-1]]
    return logits(params, latent, context, config.page_size)


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


@struct.dataclass
class Attention:
    """What the step's decode attends (attend); [R, U] unless marked.

    tokens i32: tokens per unit of the decoding requests (0 elsewhere); present bool: their
    units; mass f32: each unit's share of its request's attention mass; selected bool: the
    units the selector attends; selected_units i32 []: how many; persisted_units i32 []:
    selected units also selected at the previous step; previously_selected_units i32 []:
    units of decoding requests selected at the previous step; selected_mass f32 []:
    attention mass covered by the selections, summed over requests.
    """

    tokens: jnp.ndarray
    present: jnp.ndarray
    mass: jnp.ndarray
    selected: jnp.ndarray
    selected_units: jnp.ndarray
    persisted_units: jnp.ndarray
    previously_selected_units: jnp.ndarray
    selected_mass: jnp.ndarray


def attend(config, params, state, decoding, token, recorded):
    """The access model's step for every decoding request: latents drift, the selector
    picks the attended units, PAM's importance EMA absorbs this step's attention mass.

    Args:
      config: EngineConfig; params: SimParams; state: EngineState after new units;
      decoding: bool [R]; token: batching.DecodeToken (``context`` after the decode,
      ``column`` of the unit opened this step); recorded: recorded unit logits or None.

    Returns:
      (EngineState with ``unit_latent`` and ``unit_importance`` updated, Attention).
    """
    page = config.page_size
    # Column indices as a constant sliced to the rows' width: an iota built inside the
    # phase compiled the mass sums in another float32 order (measured: last-bit changes
    # that grew into another trajectory over thousands of steps).
    all_units = jnp.arange(config.units_per_slot, dtype=jnp.int32)

    def per_request(rows):
        # Only row-wise work, on unit tables of any width (nothing changes past a row's
        # units): on_active_rows may run it on the decoding rows alone, on narrow columns.
        latent, importance, previously, request, context, column, generated, dec = rows
        n_units = latent.shape[-1]
        unit_idx = all_units[:n_units]
        dec2 = dec[:, None]
        tokens = jnp.where(dec2, unit_tokens(context, page, n_units), 0)
        present = tokens > 0
        evolved = evolve_latent(params, latent, state.seed, jnp.maximum(request, 0)[:, None],
                                unit_idx[None, :], state.step)
        # A unit opened this step keeps its fresh draw; older ones drift.
        fresh = unit_idx[None, :] == column[:, None]
        latent = jnp.where(dec2 & present & ~fresh, evolved, latent)
        the_logits = unit_logits(config, params, latent, context, generated, recorded)
        mass = attention_mass(the_logits, tokens)
        # Dense systems attend every unit: the selector's bisection is skipped for them.
        selected = lax.cond(params.select_fraction >= 1.0, lambda: present,
                            lambda: select(params, the_logits, tokens,
                                           config.bisection_iters) & present)
        importance = jnp.where(dec2, update_importance(params, importance, mass, present),
                               importance)
        selected_mass = jnp.sum(jnp.where(selected, mass, 0.0), -1)
        previously = previously & dec2
        counts = jnp.stack([jnp.sum(x, -1, dtype=jnp.int32)
                            for x in (selected, selected & previously, previously)], -1)
        return latent, importance, tokens, present, mass, selected, selected_mass, counts

    rows = (state.unit_latent, state.unit_importance, state.unit_selected, state.slot_request,
            token.context, token.column, state.slot_generated, decoding)
    if config.skip_idle:
        # A row that does not decode has no tokens: nothing present, attended or moved.
        idle = jnp.zeros(state.unit_latent.shape, bool)
        r_slots = idle.shape[0]
        inactive = (state.unit_latent, state.unit_importance, idle.astype(jnp.int32), idle,
                    idle.astype(jnp.float32), idle, jnp.zeros(r_slots),
                    jnp.zeros((r_slots, 3), jnp.int32))
        columns = narrow_columns(config, token.context, (True,) * 3 + (False,) * 5,
                                 (True,) * 6 + (False,) * 2)
        out = on_active_rows(decoding, per_request, rows, inactive, columns)
    else:
        out = per_request(rows)
    latent, importance, tokens, present, mass, selected, selected_mass, counts = out
    # Counted per request first (a previous selection lies within the request's units):
    # integers, the same totals whichever rows and columns the phase ran on.
    selected_units, persisted_units, previously_selected_units = jnp.sum(counts, 0)
    attended = Attention(
        tokens=tokens, present=present, mass=mass, selected=selected,
        selected_units=selected_units, persisted_units=persisted_units,
        previously_selected_units=previously_selected_units,
        # Summed per request first: the same float32 order whichever rows the phase ran on.
        selected_mass=jnp.sum(selected_mass))
    return state.replace(unit_latent=latent, unit_importance=importance), attended


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


# ---------------------------------------------------------------------------------------------
# The access model on its own: emergent locality statistics
# ---------------------------------------------------------------------------------------------

LAYER_GROUP_CORRELATION = 0.8
"""[D] Correlation of the latent log-importance of one token between two layer groups.

The engine draws one selection per token for all layers (one latent per unit). Real
retrieval selectors (Double Sparsity) pick per layer and head, and layers agree only in
part on which tokens matter: attention sinks and the recent window are shared by all, the
content-selected heavy hitters differ. With G layer groups, each group's latent is
``sqrt(c) z_shared + sqrt(1 - c) z_group`` (each term an AR(1) process with the access
model's persistence and spread), so any two groups' latents correlate with coefficient c;
the sink and recency bonuses are common. c = 0.8 is a pamjax assumption (no published
figure pins it down); :func:`selection_statistics` reports how much the union of what the
groups select exceeds one selection, for any c, so its consequence can be weighed.
"""


def selection_statistics(access: AccessModel, *, context: int = 2048, steps: int = 256,
                         requests: int = 8, lags=(1, 10, 100),
                         hbm_share: float | None = None,
                         layer_groups: int = 4,
                         group_correlation: float = LAYER_GROUP_CORRELATION,
                         seed: int = 0) -> dict:
    """Emergent locality of the access model, measured on its own (no placement, no cost).

    ``requests`` requests of ``context`` tokens evolve for ``steps`` decode steps (the
    context held fixed, so every statistic is stationary); each step the selector attends
    the top ``select_fraction`` of the tokens and PAM's importance EMA absorbs the mass.

    Args:
      access: the access model.
      context, steps, requests: size of the experiment (tokens, decode steps, requests).
      lags: step distances at which to measure the selection overlap.
      hbm_share: fraction of a request's tokens an HBM tier holds, ranked by the EMA
        (default: the selector's fraction, an HBM just large enough for one selection).
      layer_groups, group_correlation: layer groups for the union measurement (see
        LAYER_GROUP_CORRELATION); 1 group = the engine's model.
      seed: random seed.

    Returns:
      {"overlap": {lag: fraction of the tokens selected ``lag`` steps ago still selected},
       "hbm_hit_rate": fraction of the tokens selected at a step that were in the top
         ``hbm_share`` by the importance EMA of the step before (what an HBM tier placed by
         the EMA serves),
       "selected_mass_share": mean attention mass the selection covers,
       "layer_group_union": tokens selected by at least one of the groups / tokens one
         group selects (1 when the groups agree, ``layer_groups`` at most)}.
    """
    hbm_share = access.select_fraction if hbm_share is None else hbm_share
    if not 0 < hbm_share < 1:
        raise ConfigError("hbm_share", hbm_share, "must be in (0, 1)")
    if not 0 <= group_correlation <= 1:
        raise ConfigError("group_correlation", group_correlation, "must be in [0, 1]")
    for field, value in (("context", context), ("steps", steps), ("requests", requests),
                         ("layer_groups", layer_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(field, value, "must be an integer >= 1")
    lags = tuple(int(lag) for lag in lags)
    if not lags or min(lags) < 1 or max(lags) >= steps:
        raise ConfigError("lags", lags, f"need lags in [1, steps = {steps})")
    stats = _selection_scan(access, context, steps, requests, max(lags), hbm_share,
                            layer_groups, float(group_correlation), seed)
    overlap, hits, mass, union = (np.asarray(x, np.float64) for x in stats)
    return {"overlap": {lag: float(overlap[lag - 1]) for lag in lags},
            "hbm_hit_rate": float(hits), "selected_mass_share": float(mass),
            "layer_group_union": float(union)}


def _selection_scan(access, context, steps, requests, max_lag, hbm_share, groups,
                    correlation, seed):
    import jax

    tokens = jnp.ones((requests, context), jnp.int32)
    ctx = jnp.full((requests,), context, jnp.int32)
    row = jnp.arange(requests, dtype=jnp.int32)[:, None, None]
    unit = jnp.arange(context, dtype=jnp.int32)[None, None, :]
    group = jnp.arange(groups + 1, dtype=jnp.int32)[None, :, None]  # 0 = shared
    salt = group * context  # distinct counters per group
    latent = initial_latent(access, seed, row, unit + salt * 7919)  # [R, G + 1, C]
    k = max(1, int(np.ceil(access.select_fraction * context)))
    top_hbm = max(1, round(hbm_share * context))

    def mix(z):
        return np.sqrt(correlation) * z[:, :1] + np.sqrt(1.0 - correlation) * z[:, 1:]

    def pick(z):  # [R, G, C] logits -> selected bool, mass of group 0
        logit = jnp.stack([logits(access, z[:, g], ctx, 1) for g in range(z.shape[1])], 1)
        threshold = lax.top_k(logit, k)[0][..., -1:]
        return logit >= threshold, attention_mass(logit[:, 0], tokens)

    def body(carry, j):
        latent, importance, history = carry
        latent = evolve_latent(access, latent, seed, row, unit + salt * 7919, j)
        selected, mass = pick(mix(latent))
        first = selected[:, 0]
        hbm_threshold = lax.top_k(importance, top_hbm)[0][:, -1:]
        hits = jnp.sum(first & (importance >= hbm_threshold)) / jnp.sum(first)
        overlap = jnp.stack([jnp.sum(first & history[lag]) / jnp.maximum(
            jnp.sum(history[lag]), 1) for lag in range(max_lag)])
        valid = j >= jnp.arange(1, max_lag + 1)
        importance = access.ema_lambda * mass + (1.0 - access.ema_lambda) * importance
        union = jnp.sum(jnp.any(selected, 1)) / jnp.sum(first)
        history = jnp.concatenate([first[None], history[:-1]])
        return (latent, importance, history), (overlap, valid, hits, jnp.sum(
            jnp.where(first, mass, 0.0)) / requests, union)

    history = jnp.zeros((max_lag, requests, context), bool)
    importance = jnp.zeros((requests, context), jnp.float32)
    _, out = jax.jit(lambda c: lax.scan(body, c, jnp.arange(steps)))(
        (latent, importance, history))
    overlap, valid, hits, mass, union = out
    overlap = jnp.sum(jnp.where(valid, overlap, 0.0), 0) / jnp.sum(valid, 0)
    return overlap, jnp.mean(hits[1:]), jnp.mean(mass), jnp.mean(union)
