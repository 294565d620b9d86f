"""Hardware platforms and models from TOML or JSON files.

The format follows the suffix: ``.toml`` or ``.json`` (anything else is refused). TOML needs
Python 3.11+ (``tomllib``) or the ``tomli`` package on 3.10; JSON always works.

Platform files
--------------
The useful form starts from a preset and overrides a few published figures; every key maps
onto a field of :mod:`pamjax.hardware` (``gpu.F`` is a :class:`~pamjax.hardware.Gpu` field,
``<tier>.F`` a :class:`~pamjax.hardware.Tier` field, ``<tier>.device.F`` a field of the tier's
:class:`~pamjax.hardware.DramPimDevice` or :class:`~pamjax.hardware.SsdPimDevice`, and
``energy.F`` an :class:`~pamjax.hardware.Energy` coefficient), with the units in the field
names as documented there. A complete example::

    # examples/hardware/pam-80-dimms.toml
    base = "pam-dgx-h100"        # preset to start from (pamjax.hardware.PLATFORMS)
    name = "pam-80-dimms"        # optional; default: the file stem

    [ddr]
    num_devices = 80             # 80 DDR4-PIM DIMMs instead of 40

    [hbm.device]
    tCCD_L = 8                   # command-clock cycles

    [gpu]                        # all fields of a section are applied together, so a
    num_gpus = 16                # consistent GPU count and TP x PP split can be given
    tensor_parallel = 8
    pipeline_parallel = 2

    [energy]
    ddr_pim_read = 1.5           # pJ/bit

TOML dotted keys (``ddr.num_devices = 80``) are the same as the tables above, and JSON files
use nested objects or dotted keys: ``{"base": "pam-dgx-h100", "ddr": {"num_devices": 80}}``.

Without ``base`` the file is a full description: every field of ``gpu``, ``hbm``, ``ddr``,
``ssd`` and their ``device`` tables must be given (``energy`` fields default to the
published table); ``hbm`` and ``ddr`` hold DRAM-PIM devices and ``ssd`` an SSD-PIM device.
:func:`write_config_file` writes a preset in this form (``examples/hardware/
pam-dgx-h100-full.toml`` is one), which is the easiest way to start a new design.

A derived figure is *not* recomputed from an override of the figure it was derived from at
preset time: a tier's ``link_gbps`` and its ``*_pj_per_bit`` fields are plain fields of the
tier, so overriding ``ddr.device.pin_gbps`` or ``energy.ddr_pim_read`` leaves them as they
were; override them too (``ddr.link_gbps``, ``ddr.pim_read_pj_per_bit``) if they should
follow. Everything computed by a method or property (capacity, internal rates, clocks)
does follow.

Model files
-----------
Top-level keys are the fields of :class:`~pamjax.models.Model`::

    # examples/models/mistral-7b-like.toml
    name = "mistral-7b-like"     # optional; default: the file stem
    layers = 32
    q_heads = 32
    kv_heads = 8                 # must divide q_heads (grouped-query attention)
    head_dim = 128
    hidden = 4096
    ffn = 14336
    vocab = 32000
    gated_ffn = true             # optional, default true (SwiGLU MLP)
    tied_embeddings = false      # optional, default false
    weight_bytes_per_value = 2   # optional, default 2 (16-bit weights)
    kv_bytes_per_value = 2       # optional, default 2 (16-bit KV cache; 1 for FP8)

``bytes_per_value = 1`` (the older single key) sets both byte widths; giving it together
with ``weight_bytes_per_value`` or ``kv_bytes_per_value`` is an error. A mixture-of-experts
model adds ``num_experts`` (routed experts per MoE layer; 0, the default, is dense),
``experts_per_token`` (top-k), and optionally ``shared_experts``, ``moe_ffn`` (expert FFN
width when it differs from ``ffn``) and ``first_dense_layers`` (see
``examples/models/mixtral-8x7b.toml`` and :class:`~pamjax.models.Model`).

``base = "llama3-8b"`` starts from a preset (``pamjax.models.MODELS``), after which every
field is optional.

A Hugging Face ``config.json`` (recognised by its ``model_type`` or ``architectures`` key) is
read too, for the families :mod:`pamjax.hf_config` lists (LLaMA, Mistral, Mixtral, Qwen2,
Qwen2-MoE, Qwen3, Qwen3-MoE, DeepSeekMoE, OPT); see ``examples/models/qwen3-30b-a3b/
config.json``.

Validation
----------
Every problem raises :class:`ConfigFileError` (a :class:`~pamjax.errors.ConfigError`) whose
message starts with the file path (and the line, for a syntax error the parser located) and
names the dotted field, e.g. ``hw.toml: invalid ddr.num_devices=-1: must be > 0``: unknown
fields (with the valid ones listed), wrong types (a string or a bool where a number is
expected, a fraction where an integer is), zero, negative, NaN or infinite values, missing
fields, unknown presets, and malformed, empty, binary, missing or unreadable files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

from pamjax import hardware, models
from pamjax._file_values import check_type, default_name
from pamjax.errors import ConfigError, ConfigFileError
from pamjax.hf_config import model_from_hf_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

SUFFIXES = (".toml", ".json")
"""File suffixes this module reads and writes."""

_TIER_SECTIONS = hardware.TIER_NAMES
_SECTIONS = ("gpu", *_TIER_SECTIONS, "energy")
_DEVICE_TYPES = {"hbm": hardware.DramPimDevice, "ddr": hardware.DramPimDevice,
                 "ssd": hardware.SsdPimDevice}


# -- reading ----------------------------------------------------------------------------------

def _read_mapping(path: pathlib.Path) -> dict:
    """Parse a TOML or JSON file into a dict; every failure is a ConfigFileError."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigFileError(path, None, None, f"unknown file type {path.suffix or '(none)'!r};"
                              f" use one of {', '.join(SUFFIXES)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(path, None, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigFileError(path, None, None, "is a directory, not a file") from None
    except OSError as err:
        raise ConfigFileError(path, None, None, f"cannot read: {err.strerror or err}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigFileError(path, None, None, "binary content (NUL byte); expected a "
                              f"{suffix[1:].upper()} text file", line=data.count(b"\n", 0, nul) + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(path, None, None, "not UTF-8 text; expected a "
                              f"{suffix[1:].upper()} text file",
                              line=data.count(b"\n", 0, err.start) + 1) from None
    if not text.strip():
        raise ConfigFileError(path, None, None, "empty file")
    if suffix == ".json":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigFileError(path, None, None, f"malformed JSON: {err.msg}",
                                  line=err.lineno) from None
        if not isinstance(parsed, dict):
            raise ConfigFileError(path, None, None, "the JSON document must be an object "
                                  f"{{...}}, not {type(parsed).__name__}")
        return parsed
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigFileError(path, None, None, "reading TOML needs Python 3.11+ or the "
                              "'tomli' package; use a .json file instead")
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        found = re.search(r"\(at line (\d+), column \d+\)", message)
        if found:
            message = message[:found.start()].rstrip()
        raise ConfigFileError(path, None, None, f"malformed TOML: {message}",
                              line=int(found.group(1)) if found else 0) from None
    if not parsed:
        raise ConfigFileError(path, None, None, "no settings (only comments or blank lines)")
    return parsed


def _flatten(path: pathlib.Path, data: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}; a key given twice is an error."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items = _flatten(path, value, f"{name}.")
        else:
            items = {name: value}
        for k, v in items.items():
            if k in flat:
                raise ConfigFileError(path, k, v, "given twice")
            flat[k] = v
    return flat


# -- field checks -----------------------------------------------------------------------------

def _fields(cls) -> dict[str, str]:
    """Field name -> annotation text (``from __future__ import annotations`` keeps text)."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _build(path, cls, section: str, values: Mapping[str, Any], base=None):
    """Construct ``cls`` from checked ``values`` (on top of ``base`` if given).

    The dataclass's own validation (positive, finite, cross-field rules) runs in its
    ``__post_init__`` and names fields ``<object name>.<field>``; this re-raises it with the
    file and the dotted path of the section. An empty ``values`` on a ``base`` is a copy.
    """
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as err:
        # Field names hold no dots, so the last component is the field (or the cross-field
        # rule, e.g. "tensor_parallel*pipeline_parallel") whatever the object's name is.
        field = str(err.field).rsplit(".", 1)[-1]
        raise ConfigFileError(path, f"{section}.{field}" if section else field, err.value,
                              err.reason) from None


def _section_values(path, section: str, cls, flat: Mapping[str, Any],
                    excluded: tuple[str, ...] = ()) -> dict[str, Any]:
    """Checked values of one section's fields, from dotted keys ``<section>.<field>``."""
    kinds = {k: v for k, v in _fields(cls).items() if k not in excluded}
    prefix = f"{section}." if section else ""
    values = {}
    for key, value in flat.items():
        field = key[len(prefix):]
        if field not in kinds:
            raise ConfigFileError(path, key, value, "unknown field; choose one of: "
                                  + ", ".join(kinds))
        values[field] = check_type(path, key, value, kinds[field])
    return values


def _require(path, section: str, cls, values: Mapping[str, Any],
             excluded: tuple[str, ...] = ()) -> None:
    """Raise for the first field without a default that ``values`` lacks."""
    for f in dataclasses.fields(cls):
        if f.name in excluded or f.name in values:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            dotted = f"{section}.{f.name}" if section else f.name
            raise ConfigFileError(path, dotted, None, "missing (required without 'base')")


# -- platforms --------------------------------------------------------------------------------

def _split_sections(path, flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Group dotted keys by section: "" (top level), "gpu", "hbm", "hbm.device", ..."""
    groups: dict[str, dict[str, Any]] = {"": {}}
    top = ("base", "name")
    for key, value in flat.items():
        parts = key.split(".")
        head = parts[0]
        if len(parts) == 1:
            if head in _SECTIONS:
                raise ConfigFileError(path, key, value, "must be a table of fields, e.g. "
                                      f"[{head}]")
            if head not in top:
                raise ConfigFileError(path, key, value, "unknown field; choose one of: "
                                      + ", ".join((*top, *_SECTIONS)))
            groups[""][key] = value
            continue
        if head not in _SECTIONS:
            raise ConfigFileError(path, key, value, f"unknown section {head!r}; choose one of: "
                                  + ", ".join(_SECTIONS))
        section = head
        if head in _TIER_SECTIONS and parts[1] == "device":
            if len(parts) == 2:
                raise ConfigFileError(path, key, value, "must be a table of fields, e.g. "
                                      f"[{head}.device]")
            section = f"{head}.device"
        groups.setdefault(section, {})[key] = value
    return groups


def platform_from_dict(data: Mapping[str, Any], source: str | os.PathLike = "<dict>"
                       ) -> hardware.Platform:
    """Build a platform from a parsed file (nested tables and/or dotted keys).

    Args:
      data: the file's content, e.g. ``{"base": "pam-dgx-h100", "ddr": {"num_devices": 80}}``;
        see the module docstring for the format.
      source: the file name used in error messages.

    Returns:
      The :class:`~pamjax.hardware.Platform`.

    Raises:
      ConfigFileError: unknown field or preset, wrong type, invalid or missing value.
    """
    path = source
    groups = _split_sections(path, _flatten(path, data))
    top = groups.pop("")
    name = check_type(path, "name", top["name"], "str") if "name" in top else None
    if "base" in top:
        base_name = check_type(path, "base", top["base"], "str")
        if base_name not in hardware.PLATFORMS:
            raise ConfigFileError(path, "base", base_name, "unknown platform preset; choose "
                                  "one of: " + ", ".join(hardware.PLATFORMS))
        base = hardware.get_platform(base_name)
    else:
        base = None
        missing = [s for s in (*_SECTIONS[:-1], *(f"{t}.device" for t in _TIER_SECTIONS))
                   if s not in groups]
        if missing:
            raise ConfigFileError(path, missing[0], None, "missing section (required "
                                  "without 'base'; or start from base = \"pam-dgx-h100\")")

    gpu_values = _section_values(path, "gpu", hardware.Gpu, groups.get("gpu", {}))
    energy_values = _section_values(path, "energy", hardware.Energy, groups.get("energy", {}))
    if base is None:
        _require(path, "gpu", hardware.Gpu, gpu_values, excluded=("name",))
        gpu_values.setdefault("name", "gpu")
    parts = {"gpu": _build(path, hardware.Gpu, "gpu", gpu_values, base and base.gpu),
             "energy": _build(path, hardware.Energy, "energy", energy_values,
                              base and base.energy)}
    for tier in _TIER_SECTIONS:
        device_cls = _DEVICE_TYPES[tier]
        device_values = _section_values(path, f"{tier}.device", device_cls,
                                        groups.get(f"{tier}.device", {}))
        tier_values = _section_values(path, tier, hardware.Tier, groups.get(tier, {}),
                                      excluded=("name", "device"))
        if base is None:
            _require(path, f"{tier}.device", device_cls, device_values, excluded=("name",))
            _require(path, tier, hardware.Tier, tier_values, excluded=("name", "device"))
            device_values.setdefault("name", f"{tier}-device")
            device = _build(path, device_cls, f"{tier}.device", device_values)
            parts[tier] = _build(path, hardware.Tier, tier,
                                 {"name": tier, "device": device, **tier_values})
        else:
            current = getattr(base, tier)
            device = current.device
            if device_values:
                device = _build(path, device_cls, f"{tier}.device", device_values, device)
            parts[tier] = _build(path, hardware.Tier, tier, {"device": device, **tier_values},
                                 current)
    return hardware.Platform(name=name or default_name(path), **parts)


def load_platform_file(path: str | os.PathLike) -> hardware.Platform:
    """Read a platform from a ``.toml`` or ``.json`` file (format: module docstring).

    Args:
      path: the file.

    Returns:
      The :class:`~pamjax.hardware.Platform`, usable wherever a preset platform is
      (``simulation.simulate(platform=...)``, ``systems.make_params``, ``bounds.bound``).

    Raises:
      ConfigFileError: the file is missing, unreadable, empty, binary or malformed (with the
        parser's line number), or a field is unknown, of the wrong type or invalid.
    """
    path = pathlib.Path(path)
    return platform_from_dict(_read_mapping(path), path)


# -- models -----------------------------------------------------------------------------------

_BYTE_FIELDS = ("weight_bytes_per_value", "kv_bytes_per_value")
_LEGACY_BYTES = "bytes_per_value"  # before the two widths were separate: sets both


def model_from_dict(data: Mapping[str, Any], source: str | os.PathLike = "<dict>"
                    ) -> models.Model:
    """Build a model from a parsed file: Model fields at the top level, optional ``base``;
    or a Hugging Face ``config.json`` (a ``model_type`` or ``architectures`` key), which
    :func:`pamjax.hf_config.model_from_hf_config` translates.

    Args:
      data: e.g. ``{"layers": 32, "q_heads": 32, ...}``; see the module docstring.
      source: the file name used in error messages.

    Returns:
      The :class:`~pamjax.models.Model`.

    Raises:
      ConfigFileError: unknown field or preset, wrong type, invalid or missing value (for a
        Hugging Face config: an unsupported ``model_type`` or a missing key).
    """
    path = source
    if "model_type" in data or "architectures" in data:
        return model_from_hf_config(data, path)
    flat = _flatten(path, data)
    base = None
    if "base" in flat:
        base_name = check_type(path, "base", flat.pop("base"), "str")
        if base_name not in models.MODELS:
            raise ConfigFileError(path, "base", base_name, "unknown model preset; choose one "
                                  "of: " + ", ".join(models.MODELS))
        base = models.get_model(base_name)
    both = {}
    if _LEGACY_BYTES in flat:
        width = check_type(path, _LEGACY_BYTES, flat.pop(_LEGACY_BYTES), "int")
        if width <= 0:
            raise ConfigFileError(path, _LEGACY_BYTES, width, "must be a positive integer")
        for field in _BYTE_FIELDS:
            if field in flat:
                raise ConfigFileError(path, _LEGACY_BYTES, width, f"conflicts with {field}: "
                                      f"{_LEGACY_BYTES} sets both {' and '.join(_BYTE_FIELDS)}; "
                                      f"give it or them, not both")
        both = dict.fromkeys(_BYTE_FIELDS, width)
    values = _section_values(path, "", models.Model, flat)
    values.update(both)
    if base is None:
        _require(path, "", models.Model, values, excluded=("name",))
    values.setdefault("name", default_name(path))
    return _build(path, models.Model, "", values, base)


def load_model_file(path: str | os.PathLike) -> models.Model:
    """Read a model from a ``.toml`` or ``.json`` file (format: module docstring), or from
    a Hugging Face ``config.json``.

    Args:
      path: the file.

    Returns:
      The :class:`~pamjax.models.Model`, usable wherever a preset is accepted as an object
      (``systems.make_params``, ``simulation.simulate``, ``bounds.bound``).

    Raises:
      ConfigFileError: as for :func:`load_platform_file`.
    """
    path = pathlib.Path(path)
    return model_from_dict(_read_mapping(path), path)


# -- writing ----------------------------------------------------------------------------------

def platform_to_dict(platform: hardware.Platform) -> dict[str, Any]:
    """The full description of ``platform``: ``{"name", "gpu", "hbm", "ddr", "ssd", "energy"}``
    with every field, each tier's device under ``"device"``; reading it back gives an equal
    Platform."""
    out: dict[str, Any] = {"name": platform.name}
    out["gpu"] = dataclasses.asdict(platform.gpu)
    for tier in platform.tiers:
        values = dataclasses.asdict(tier)
        del values["name"]
        out[tier.name] = values
    out["energy"] = dataclasses.asdict(platform.energy)
    return out


def model_to_dict(model: models.Model) -> dict[str, Any]:
    """Every field of ``model`` by name; reading it back gives an equal Model."""
    return dataclasses.asdict(model)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    return repr(value)


def _toml(data: Mapping[str, Any], table: str = "") -> list[str]:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = ([f"[{table}]"] if table and scalars else []) + scalars
    for key, value in data.items():
        if isinstance(value, dict):
            sub = _toml(value, f"{table}.{key}" if table else key)
            lines += ([""] if lines else []) + sub
    return lines


def write_config_file(obj: hardware.Platform | models.Model, path: str | os.PathLike
                      ) -> pathlib.Path:
    """Write a platform or model as a full description (TOML or JSON, by suffix).

    Args:
      obj: a :class:`~pamjax.hardware.Platform` or :class:`~pamjax.models.Model`.
      path: destination ``.toml`` or ``.json`` file; its parent directory must exist.

    Returns:
      The path written; :func:`load_platform_file` / :func:`load_model_file` read it back
      to an object equal to ``obj``.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigFileError(path, None, None, f"unknown file type {path.suffix or '(none)'!r};"
                              f" use one of {', '.join(SUFFIXES)}")
    if isinstance(obj, hardware.Platform):
        data = platform_to_dict(obj)
    elif isinstance(obj, models.Model):
        data = model_to_dict(obj)
    else:
        raise ConfigError("obj", type(obj).__name__, "must be a Platform or a Model")
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        path.write_text("\n".join(_toml(data)) + "\n", encoding="utf-8")
    return path


# -- systems ----------------------------------------------------------------------------------

def _policy_codes(field: str) -> dict[str, int]:
    """Named codes of an integer ``<kind>_policy`` field, from pamjax.types constants:
    ``placement_policy`` -> {"fastest-first": 0, "importance-ratio": 1} (PLACEMENT_*)."""
    from pamjax import types

    if not field.endswith("_policy"):
        return {}
    prefix = field[:-len("_policy")].upper() + "_"
    return {name[len(prefix):].lower().replace("_", "-"): value
            for name, value in vars(types).items()
            if name.startswith(prefix) and isinstance(value, int)
            and not isinstance(value, bool)}


def _system_value(path, field: str, value, kind: str):
    """One checked System field value: the generic types, plus string tuples (tiers) and
    named policy codes; integers >= 0, floats finite and > 0."""
    from pamjax.hardware import TIER_NAMES

    if kind.startswith("tuple[str"):
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) for v in value):
            raise ConfigFileError(path, field, value, "must be a non-empty list of names")
        if field == "tiers":
            for v in value:
                if v not in TIER_NAMES:
                    raise ConfigFileError(path, field, value, f"unknown tier {v!r}; choose "
                                          f"from {', '.join(TIER_NAMES)}")
            if len(set(value)) != len(value):
                raise ConfigFileError(path, field, value, "names a tier twice")
        return tuple(value)
    codes = _policy_codes(field) if kind == "int" else {}
    if codes:
        if isinstance(value, str) and value in codes:
            return codes[value]
        if isinstance(value, int) and not isinstance(value, bool) and value in codes.values():
            return value
        raise ConfigFileError(path, field, value, "choose one of: " + ", ".join(
            f"{name!r} ({code})" for name, code in codes.items()))
    value = check_type(path, field, value, kind)
    if kind == "int" and value < 0:
        raise ConfigFileError(path, field, value, "must be >= 0")
    if kind == "float" and not value > 0:
        raise ConfigFileError(path, field, value, "must be > 0")
    return value


def system_from_dict(data: Mapping[str, Any], source: str | os.PathLike = "<dict>"):
    """Build a :class:`~pamjax.systems.System` from a parsed file.

    Top-level keys are the System's fields (``dataclasses.fields(System)``), checked by
    their annotated types: booleans, integers >= 0 (a ``<kind>_policy`` code also by its
    name in pamjax.types, e.g. ``placement_policy = "importance-ratio"``), floats finite
    and > 0, ``tiers`` a list of tier names. ``base = "pam"`` starts from a preset system,
    after which every field is optional; without it every field without a default must be
    given. ``name`` defaults to the file stem, holds letters, digits, ``.``, ``_`` and
    ``-`` only (it names output files), and may not be a preset's name unless the fields
    are that preset's (the rows of a study name their system).

    Raises:
      ConfigFileError: unknown field or preset, wrong type, invalid or missing value.
    """
    from pamjax import systems

    path = source
    flat = dict(data)
    base = None
    if "base" in flat:
        base_name = check_type(path, "base", flat.pop("base"), "str")
        if base_name not in systems.SYSTEMS:
            raise ConfigFileError(path, "base", base_name, "unknown system preset; choose "
                                  "one of: " + ", ".join(systems.SYSTEMS))
        base = systems.SYSTEMS[base_name]
    kinds = _fields(systems.System)
    values = {}
    for key, value in flat.items():
        if key not in kinds:
            raise ConfigFileError(path, key, value, "unknown field; choose one of: base, "
                                  + ", ".join(kinds))
        values[key] = _system_value(path, key, value, kinds[key])
    if base is None:
        _require(path, "", systems.System, values, excluded=("name",))
    values.setdefault("name", default_name(path))
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", values["name"]):
        raise ConfigFileError(path, "name", values["name"], "use letters, digits, '.', '_' "
                              "and '-' only (it names output files)")
    system = _build(path, systems.System, "", values, base)
    preset = systems.SYSTEMS.get(system.name)
    if preset is not None and preset != system:
        raise ConfigFileError(path, "name", system.name, "is a preset system's name and "
                              "these fields differ from it; give the system another name")
    try:  # whatever make_params refuses (e.g. a value it has no meaning for) fails here
        systems.make_params(system, "llama3-8b")
    except ConfigError as err:
        raise ConfigFileError(path, str(err.field).rsplit(".", 1)[-1], err.value,
                              err.reason) from None
    return system


def load_system_file(path: str | os.PathLike):
    """Read a system from a ``.toml`` or ``.json`` file (see :func:`system_from_dict`).

    Example (``examples/systems/pam-hbm-ddr.toml``)::

        base = "pam"
        name = "pam-hbm-ddr"
        tiers = ["hbm", "ddr"]

    Raises:
      ConfigFileError: as for :func:`load_platform_file`.
    """
    path = pathlib.Path(path)
    return system_from_dict(_read_mapping(path), path)


# -- knobs ------------------------------------------------------------------------------------

def _knob_value(name: str, text: str, kind: str):
    """``text`` as the type annotated on the Knobs field (``int``, ``float``, ``str``,
    ``bool``, optionally ``| None`` spelled "none")."""
    field = f"--knob {name}"
    kinds = [k.strip() for k in kind.split("|")]
    if "None" in kinds and text.strip().lower() == "none":
        return None
    base = next(k for k in kinds if k != "None")
    if base == "bool":
        if text.lower() not in ("true", "false"):
            raise ConfigError(field, text, "must be true or false")
        return text.lower() == "true"
    if base == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(field, text, "must be an integer") from None
    if base == "float":
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(field, text, "must be a number"
                              + (" or none" if "None" in kinds else "")) from None
        if not math.isfinite(value):
            raise ConfigError(field, text, "must be a finite number")
        return value
    if not text:
        raise ConfigError(field, text, "must be a non-empty string")
    return text


def knobs_from_assignments(assignments, base=None):
    """:class:`~pamjax.systems.Knobs` from ``NAME=VALUE`` strings (the ``--knob`` option).

    Names are the fields of Knobs (``dataclasses.fields``); values are parsed by the
    field's annotated type and then checked by Knobs itself.

    Args:
      assignments: e.g. ``["prefill_token_budget=16384", "target_rule=throughput"]``.
      base: the Knobs to start from (default ``Knobs()``).

    Raises:
      ConfigError: not NAME=VALUE, an unknown name (the valid ones listed), a name given
        twice, or a bad value (naming the knob).
    """
    from pamjax.errors import UnknownNameError
    from pamjax.systems import Knobs

    kinds = _fields(Knobs)
    values = {}
    for item in assignments or ():
        name, sep, text = (s.strip() for s in item.partition("="))
        if not sep or not name:
            raise ConfigError("--knob", item, "must be NAME=VALUE, e.g. "
                              "prefill_token_budget=16384")
        if name not in kinds:
            raise ConfigError("--knob", item, f"unknown knob {name!r}; choose one of: "
                              + ", ".join(kinds))
        if name in values:
            raise ConfigError("--knob", item, f"{name} is given twice")
        values[name] = _knob_value(name, text, kinds[name])
    try:
        return dataclasses.replace(base or Knobs(), **values)
    except UnknownNameError as err:
        raise ConfigError(f"--knob {_knob_named(values, err.name)}", err.name,
                          f"unknown {err.kind}; choose one of: {', '.join(err.choices)}") \
            from None
    except ConfigError as err:
        raise ConfigError(f"--knob {str(err.field).rsplit('.', 1)[-1]}", err.value,
                          err.reason) from None


def _knob_named(values: dict, value) -> str:
    """The knob that holds ``value`` (for errors the dataclass raises by value)."""
    return next((k for k, v in values.items() if v == value), "?")


# -- plausibility -----------------------------------------------------------------------------

def platform_warnings(platform: hardware.Platform) -> list[str]:
    """Suspicious, though valid, proportions of a platform, one sentence each.

    The rule: the GPUs' HBM *is* the HBM-PIM tier (PAM puts PIM in the GPUs' own stacks),
    so when the GPU is the preset's (same ``gpu.hbm_tbps``, i.e. the same GPU memory
    system) the tier must have the preset's stacks per GPU (an H100 SXM carries 5):
    ``hbm.num_devices == 5 x gpu.num_gpus``. A platform that changes ``gpu.num_gpus``
    alone keeps the preset's 40 stacks, i.e. the HBM capacity and PIM bandwidth of 8
    GPUs. With another GPU memory system (``gpu.hbm_tbps`` changed) the stack count is
    the file's business and nothing is said.

    Returns:
      warnings (empty for the presets).
    """
    preset = hardware.get_platform()
    if platform.gpu.hbm_tbps != preset.gpu.hbm_tbps:
        return []
    per_gpu = preset.hbm.num_devices / preset.gpu.num_gpus
    expected = per_gpu * platform.gpu.num_gpus
    if platform.hbm.num_devices == expected:
        return []
    gpus, stacks = platform.gpu.num_gpus, platform.hbm.num_devices
    return [(f"platform {platform.name}: {stacks} HBM stacks for {gpus} GPU(s) "
             f"({stacks / gpus:g} per GPU), but the preset's GPU carries {per_gpu:g}; HBM "
             f"capacity and PIM bandwidth follow the stacks (set hbm.num_devices = "
             f"{expected:g} for {gpus} such GPU(s), or change gpu.hbm_tbps for another GPU)")]
