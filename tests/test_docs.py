"""docs/model.md against the code: the checkable parts of the model's documentation.

docs/model.md is the reference users read instead of the code. These tests fail when it
drifts from the code in a way a machine can see:

* every table with a ``code`` and a ``default`` column: the code cell (in backticks) names
  where the value lives and the default cell must equal it, rounded to the digits shown.
  A code path starts with ``platform`` (the preset ``hardware.get_platform()``), ``access``
  (``locality.AccessModel()``), ``knobs`` (``systems.Knobs()``), ``energy``
  (``hardware.Energy()``) or a module of pamjax
  (``pamjax.X`` or ``pamjax.studies.X``); then ``.name`` (an attribute, or a function's
  parameter, meaning its default), ``[key]`` (a dictionary entry) and ``()`` (a call without
  arguments). A default cell is a number, ``True``/``False``/``None``, or a string in
  backticks;
* every field of the hardware, access-model and knob dataclasses has a row in those tables
  (per tier and per device preset);
* the model, dataset, PIM-rate and system tables match the presets row by row, and every
  system of ``systems.SYSTEMS`` is in both system tables;
* section 11's equations, transcribed here (``_documented_step``), give costs.step_cost's
  time, attention time and energy per component on a step where every count is non-zero;
* every backticked dotted name starting with a pamjax module, a preset root or a main class
  (``engine.resume``, ``Platform.path_gbps``) exists;
* every SimParams, StepCounts and EngineConfig field, energy component and bound resource
  is mentioned (in backticks, a count also as ``name[t]``), and the steady-state columns exist in studies/study.py.

Nothing here runs a simulation; the whole file takes seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import pathlib
import re
from decimal import Decimal

import numpy as np
import pytest

from pamjax import hardware, locality, models, systems, types, workload
from pamjax.costs import StepCounts
from pamjax.studies import bounds

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "model.md"
TEXT = DOC.read_text()


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str = TEXT) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of ``text`` as (header cells, rows of cells)."""
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            block.append(_cells(line))
            continue
        if len(block) >= 2:
            found.append((block[0], block[2:]))
        block = []
    return found


def _table(first_column: str, *more: str) -> list[dict]:
    """The rows (header -> cell) of the one table whose header starts with these names."""
    wanted = [first_column, *more]
    hits = [(h, rows) for h, rows in tables() if h[:len(wanted)] == wanted]
    assert len(hits) == 1, f"expected one table headed {wanted}, found {len(hits)}"
    header, rows = hits[0]
    return [dict(zip(header, row)) for row in rows]


def _ticked(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell.strip())
    assert match, f"expected one backticked code path, got {cell!r}"
    return match.group(1)


_SEGMENT = re.compile(r"\.([A-Za-z_]\w*)|\[([^\]]+)\]|(\(\))")


def resolve(path: str):
    """The value a code path of docs/model.md names (see the module docstring)."""
    root = re.match(r"[A-Za-z_]\w*", path)
    assert root, f"bad code path {path!r}"
    name = root.group(0)
    if name == "platform":
        obj = hardware.get_platform()
    elif name == "access":
        obj = locality.AccessModel()
    elif name == "knobs":
        obj = systems.Knobs()
    elif name == "energy":
        obj = hardware.Energy()
    else:
        try:
            obj = importlib.import_module(f"pamjax.{name}")
        except ModuleNotFoundError:
            obj = importlib.import_module(f"pamjax.studies.{name}")
    rest = path[root.end():]
    while rest:
        seg = _SEGMENT.match(rest)
        assert seg, f"cannot parse {rest!r} in {path!r}"
        attr, key, call = seg.groups()
        if key is not None:
            obj = obj[key]
        elif call:
            obj = obj()
        elif hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif callable(obj) and attr in inspect.signature(obj).parameters:
            obj = inspect.signature(obj).parameters[attr].default
            assert obj is not inspect.Parameter.empty, f"{path}: {attr} has no default"
        else:
            raise AssertionError(f"{path}: nothing called {attr!r}")
        rest = rest[seg.end():]
    return obj


