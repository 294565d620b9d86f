"""Writing results: CSV and JSON files with deterministic layout (sorted keys, fixed columns).

A CSV's provenance (pamjax.provenance) goes to a sidecar ``<stem>.meta.json`` beside it
(:func:`meta_path`), not into comment lines, which many CSV readers take for data.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib

from pamjax.errors import PamjaxError


def _plain(value):
    """JSON/CSV-safe scalar: numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def writable_path(path) -> pathlib.Path:
    """``path`` as a Path whose folder exists (created if needed).

    Commands call it before a long run, so a bad output path fails at once, not after.

    Raises:
      PamjaxError: the path is a folder, or its folder cannot be created.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise PamjaxError(f"{path}: is a directory; give a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PamjaxError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None
    return path


def _write_text(path: pathlib.Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise PamjaxError(f"{path}: cannot write ({exc.strerror or exc})") from None


def meta_path(path) -> pathlib.Path:
    """The provenance sidecar of a CSV: ``DIR/name.csv`` -> ``DIR/name.meta.json``."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.stem}.meta.json")


def write_csv(path, rows: list[dict], columns: list[str], *, provenance: dict | None = None,
              meta: dict | None = None) -> pathlib.Path:
    """Write ``rows`` with exactly ``columns`` (missing keys are empty) and return the path.

    Args:
      path: the CSV file (its folder is created; an existing file is replaced).
      rows: one dict per row; numpy scalars become Python numbers, NaN/inf empty cells.
      columns: the header, in order.
      provenance: a pamjax.provenance record; when given, it is written to the sidecar
        :func:`meta_path` as ``{"provenance": ..., "columns": ..., **meta}``.
      meta: further sidecar entries (e.g. the units or bin width of the columns).

    Returns:
      The path written, as a :class:`pathlib.Path`.

    Raises:
      PamjaxError: the path is a folder, or it cannot be created or written.
    """
    path = writable_path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if _plain(row.get(c)) is None else _plain(row.get(c))
                         for c in columns])
    _write_text(path, buffer.getvalue())
    if provenance is not None:
        write_json(meta_path(path), {"provenance": provenance, "columns": list(columns),
                                     **(meta or {})})
    return path


def write_json(path, payload) -> pathlib.Path:
    """Write ``payload`` as indented JSON with sorted keys (byte-identical for equal input).

    Args:
      path: the JSON file (its folder is created; an existing file is replaced).
      payload: dicts, lists, tuples and scalars; numpy scalars become Python numbers,
        NaN/inf become null, dict keys become strings.

    Returns:
      The path written, as a :class:`pathlib.Path`.

    Raises:
      PamjaxError: the path is a folder, or it cannot be created or written.
    """
    path = writable_path(path)

    def clean(obj):
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return _plain(obj)

    _write_text(path, json.dumps(clean(payload), indent=2, sort_keys=True) + "\n")
    return path
