"""What produced an output: the provenance record every written JSON and CSV carries.

One function, :func:`record`, builds it from the objects a command simulated, so every
writer says the same things in the same words:

* ``pamjax_version`` and ``command`` (the exact argv, ``["pamjax", ...]``; None from Python);
* ``platform``: its name, where it came from (``"preset"`` or the file path), the preset
  it is compared with, ``hash`` (the first 16 hex digits of the SHA-256 of its resolved
  fields as sorted JSON, names left out, so two files describing the same hardware share
  it) and ``differs_from_preset`` ({dotted field: {"value", "preset"}}, every field that
  differs, e.g. ``"ddr.num_devices"``);
* ``model``: name, source and every resolved field;
* ``systems``: per system its name, source (``"preset"`` or a ``--system-file`` path) and
  fields;
* ``knobs`` and ``access_model``: every field, and those that differ from the defaults;
* ``workload`` (when given) and ``seed``.

Fields are read generically (``dataclasses.fields``), so a field added to or removed from
Platform, Model, System, Knobs or AccessModel appears or disappears here by itself.

Determinism: nothing here depends on the clock, the host or the working directory, so the
same command gives the same record (JSON keys are sorted by studies.report.write_json).
CSV files get the record in a sidecar ``<stem>.meta.json`` (studies.report.write_csv)
rather than in comment lines, which many CSV readers (pandas without ``comment=``, Excel,
csv.DictReader) take for data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pamjax.config_files import platform_to_dict
from pamjax.hardware import PLATFORMS, Platform, get_platform
from pamjax.locality import AccessModel
from pamjax.models import MODELS, Model, get_model
from pamjax.systems import SYSTEMS, Knobs, System, get_system

PRESET = "preset"
"""Source of an object that came from pamjax's own tables (not a file)."""

DEFAULT_PLATFORM = "pam-dgx-h100"


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf}, tuples as lists."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _physical_fields(platform: Platform) -> dict[str, Any]:
    """Every resolved field of ``platform`` by dotted path, names left out."""
    return {k: v for k, v in _flat(platform_to_dict(platform)).items()
            if k.rsplit(".", 1)[-1] != "name"}


def platform_hash(platform: Platform) -> str:
    """First 16 hex digits of the SHA-256 of the platform's resolved fields (names left
    out) as sorted JSON: equal hardware, equal hash."""
    text = json.dumps(_physical_fields(platform), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_platform(platform: Platform | None, source: str | None = None) -> dict:
    """The provenance of a platform (None = the default preset).

    Args:
      platform: the Platform simulated; source: the file it came from (None: a preset).

    Returns:
      {name, source, preset, hash, differs_from_preset}.
    """
    platform = platform or get_platform()
    preset_name = platform.name if platform.name in PLATFORMS else DEFAULT_PLATFORM
    mine, preset = _physical_fields(platform), _physical_fields(get_platform(preset_name))
    differs = {k: {"value": v, "preset": preset.get(k)} for k, v in mine.items()
               if preset.get(k) != v}
    return {"name": platform.name, "source": str(source) if source else PRESET,
            "preset": preset_name, "hash": platform_hash(platform),
            "differs_from_preset": differs}


def _fields(obj) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(obj).items()}


def describe_model(model: Model | str, source: str | None = None) -> dict:
    """{name, source, fields} of a model (a preset name or a Model, e.g. from a file)."""
    model = get_model(model) if isinstance(model, str) else model
    from_preset = source is None and MODELS.get(model.name) == model
    return {"name": model.name, "source": PRESET if from_preset else str(source or "python"),
            "fields": _fields(model)}


def describe_system(system: System | str, source: str | None = None) -> dict:
    """{name, source, fields} of a system (a preset name or a System, e.g. from a file)."""
    system = get_system(system) if isinstance(system, str) else system
    from_preset = source is None and SYSTEMS.get(system.name) == system
    return {"name": system.name, "source": PRESET if from_preset else str(source or "python"),
            "fields": _fields(system)}


def _with_defaults(obj, cls) -> dict:
    """{fields, differs_from_default} of a Knobs or AccessModel (None = the defaults)."""
    obj = obj if obj is not None else cls()
    mine, default = _fields(obj), _fields(cls())
    return {"fields": mine,
            "differs_from_default": {k: v for k, v in mine.items() if default[k] != v}}


def command_record(argv=None, **extra) -> dict:
    """The part of a record every command has: ``pamjax_version``, ``command`` (the argv
    after ``pamjax``; None from Python) and ``extra`` as given. Commands whose setup is
    fixed by their module (``reproduce``, ``bench``, ``train-policy``) record this and say
    where the setup is described."""
    from pamjax import __version__

    return {"pamjax_version": __version__,
            "command": ["pamjax", *argv] if argv is not None else None, **extra}


def record(*, argv=None, platform: Platform | None = None, platform_source=None,
           model: Model | str | None = None, model_source=None, systems=(),
           system_sources: dict | None = None, knobs: Knobs | None = None,
           access: AccessModel | None = None, seed=None, workload: dict | None = None,
           **extra) -> dict:
    """The provenance record of one output (see the module docstring for the keys).

    Args:
      argv: the command line after ``pamjax`` (None: not run from the command line).
      platform, platform_source: the Platform (None = the preset) and its file, if any.
      model, model_source: the model (name or Model) and its file, if any.
      systems: the systems simulated (names or System objects), in order.
      system_sources: {system name: file} for systems read from files.
      knobs, access: modelling knobs and access model (None = the defaults).
      seed: the seed (or list of seeds); workload: what was replayed, e.g. {name, source,
        requests}.
      extra: further entries, stored as given (e.g. the sweep's hardware overrides).

    Returns:
      a JSON-ready dict.
    """
    system_sources = system_sources or {}
    out = command_record(argv)
    out.update({
        "platform": describe_platform(platform, platform_source),
        "model": describe_model(model or "llama3-70b", model_source),
        "systems": [describe_system(s, system_sources.get(getattr(s, "name", s)))
                    for s in systems],
        "knobs": _with_defaults(knobs, Knobs),
        "access_model": _with_defaults(access, AccessModel),
        "seed": seed,
    })
    if workload is not None:
        out["workload"] = workload
    out.update(extra)
    return out


def summary_line(prov: dict) -> str:
    """One line naming the platform, model, knobs, access model and seed of a record."""
    p, m = prov["platform"], prov["model"]
    where = "preset" if p["source"] == PRESET else p["source"]
    changed = len(p["differs_from_preset"])
    platform = (f"platform {p['name']} ({where}, hash {p['hash']}"
                + (f", {changed} field(s) differ from {p['preset']})" if changed else ")"))
    model = f"model {m['name']} ({'preset' if m['source'] == PRESET else m['source']})"

    def changes(entry):
        diff = entry["differs_from_default"]
        return ", ".join(f"{k}={v}" for k, v in diff.items()) if diff else "defaults"

    return (f"{platform}; {model}; knobs {changes(prov['knobs'])}; access model "
            f"{changes(prov['access_model'])}; seed {prov['seed']}")
