"""docs/model.md against the code: the checkable parts of the model's documentation.

docs/model.md is the reference users read instead of the code. These tests fail when it
drifts from the code in a way a machine can see:

* every table with a ``code`` and a ``default`` column: the code cell (in backticks) names
  where the value lives and the default cell must equal it, rounded to the digits shown.
  A code path starts with ``platform`` (the preset ``hardware.get_platform()``), ``access``
  (``locality.AccessModel()``), ``knobs`` (``systems.Knobs()``) or a module of pamjax
  (``pamjax.X`` or ``pamjax.studies.X``); then ``.name`` (an attribute, or a function's
  parameter, meaning its default), ``[key]`` (a dictionary entry) and ``()`` (a call without
  arguments). A default cell is a number, ``True``/``False``/``None``, or a string in
  backticks;
* every field of the hardware, access-model and knob dataclasses has a row in those tables
  (per tier and per device preset);
* the model, dataset, PIM-rate and system tables match the presets row by row, and every
  system of ``systems.SYSTEMS`` is in both system tables;
* every SimParams, StepCounts and EngineConfig field, energy component and bound resource
  is mentioned (in backticks, a count also as ``name[t]``), and the steady-state columns exist in studies/study.py.

Nothing here runs a simulation; the whole file takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import pathlib
import re
from decimal import Decimal

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
