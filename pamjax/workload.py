"""Request workloads: the request table and seeded synthetic datasets (PAM_SPEC §6).

A :class:`Workload` is a host-side (numpy) table of requests sorted by arrival: when each request
arrives, how many prompt tokens it brings and how many output tokens it will generate. It is
padded to fixed shapes before it reaches the jitted engine; nothing here touches JAX.

Synthetic datasets
------------------
The publication gives only means and ranges [P]: the three online dialogue sets average 183 input
/ 299 output tokens over the three, with an average context (prompt + output) of 534 tokens for
ShareGPT and 738 for WildChat; the offline long-text sets have sequences of 1,500-8,000 tokens.
Everything else below is a pamjax default [D].

Shape [D]: every length is an independent log-normal draw clipped to ``[min, max]`` and rounded to
whole tokens. Request lengths in serving traces are right-skewed and heavy-tailed (a few very long
prompts or answers dominate KV memory), which a log-normal captures with one shape parameter;
clipping keeps the tail inside what a serving front-end would accept. ``sigma`` is the standard
deviation of the underlying normal (dimensionless). The location ``mu`` is not stored: it is solved
(bisection on the closed-form mean of a clipped log-normal) so that the *clipped* distribution has
exactly the stated mean; the table's means are the true means, not pre-clipping values. Prompt and
output lengths are drawn independently.

Split of the online means [D]: HumanEval prompts are a function signature plus docstring and its
completions are short function bodies, so it takes 130 / 44; ShareGPT keeps a prompt mean close to
the ~160 tokens serving studies report for it; WildChat gets the remaining prompt tokens. Outputs
then follow from the context targets, and the three-set averages come out at exactly 183 / 299.
The offline bounds satisfy ``prompt_min + output_min = 1500`` and ``prompt_max + output_max =
8000``, so every offline sequence lies in [1500, 8000] by construction.

==========  =======  ======================  ======================  =========  ==================
dataset     mode     prompt mean σ [min,max] output mean σ [min,max] context    sampled means
==========  =======  ======================  ======================  =========  ==================
sharegpt    online   161  1.00 [4, 1024]     373  0.90 [4, 1024]     534        161.1 / 373.4
wildchat    online   258  1.10 [4, 2048]     480  0.80 [4, 2048]     738        258.2 / 480.4
humaneval   online   130  0.35 [40, 450]     44   0.60 [8, 256]      174        130.0 / 44.0
arxiv-sum   offline  4000 0.45 [1400, 7500]  220  0.35 [100, 500]    4220       4000.7 / 220.1
write-doc   offline  120  0.50 [20, 500]     3000 0.45 [1480, 7500]  3120       120.0 / 3001.4
==========  =======  ======================  ======================  =========  ==================

Sampled means: prompt / output means of ``synthetic(name, 200_000, seed=0)``.

Arrivals [D]: with ``rate_per_s`` the requests form an open-loop Poisson process (independent
exponential gaps, the first request one gap after t = 0); without it every request arrives at
t = 0, which models a closed-loop or offline batch. Lengths are drawn before gaps, so for one seed
the same requests come back whether or not a rate is given.

Traces are read and written by :mod:`pamjax.traces` (``load_trace``, ``save_trace``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pamjax.errors import ConfigError, UnknownNameError

_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """A batch of requests sorted by arrival time.

    The arrays are copied on construction and made read-only, so a workload is immutable.

    Attributes:
      arrival_s: float64 [N], seconds from the start of the run, finite, >= 0, non-decreasing;
        all zeros for a closed-loop or offline batch.
      prompt_tokens: int32 [N], prompt (input) length of each request in tokens, >= 1.
      output_tokens: int32 [N], number of tokens each request generates, >= 1; a request's
        context (prompt + output) is at most 2**31 - 1 tokens, the engine's int32 positions.
      name: label of the workload (dataset name or trace file stem).
      generated_tokens: int32 [N] (default all 0), output tokens a request had already
        produced when the simulation starts: the in-flight requests of a steady-state start
        (:func:`steady_state`, engine.resume), which must come first, arrive at 0 and have
        0 < generated < output. 0 = a fresh request (prefilled when admitted).
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    name: str = "workload"
    generated_tokens: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ConfigError("Workload.name", self.name, "must be a string")
        arrival = _as_vector("Workload.arrival_s", self.arrival_s)
        prompt = _as_vector("Workload.prompt_tokens", self.prompt_tokens)
        output = _as_vector("Workload.output_tokens", self.output_tokens)
        n = arrival.shape[0]
        if n < 1:
            raise ConfigError("Workload.arrival_s", n, "a workload needs at least one request")
        for field, arr in (("Workload.prompt_tokens", prompt), ("Workload.output_tokens", output)):
            if arr.shape[0] != n:
                raise ConfigError(field, arr.shape[0], f"length differs from arrival_s ({n})")
        object.__setattr__(self, "arrival_s", _check_arrivals(arrival))
        object.__setattr__(self, "prompt_tokens", _check_tokens("Workload.prompt_tokens", prompt))
        object.__setattr__(self, "output_tokens", _check_tokens("Workload.output_tokens", output))
        context = self.prompt_tokens.astype(np.int64) + self.output_tokens
        if (context > _INT32_MAX).any():
            i = _first_bad(context > _INT32_MAX)
            raise ConfigError("Workload.prompt_tokens+output_tokens", int(context[i]),
                              f"request {i}: the context must be at most {_INT32_MAX} tokens")
        object.__setattr__(self, "generated_tokens", self._checked_generated(n))

    def _checked_generated(self, n: int) -> np.ndarray:
        field = "Workload.generated_tokens"
        if self.generated_tokens is None:
            generated = np.zeros(n, np.int32)
        else:
            generated = _as_vector(field, self.generated_tokens)
            if generated.shape[0] != n:
                raise ConfigError(field, generated.shape[0], f"length differs from arrival_s "
                                  f"({n})")
            if generated.dtype.kind == "f" and not np.all(generated == np.round(generated)):
                raise ConfigError(field, generated, "must hold whole numbers")
            generated = generated.astype(np.int64)
        in_flight = generated > 0
        bad = (generated < 0) | (in_flight & (generated >= self.output_tokens))
        if bad.any():
            i = _first_bad(bad)
            raise ConfigError(field, int(generated[i]), f"request {i}: must be 0 (fresh) or "
                              f"in [1, output_tokens = {int(self.output_tokens[i])})")
        k = int(in_flight.sum())
        if not in_flight[:k].all() or (self.arrival_s[:k] != 0).any():
            raise ConfigError(field, k, "in-flight requests (generated > 0) must come first "
                              "and arrive at 0")
        generated = generated.astype(np.int32)
        generated.setflags(write=False)
        return generated

    @property
    def in_flight(self) -> int:
        """Requests already running when the simulation starts (generated_tokens > 0)."""
        return int(np.count_nonzero(self.generated_tokens))

    def __repr__(self) -> str:
        # The default dataclass repr would print every array element of a 20k-request trace.
        return (
            f"Workload(name={self.name!r}, num_requests={self.num_requests}, "
            f"mean_prompt={self.mean_prompt:.1f}, mean_output={self.mean_output:.1f}, "
            f"last_arrival_s={float(self.arrival_s[-1]):.3f})"
        )

    @property
    def num_requests(self) -> int:
        """Number of requests N."""
        return int(self.arrival_s.shape[0])

    @property
    def mean_prompt(self) -> float:
        """Mean prompt length in tokens."""
        return float(self.prompt_tokens.mean())

    @property
    def mean_output(self) -> float:
        """Mean output length in tokens."""
        return float(self.output_tokens.mean())

    @property
    def max_context(self) -> int:
        """Longest request context (prompt + output) in tokens; sizes per-request KV capacity."""
        return int((self.prompt_tokens.astype(np.int64) + self.output_tokens).max())

    def head(self, n: int) -> Workload:
        """Returns the first ``n`` requests (all of them when ``n`` >= N).

        Args:
          n: number of requests to keep, >= 1.

        Returns:
          A new :class:`Workload` with min(n, N) requests and the same name.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError("n", n, "must be an integer >= 1")
        return Workload(self.arrival_s[:n], self.prompt_tokens[:n], self.output_tokens[:n],
                        self.name, self.generated_tokens[:n])


def _as_vector(field: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ConfigError(field, arr.shape, "must be a 1-D array")
    if arr.dtype.kind not in "iuf":
        raise ConfigError(field, str(arr.dtype), "must hold real numbers")
    return arr


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_arrivals(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        i = _first_bad(~np.isfinite(arr))
        raise ConfigError("Workload.arrival_s", float(arr[i]), f"request {i} is not finite")
    if (arr < 0).any():
        i = _first_bad(arr < 0)
        raise ConfigError("Workload.arrival_s", float(arr[i]), f"request {i} is negative")
    back = np.diff(arr) < 0
    if back.any():
        i = _first_bad(back) + 1
        raise ConfigError(
            "Workload.arrival_s",
            float(arr[i]),
            f"request {i} arrives before request {i - 1} ({arr[i - 1]!r}); sort by arrival",
        )
    arr.setflags(write=False)
    return arr


def _check_tokens(field: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = _first_bad(bad)
            raise ConfigError(field, float(arr[i]), f"request {i} is not a whole token count")
    out_of_range = (arr < 1) | (arr > _INT32_MAX)
    if out_of_range.any():
        i = _first_bad(out_of_range)
        raise ConfigError(field, arr[i].item(), f"request {i} must have 1..{_INT32_MAX} tokens")
    out = np.array(arr, dtype=np.int32)
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """Length distributions of one synthetic dataset (clipped log-normals, see module docstring).

    Attributes:
      name: dataset name, the key in :data:`DATASETS`.
      mode: ``"online"`` (interactive dialogue, usually given an arrival rate) or ``"offline"``
        (long-text batch jobs).
      prompt_mean: mean prompt length after clipping, tokens.
      prompt_sigma: log-space standard deviation of the prompt length (shape), dimensionless.
      prompt_min: shortest prompt, tokens.
      prompt_max: longest prompt, tokens.
      output_mean: mean output length after clipping, tokens.
      output_sigma: log-space standard deviation of the output length (shape), dimensionless.
      output_min: shortest output, tokens.
      output_max: longest output, tokens.
      source: where the numbers come from ([P] publication, [D] pamjax default).
    """

    name: str
    mode: str
    prompt_mean: float
    prompt_sigma: float
    prompt_min: int
    prompt_max: int
    output_mean: float
    output_sigma: float
    output_min: int
    output_max: int
    source: str

    def __post_init__(self):
        if self.mode not in ("online", "offline"):
            raise ConfigError(f"{self.name}.mode", self.mode, "must be 'online' or 'offline'")
        for part in ("prompt", "output"):
            mean, sigma = getattr(self, f"{part}_mean"), getattr(self, f"{part}_sigma")
            lo, hi = getattr(self, f"{part}_min"), getattr(self, f"{part}_max")
            if not 1 <= lo < hi:
                raise ConfigError(f"{self.name}.{part}_min", lo, f"need 1 <= min < max ({hi})")
            # A clipped distribution can only reach a mean strictly between its bounds.
            if not lo < mean < hi:
                raise ConfigError(f"{self.name}.{part}_mean", mean, f"must lie in ({lo}, {hi})")
            if not (math.isfinite(sigma) and sigma > 0):
                raise ConfigError(f"{self.name}.{part}_sigma", sigma, "must be finite and > 0")

    @property
    def mean_context(self) -> float:
        """Mean context (prompt + output) in tokens."""
        return self.prompt_mean + self.output_mean


# The module docstring's table, as DatasetStats fields in order (sources: PAM §6 for [P]):
#   name, mode, prompt mean, sigma, min, max, output mean, sigma, min, max, source.
DATASETS: dict[str, DatasetStats] = {s.name: s for s in (
    DatasetStats("sharegpt", "online", 161, 1.00, 4, 1024, 373, 0.90, 4, 1024,
                 "[P] context 534; [D] prompt ~160 tokens as serving studies report it"),
    DatasetStats("wildchat", "online", 258, 1.10, 4, 2048, 480, 0.80, 4, 2048,
                 "[P] context 738; [D] prompt takes the rest of the 183-token online mean"),
    DatasetStats("humaneval", "online", 130, 0.35, 40, 450, 44, 0.60, 8, 256,
                 "[P] 183/299 online means; [D] signature+docstring in, short body out"),
    DatasetStats("arxiv-sum", "offline", 4000, 0.45, 1400, 7500, 220, 0.35, 100, 500,
                 "[P] 1,500-8,000-token sequences; [D] long paper in, abstract out"),
    DatasetStats("write-doc", "offline", 120, 0.50, 20, 500, 3000, 0.45, 1480, 7500,
                 "[P] 1,500-8,000-token sequences; [D] short instruction in, document out"),
)}


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    # E[clip(X, lo, hi)] for X = exp(N(mu, sigma^2)): the two clipped masses plus the partial
    # expectation exp(mu + sigma^2/2) * P(lo < X' < hi) of the size-biased variable X'.
    a = (math.log(lo) - mu) / sigma
    b = (math.log(hi) - mu) / sigma
    inside = _normal_cdf(b - sigma) - _normal_cdf(a - sigma)
    return lo * _normal_cdf(a) + hi * (1.0 - _normal_cdf(b)) + math.exp(mu + sigma**2 / 2) * inside


def _solve_mu(mean: float, sigma: float, lo: float, hi: float) -> float:
    # The clipped mean rises monotonically from lo to hi as mu sweeps the real line, so bisection
    # over a bracket ten sigmas beyond both bounds converges to the unique solution.
    left, right = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(100):
        mid = 0.5 * (left + right)
        if _clipped_lognormal_mean(mid, sigma, lo, hi) < mean:
            left = mid
        else:
            right = mid
    return 0.5 * (left + right)


def _sample_lengths(
    rng: np.random.Generator, n: int, mean: float, sigma: float, lo: int, hi: int
) -> np.ndarray:
    mu = _solve_mu(mean, sigma, lo, hi)
    return np.rint(np.clip(rng.lognormal(mu, sigma, n), lo, hi)).astype(np.int32)


def synthetic(
    name: str, num_requests: int, *, seed: int, rate_per_s: float | None = None
) -> Workload:
    """Draws a seeded synthetic workload from one of :data:`DATASETS`.

    Args:
      name: dataset name: ``sharegpt``, ``wildchat``, ``humaneval`` (online) or ``arxiv-sum``,
        ``write-doc`` (offline).
      num_requests: N, number of requests, >= 1.
      seed: non-negative integer seed for ``numpy.random.default_rng``; the result is a pure
        function of (name, num_requests, seed, rate_per_s).
      rate_per_s: mean arrival rate of an open-loop Poisson process in requests per second, > 0;
        ``None`` puts every request at t = 0 (closed loop / offline batch).

    Returns:
      A :class:`Workload` of N requests named ``name``: ``arrival_s`` float64 [N] seconds,
      ``prompt_tokens`` and ``output_tokens`` int32 [N] tokens.

    Raises:
      UnknownNameError: ``name`` is not a known dataset.
      ConfigError: ``num_requests``, ``seed`` or ``rate_per_s`` is invalid.
    """
    if name not in DATASETS:
        raise UnknownNameError("workload", name, DATASETS)
    if isinstance(num_requests, bool) or not isinstance(num_requests, (int, np.integer)):
        raise ConfigError("num_requests", num_requests, "must be an integer")
    if num_requests < 1:
        raise ConfigError("num_requests", num_requests, "must be >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", seed, "must be a non-negative integer")
    if rate_per_s is not None and not (
        isinstance(rate_per_s, (int, float, np.number))
        and math.isfinite(rate_per_s)
        and rate_per_s > 0
    ):
        raise ConfigError("rate_per_s", rate_per_s, "must be a finite number > 0, or None")
    stats = DATASETS[name]
    rng = np.random.default_rng(seed)
    prompt = _sample_lengths(
        rng,
        num_requests,
        stats.prompt_mean,
        stats.prompt_sigma,
        stats.prompt_min,
        stats.prompt_max,
    )
    output = _sample_lengths(
        rng,
        num_requests,
        stats.output_mean,
        stats.output_sigma,
        stats.output_min,
        stats.output_max,
    )
    if rate_per_s is None:
        arrival = np.zeros(num_requests, dtype=np.float64)
    else:
        arrival = np.cumsum(rng.exponential(1.0 / float(rate_per_s), num_requests))
    return Workload(arrival, prompt, output, name)


def steady_state(pool: Workload, batch: int, num_requests: int, *, seed: int) -> Workload:
    """A closed loop at its stationary point (PAM_SPEC §8, revised), as a workload.

    At a fixed batch a serving system keeps ``batch`` slots busy, refilling a slot with a
    fresh request when its request finishes. Seen at a step boundary, a slot holds a request
    drawn with probability proportional to the steps it occupies a slot (its output tokens
    but the last, ``output - 1``: a length-biased draw), at a point of its life uniform over
    those boundaries (``generated`` in 1..output-1 tokens). The first ``batch`` requests of
    the result are such in-flight requests (``generated_tokens`` > 0; engine.resume starts
    the simulation with them in their slots), the rest fresh requests queued at t = 0 (the
    refills), all drawn from ``pool`` with replacement.

    Args:
      pool: requests whose lengths define the population (a synthetic dataset or a trace);
        arrivals are ignored. At least one request must have an output of 2 or more tokens.
      batch: in-flight requests (the closed loop's concurrency), >= 1.
      num_requests: total requests, > batch (the refills follow the in-flight ones).
      seed: non-negative integer seed.

    Returns:
      A Workload of ``num_requests`` requests named after the pool, all arriving at 0.

    Raises:
      ConfigError: a bad count or seed, or a pool with no multi-token output.
    """
    for field, value, low in (("batch", batch, 1), ("num_requests", num_requests, batch + 1),
                              ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(field, value, f"must be an integer >= {low}")
    weight = pool.output_tokens.astype(np.float64) - 1.0
    if not weight.sum() > 0:
        raise ConfigError("pool", pool.name, "every request has a 1-token output: no request "
                          "is ever in flight at a step boundary")
    rng = np.random.default_rng(seed)
    flying = rng.choice(pool.num_requests, size=batch, p=weight / weight.sum())
    out = pool.output_tokens[flying].astype(np.int64)
    generated = 1 + np.floor(rng.random(batch) * (out - 1)).astype(np.int64)
    fresh = rng.integers(0, pool.num_requests, num_requests - batch)
    index = np.concatenate([flying, fresh])
    return Workload(np.zeros(num_requests), pool.prompt_tokens[index],
                    pool.output_tokens[index], pool.name,
                    np.concatenate([generated, np.zeros(num_requests - batch, np.int64)]))