_CLASSES = {"Gpu": hardware.Gpu, "Platform": hardware.Platform, "Tier": hardware.Tier,
            "System": systems.System, "Knobs": systems.Knobs, "Model": models.Model}


def test_every_code_reference_exists():
    """Every backticked dotted name that starts with a pamjax module, a preset root or a
    class of _CLASSES names something that exists (a renamed function breaks this)."""
    skip_roots = {"jax", "lax", "config"}
    missing = []
    for ref in sorted(set(re.findall(r"`([A-Za-z_]\w*(?:\.\w+)+)`", TEXT))):
        root, *rest = ref.split(".")
        if root in skip_roots or ref.endswith((".py", ".json")):
            continue
        if root in _CLASSES:
            cls = _CLASSES[root]
            fields = {f.name for f in dataclasses.fields(cls)}
            if not (hasattr(cls, rest[0]) or rest[0] in fields) or len(rest) > 1:
                missing.append(ref)
            continue
        try:
            resolve(ref)
        except (AssertionError, ModuleNotFoundError, KeyError, AttributeError):
            missing.append(ref)
    assert not missing, f"docs/model.md names what the code does not have: {missing}"


def matches(cell: str, value) -> bool:
    """The doc's cell states ``value``: numbers rounded to the digits shown, else exactly."""
    cell = cell.strip()
    if cell in ("True", "False", "None"):
        return repr(value) == cell
    if cell.startswith("`"):
        return str(value) == _ticked(cell)
    number = Decimal(cell.split()[0].replace(",", ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    tolerance = 0.5 * 10.0 ** number.as_tuple().exponent
    return abs(float(value) - float(number)) <= tolerance * (1 + 1e-9)


def parameter_rows() -> list[dict]:
    """Rows of every table with ``code`` and ``default`` columns."""
    rows = []
    for header, body in tables():
        if "code" in header and "default" in header:
            rows += [dict(zip(header, row)) for row in body]
    return rows


def test_parameter_tables_match_the_code():
    rows = parameter_rows()
    assert len(rows) > 150, "the parameter tables went missing"
    wrong = []
    for row in rows:
        path = _ticked(row["code"])
        value = resolve(path)
        if not matches(row["default"], value):
            wrong.append(f"{path}: doc says {row['default']}, code has {value!r}")
    assert not wrong, "docs/model.md disagrees with the code:\n" + "\n".join(wrong)


def test_parameter_rows_have_a_tag():
    tags = {"[published]", "[external]", "[default]", "derived"}
    untagged = [row["code"] for row in parameter_rows() if row["tag"] not in tags]
    assert not untagged, f"rows without a tag of {sorted(tags)}: {untagged}"


def _documented_paths() -> set[str]:
    return {_ticked(row["code"]) for row in parameter_rows()}


def _fields(cls, skip=("name",)) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


@pytest.mark.parametrize("prefix, cls", [
    ("platform.gpu", hardware.Gpu),
    ("platform.energy", hardware.Energy),
    ("platform.hbm", hardware.Tier),
    ("platform.ddr", hardware.Tier),
    ("platform.ssd", hardware.Tier),
    ("hardware.HBM3_PIM_STACK", hardware.DramPimDevice),
    ("hardware.DDR4_3200_PIM_DIMM", hardware.DramPimDevice),
    ("hardware.SSD_PIM", hardware.SsdPimDevice),
    ("access", locality.AccessModel),
    ("knobs", systems.Knobs),
])
def test_every_field_has_a_parameter_row(prefix, cls):
    paths = _documented_paths()
    missing = [f for f in _fields(cls, skip=("name", "device"))
               if f"{prefix}.{f}" not in paths]
    assert not missing, f"docs/model.md has no row for {prefix}.{missing}"


def test_model_table_matches_the_presets():
    rows = _table("model", "layers")
    assert [r["model"] for r in rows] == list(models.MODELS)
    platform = hardware.get_platform()
    for row in rows:
        m = models.MODELS[row["model"]]
        expected = {
            "layers": m.layers, "q heads": m.q_heads, "kv heads": m.kv_heads,
            "head dim": m.head_dim, "hidden": m.hidden, "ffn": m.ffn, "vocab": m.vocab,
            "gated FFN": m.gated_ffn, "tied embeddings": m.tied_embeddings,
            "KV bytes/token": m.kv_bytes_per_token, "params (B)": m.params / 1e9,
            "weights (GB)": m.weight_bytes / 1e9,
            "FC GFLOP/token": m.fc_flops_per_token / 1e9,
            "HBM left for KV (GB)": systems.hbm_kv_bytes(platform, m) / 1e9,
        }
        assert set(expected) == set(row) - {"model"}
        wrong = {k: (row[k], v) for k, v in expected.items() if not matches(row[k], v)}
        assert not wrong, f"{m.name}: (doc, code) {wrong}"


def test_pim_rate_table_matches_hardware():
    rows = _table("model", "g")
    assert [r["model"] for r in rows] == list(models.MODELS)
    platform = hardware.get_platform()
    for row in rows:
        m = models.MODELS[row["model"]]
        expected = {"g": m.gqa_group}
        for tier in platform.tiers:
            expected[f"passes {tier.name}"] = hardware.query_passes(
                tier.device.pu_buffer_bytes, m.gqa_group, m.head_dim)
            expected[f"device GB/s {tier.name}"] = tier.device_effective_gbps(m)
            expected[f"bank group GB/s {tier.name}"] = tier.bank_group_gbps(m)
        assert set(expected) == set(row) - {"model"}
        wrong = {k: (row[k], v) for k, v in expected.items() if not matches(row[k], v)}
        assert not wrong, f"{m.name}: (doc, code) {wrong}"


def test_dataset_table_matches_the_generators():
    rows = _table("dataset", "mode")
    assert [r["dataset"] for r in rows] == list(workload.DATASETS)
    for row in rows:
        stats = workload.DATASETS[row["dataset"]]
        assert row["mode"] == stats.mode
        for part in ("prompt", "output"):
            for field, column in (("mean", "mean"), ("sigma", "sigma"), ("min", "min"),
                                  ("max", "max")):
                value = getattr(stats, f"{part}_{field}")
                assert matches(row[f"{part} {column}"], value), (stats.name, part, field)


_PLACEMENT = {"fastest first": types.PLACEMENT_FASTEST_FIRST,
              "importance ratio": types.PLACEMENT_IMPORTANCE_RATIO}
_NEW_TOKEN = {"fastest free": types.NEW_TOKEN_FASTEST_FREE,
              "hbm, displace": types.NEW_TOKEN_HBM_DISPLACE}


def test_system_table_matches_systems():
    rows = _table("system", "attention")
    assert sorted(r["system"] for r in rows) == sorted(systems.SYSTEMS)
    for row in rows:
        s = systems.SYSTEMS[row["system"]]
        got = {
            "attention": row["attention"] == "PIM", "sparse": row["sparse"] == "True",
            "KV tiers": tuple(row["KV tiers"].split("+")),
            "prompt placement": _PLACEMENT[row["prompt placement"]],
            "new tokens": _NEW_TOKEN[row["new tokens"]],
            "swap budget": int(row["swap budget"]),
            "PAMattention": row["PAMattention"] == "True", "mapping": row["mapping"],
            "migration slowdown": float(row["migration slowdown"]),
        }
        want = {
            "attention": s.attention_on_pim, "sparse": s.sparse, "KV tiers": s.tiers,
            "prompt placement": s.placement_policy, "new tokens": s.new_token_policy,
            "swap budget": s.swap_budget, "PAMattention": s.use_pamattention,
            "mapping": s.mapping, "migration slowdown": s.migration_slowdown,
        }
        assert got == want, s.name


def test_every_system_is_described():
    rows = _table("system", "what it is")
    assert sorted(r["system"] for r in rows) == sorted(systems.SYSTEMS)


@pytest.mark.parametrize("names", [
    _fields(types.SimParams, skip=()),
    _fields(StepCounts, skip=()),
    _fields(types.EngineConfig, skip=()),
    list(types.ENERGY_COMPONENTS),
    list(bounds.RESOURCES),
], ids=["SimParams", "StepCounts", "EngineConfig", "energy", "bound resources"])
def test_every_name_is_mentioned(names):
    missing = [n for n in names if not re.search(rf"`{n}(`|\[)", TEXT)]
    assert not missing, f"docs/model.md never mentions {missing}"


def test_simparams_table_covers_every_field():
    cells = " ".join(r["SimParams field"] for r in _table("SimParams field", "value"))
    missing = [n for n in _fields(types.SimParams, skip=()) if f"`{n}`" not in cells]
    assert not missing, f"the SimParams table misses {missing}"


def test_steady_state_columns_exist():
    source = (ROOT / "pamjax" / "studies" / "study.py").read_text()
    for row in _table("column", "definition"):
        for name in re.findall(r"`([^`]+)`", row["column"]):
            if "<" in name:
                continue
            # Per-tier and decode_ columns are built as f"{tier}_token_share" and
            # f"{prefix}bound_tokens_per_s".
            spellings = (f'"{name}"', "{tier}" + name.removeprefix("hbm") + '"',
                         "{prefix}" + name.removeprefix("decode_") + '"')
            assert any(s in source for s in spellings), f"study.py has no column {name}"


def test_resolver_refuses_a_wrong_path():
    with pytest.raises(AssertionError):
        resolve("platform.gpu.no_such_field")
    assert not matches("0.7", 0.76) and matches("0.7", 0.7) and matches("8212", 8211.74)
    assert math.isclose(resolve("systems.calibrate_targets.max_ratio"), 1e12)


# ------------------------------------------------------------------------------------------
# Section 11 of docs/model.md, transcribed: costs.step_cost must compute these equations.
# Change the two together.
# ------------------------------------------------------------------------------------------

LABEL = 1.0 / 16.0  # LABEL_FRACTION_OF_KV
PARTIAL_BYTES, TOPK_BYTES = 4.0, 8.0


def _documented_path_times(p, tier_bytes, moved_bytes):
    """Section 11.3, link time."""
    moved = moved_bytes * p.migration_slowdown
    own = (tier_bytes + moved.sum(1) + moved.sum(0)) / p.link_rate
    behind = p.behind_pcie
    crosses = behind[:, None] != behind[None, :]
    pcie = (np.sum(behind * tier_bytes) + np.sum(np.where(crosses, moved, 0.0))) \
        / (p.num_gpus * p.pcie_rate)
    return np.maximum(own, behind * pcie)


def _documented_step(p, c):
    """(step time s, attention s, energy pJ per component) by docs/model.md section 11."""
    kv, L, Hq, D = p.kv_bytes_per_token, p.layers, p.q_heads, p.head_dim
    t, pp, b, sparse = p.tp, p.pp, c["decode_requests"], c["sparse"]
    on_pim = bool(p.attention_on_pim)
    no_moves = np.zeros((3, 3))

    def allreduce_s(n):
        return 2 * (t - 1) / t * n * p.hidden * 2 / p.collective_rate \
            + 2 * (t - 1) * p.collective_latency

    def streamed(n):
        return p.streamed_weight_bytes - p.routed_weight_bytes * (1 - p.expert_route_fraction) ** n

    # 11.2 FC layers.
    micro = b / pp
    roofline = max(p.fc_flops_per_token * micro / pp / (t * p.gpu_flops),
                   streamed(micro) / pp / (t * p.gpu_mem_rate))
    per_micro = roofline + L / pp * (2 * allreduce_s(micro) + p.kernel_overhead)
    handoff = micro * p.hidden * 2 / p.nvlink_rate + p.gpu_link_latency
    fc_time = pp * per_micro + (pp - 1) * handoff

    # 11.3 attention in PIM.
    n_dev = p.num_devices
    selected_bytes = c["tier_selected"] * kv
    label_bytes = sparse * c["tier_tokens"] * kv * LABEL
    busiest = c["tier_busiest_bank_group"] * kv / n_dev \
        + label_bytes / (n_dev * p.bank_groups_per_device)
    compute = np.maximum(busiest / p.bank_group_rate,
                         (selected_bytes + label_bytes) / n_dev / p.device_rate)
    write_bytes = c["tier_decode_writes"] * kv * (1 + sparse * LABEL)
    moved = c["migrated_tokens"] * kv
    device_io = (write_bytes + moved.sum(0) + moved.sum(1)) / (n_dev * p.device_internal_rate)
    q_bytes = c["tier_holders"] * L * Hq * D * 2
    partial = L * Hq * (D + 2) * PARTIAL_BYTES
    partials_out = (c["tier_requests"] if p.use_pamattention else c["tier_active_chunks"]) \
        * partial
    topk_bytes = sparse * c["tier_topk_candidates"] * L * p.kv_heads * TOPK_BYTES
    path = _documented_path_times(p, q_bytes + partials_out + topk_bytes + write_bytes, moved)
    round_trips = (2 + 2 * sparse) * L * p.link_latency * (c["tier_holders"] > 0)
    pim_attention_s = np.max(round_trips + compute + device_io + path)

    # 11.4 attention on the GPUs.
    host_side = np.array([0.0, 1.0, 1.0])
    gpu_attn_flops = 4 * L * Hq * D * c["tier_selected"].sum()
    gpu_part = max(selected_bytes[0] / (p.num_gpus * p.gpu_mem_rate),
                   gpu_attn_flops / (p.num_gpus * p.gpu_flops))
    fetch = _documented_path_times(p, host_side * (selected_bytes + write_bytes), no_moves)
    attention = pim_attention_s if on_pim else gpu_part + max(fetch[1], fetch[2])

    # 11.5 prefill, 11.6 step time.
    n = c["prefill_tokens"]
    prefill_flops = p.fc_flops_per_token * n + 4 * L * Hq * D * c["prefill_pairs"]
    prefill_bytes = c["prefill_tier_tokens"] * kv * (1 + sparse * LABEL)
    prefill_time = max(prefill_flops / (p.num_gpus * p.gpu_flops),
                       streamed(n) / (t * p.gpu_mem_rate)) \
        + L / pp * 2 * allreduce_s(n) \
        + _documented_path_times(p, prefill_bytes, no_moves).max() + L * p.kernel_overhead
    step_time = prefill_time + fc_time + attention

    # 11.7 energy.
    w = p.kv_bytes_per_token / (2 * L * p.kv_heads * D)  # bytes per K or V value ("Counting")
    flops_per_kv_byte = 2 * Hq / p.kv_heads / w
    link_pj = np.array([p.nvlink_pj, p.pcie_pj, p.pcie_pj])
    pim = 1.0 if on_pim else 0.0
    allreduce_bytes = 2 * L * 2 * (t - 1) / t * p.hidden * 2 * (b + n)
    energy = {
        "gpu_compute": p.gpu_pj_per_flop * (p.fc_flops_per_token * b + prefill_flops
                                             + (1 - pim) * gpu_attn_flops),
        "gpu_memory": 8 * p.gpu_hbm_read_pj * (pp * streamed(b / pp) + streamed(n)
                                               + (1 - pim) * selected_bytes[0]),
        "pim_attention": pim * 8 * np.sum((selected_bytes + label_bytes) * p.pim_read_pj
                                          * (p.read_passes + p.pim_pu_factor * flops_per_kv_byte)),
        "reduction": pim * 8 * p.bank_group_read_pj
        * np.sum(c["tier_active_bank_groups"] * partial),
        "transfer": 8 * (pim * np.sum((q_bytes + partials_out + topk_bytes) * link_pj)
                         + (1 - pim) * np.sum(host_side * selected_bytes * p.host_read_pj)
                         + np.sum((write_bytes + prefill_bytes) * (link_pj + p.pim_read_pj))
                         + p.nvlink_pj * allreduce_bytes),
        "migration": 8 * np.sum(moved * (p.pim_read_pj[:, None] + p.pim_read_pj[None, :]
                                         + np.maximum(link_pj[:, None], link_pj[None, :]))),
        "static": p.static_power_w * step_time * 1e12,
    }
    return step_time, attention, np.array([energy[k] for k in types.ENERGY_COMPONENTS])


_COUNTS = dict(
    decode_requests=64.0, decode_context=64 * 3000.0,
    tier_tokens=[1e5, 6e4, 3e4], tier_selected=[2e4, 3e3, 1e3],
    tier_busiest_bank_group=[200.0, 900.0, 150.0], tier_requests=[64.0, 40.0, 20.0],
    tier_holders=[64.0, 60.0, 30.0], tier_active_bank_groups=[3000.0, 150.0, 100.0],
    tier_active_chunks=[300.0, 100.0, 60.0], tier_topk_candidates=[2e4, 1e4, 5e3],
    tier_decode_writes=[60.0, 3.0, 1.0], prefill_tokens=3000.0,
    prefill_pairs=3000 * 3001 / 2.0, prefill_tier_tokens=[2000.0, 800.0, 200.0],
    migrated_tokens=[[0.0, 100.0, 0.0], [50.0, 0.0, 10.0], [0.0, 20.0, 0.0]])


@pytest.mark.parametrize("system, model, kv_bytes", [
    ("pam", "llama3-70b", 2), ("pam-no-pamattention", "llama3-70b", 2),
    ("ls-pim", "opt-175b", 2), ("vllm-offload", "llama3-70b", 2), ("pam", "llama3-70b", 1)])
def test_cost_model_is_the_documented_equations(system, model, kv_bytes):
    """A step with every count non-zero (prefill, decode, writes, moves between all tier
    pairs) costs what section 11's equations say, in float64, for a 16-bit and an FP8 KV
    cache."""
    import jax
    import jax.numpy as jnp

    from pamjax.costs import step_cost

    # Explicit targets under the throughput rule: no x:y calibration to wait for.
    model = dataclasses.replace(models.get_model(model), kv_bytes_per_value=kv_bytes)
    params = systems.make_params(system, model, max_batch=64,
                                 knobs=systems.Knobs(target_x=4.0, target_y=2.0,
                                                     target_rule="throughput"))
    with jax.enable_x64(True):
        p = jax.tree.map(lambda v: np.asarray(v, np.float64)
                         if np.asarray(v).dtype.kind == "f" else np.asarray(v), params)
        c = {k: np.asarray(v, np.float64) for k, v in _COUNTS.items()}
        c["sparse"] = np.float64(float(p.select_fraction) < 1.0)
        cost = step_cost(p, StepCounts(**{k: jnp.asarray(v) for k, v in c.items()}))
        time, attention, energy = _documented_step(p, c)
        np.testing.assert_allclose(float(cost.time_s), time, rtol=1e-9)
        np.testing.assert_allclose(float(cost.attention_s), attention, rtol=1e-9)
        np.testing.assert_allclose(np.asarray(cost.energy_pj), energy, rtol=1e-9)
