"""Writing results: CSV and JSON files with deterministic layout (sorted keys, fixed columns)."""

from __future__ import annotations

import csv
import json
import math
import pathlib


def _plain(value):
    """JSON/CSV-safe scalar: numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(path, rows: list[dict], columns: list[str]) -> pathlib.Path:
    """Write ``rows`` with exactly ``columns`` (missing keys are empty) and return the path.

    Args:
      path: the CSV file (its folder is created; an existing file is replaced).
      rows: one dict per row; numpy scalars become Python numbers, NaN/inf empty cells.
      columns: the header, in order.

    Returns:
      The path written, as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if _plain(row.get(c)) is None else _plain(row.get(c))
                             for c in columns])
    return path


def write_json(path, payload) -> pathlib.Path:
    """Write ``payload`` as indented JSON with sorted keys (byte-identical for equal input).

    Args:
      path: the JSON file (its folder is created; an existing file is replaced).
      payload: dicts, lists, tuples and scalars; numpy scalars become Python numbers,
        NaN/inf become null, dict keys become strings.

    Returns:
      The path written, as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(obj):
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return _plain(obj)

    path.write_text(json.dumps(clean(payload), indent=2, sort_keys=True) + "\n")
    return path
