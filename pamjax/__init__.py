"""pamjax: a JAX-vectorised whole-system simulator of PAM (Processing Across Memory).

The serving system is a pure function ``engine.step(config, params, state, workload)`` over
fixed-shape arrays; time is ``lax.scan``; experiment axes are ``vmap`` over ``SimParams``.
The names below are the public API; the applications live in subpackages
(``pamjax.studies``: SLO search, sweeps, bounds, the PAM study, the benchmark;
``pamjax.learn``: learned scheduling).
"""

from pamjax.attention import (
    Partial,
    empty_partial,
    finalize,
    flash_decoding_attention,
    local_attention,
    merge_partials,
    pam_attention,
)
from pamjax.engine import init_state, rollout, rollout_batch, rollout_jit, step
from pamjax.errors import (
    CapacityError,
    ConfigError,
    PamjaxError,
    TraceFormatError,
    UnknownNameError,
)
from pamjax.hardware import PLATFORMS, TIER_NAMES, Platform, Tier, get_platform
from pamjax.locality import AccessModel, load_recorded_scores
from pamjax.metrics import summarize, summarize_batch
from pamjax.models import MODELS, Model, get_model
from pamjax.simulation import (
    SimResult,
    device_workload,
    index_config,
    make_config,
    run,
    run_batch,
    run_many,
    simulate,
    simulate_systems,
    stack,
)
from pamjax.studies.study import peak_under_slo, run_sweep
from pamjax.systems import MAIN_SYSTEMS, SYSTEMS, Knobs, System, get_system, make_params
from pamjax.testing import check_invariants
from pamjax.traces import load_trace, save_trace
from pamjax.types import EngineConfig, EngineState, SimParams, StepMetrics
from pamjax.workload import DATASETS, Workload, synthetic

__version__ = "0.1.0"

__all__ = [
    # PAMattention numerics
    "Partial", "local_attention", "merge_partials", "finalize", "empty_partial",
    "pam_attention", "flash_decoding_attention",
    # Hardware, models, systems
    "Platform", "Tier", "PLATFORMS", "TIER_NAMES", "get_platform",
    "Model", "MODELS", "get_model",
    "System", "SYSTEMS", "MAIN_SYSTEMS", "Knobs", "get_system", "make_params",
    # Workloads and the access model
    "Workload", "DATASETS", "synthetic", "load_trace", "save_trace", "device_workload",
    "AccessModel", "load_recorded_scores",
    # Engine
    "EngineConfig", "EngineState", "SimParams", "StepMetrics",
    "init_state", "step", "rollout", "rollout_jit", "rollout_batch",
    # Running: one configuration, many configurations, summaries, checks
    "SimResult", "make_config", "run", "simulate", "simulate_systems", "run_many",
    "stack", "index_config", "run_batch",
    "summarize", "summarize_batch", "check_invariants",
    # The SLO search (pamjax.studies.study)
    "run_sweep", "peak_under_slo",
    # Errors
    "PamjaxError", "ConfigError", "UnknownNameError", "TraceFormatError", "CapacityError",
]
