"""Checked values read from configuration files (shared by config_files and hf_config).

Every problem is a :class:`pamjax.errors.ConfigFileError` naming the file, the field and the
value, so a bad file never surfaces as a traceback.
"""

from __future__ import annotations

import math
import pathlib

from pamjax.errors import ConfigFileError


def check_type(path, field: str, value, kind: str):
    """Return ``value`` as the field's type, or raise naming the field and the type."""
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigFileError(path, field, value, "must be a non-empty string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigFileError(path, field, value, "must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigFileError(path, field, value, f"must be a number, not {type_name(value)}")
    if not math.isfinite(value):
        raise ConfigFileError(path, field, value, "must be a finite number")
    if kind == "int":
        if not isinstance(value, int):
            raise ConfigFileError(path, field, value, "must be an integer")
        return value
    return float(value)


def type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def default_name(source) -> str:
    """The file stem, or "custom" for a dict that came from no file."""
    return "custom" if source == "<dict>" else pathlib.Path(source).stem
