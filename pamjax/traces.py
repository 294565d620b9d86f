"""Request traces: the Azure LLM inference format and a plain CSV, read and written.

:func:`load_trace` reads two CSV formats, chosen by the header: the Azure LLM inference trace
(``TIMESTAMP,ContextTokens,GeneratedTokens``, arrivals become seconds since the first request) and
the plain ``arrival_s,prompt_tokens,output_tokens`` format that :func:`save_trace` writes (arrivals
kept as written). Both must be in non-decreasing time order: a trace out of order is refused with
the offending line rather than silently re-sorted, because a reordered log usually means a merged
or corrupted file. Every malformed input is a :class:`pamjax.errors.TraceFormatError` naming the
file and the 1-based line.
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import re

import numpy as np

from pamjax.errors import ConfigError, TraceFormatError
from pamjax.workload import Workload

DEFAULT_TRACE_ENV = "PAMJAX_TRACE"
"""Environment variable naming the Azure conversation trace (default_azure_trace_path)."""

_INT32_MAX = int(np.iinfo(np.int32).max)

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_PLAIN_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
_FORMATS = {"Azure": _AZURE_COLUMNS, "plain": _PLAIN_COLUMNS}

# ISO-like timestamps as Azure writes them; the fraction may have any number of digits (Azure
# writes 7, one more than datetime.fromisoformat takes before Python 3.11) and a UTC offset is
# optional (the 2024 Azure traces append "+00:00").
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?"
)


def default_azure_trace_path() -> pathlib.Path | None:
    """Locates the Azure conversation trace without copying it into the repository.

    Returns:
      ``$PAMJAX_TRACE`` as a path when that variable is set (whether or not the file exists),
      else ``<repo root>/../shared/traces/azure_llm_2023_conv.csv`` when that file exists,
      else ``None``.
    """
    env = os.environ.get(DEFAULT_TRACE_ENV)
    if env:
        return pathlib.Path(env)
    repo_root = pathlib.Path(__file__).resolve().parent.parent
    candidate = (repo_root / ".." / "shared" / "traces" / "azure_llm_2023_conv.csv").resolve()
    return candidate if candidate.is_file() else None


def load_trace(
    path: str | os.PathLike, *, max_requests: int | None = None, time_scale: float = 1.0
) -> Workload:
    """Loads a request trace, detecting the format from its header.

    Formats (header names match case-insensitively, in any column order; extra columns are
    ignored, blank lines skipped, a UTF-8 byte-order mark and CRLF line ends accepted):

    * Azure LLM inference trace: ``TIMESTAMP,ContextTokens,GeneratedTokens`` with timestamps such
      as ``2023-11-16 18:15:46.6805900`` (any number of fractional digits, optional ``Z`` or
      ``+HH:MM`` offset). Arrival = seconds since the first request, exact to the nanosecond.
    * Plain: ``arrival_s,prompt_tokens,output_tokens``, arrival in seconds (>= 0) kept as written.

    Rows must be in non-decreasing time order. Token counts must be whole numbers >= 1, and a
    request's context (prompt + output) at most 2**31 - 1 tokens.

    Args:
      path: the CSV file.
      max_requests: read only the first this many data rows (and validate only those);
        ``None`` reads all.
      time_scale: factor applied to every arrival time, > 0; 0.5 replays the trace twice as fast.

    Returns:
      A :class:`Workload` named after the file stem: ``arrival_s`` float64 [N] seconds,
      ``prompt_tokens`` and ``output_tokens`` int32 [N] tokens.

    Raises:
      TraceFormatError: the file is missing, unreadable, empty, gzip-compressed, binary, has a
        missing or unknown header, a malformed row (with its 1-based line number), or no data
        rows.
      ConfigError: ``max_requests`` or ``time_scale`` is invalid.
    """
    if max_requests is not None and (
        isinstance(max_requests, bool)
        or not isinstance(max_requests, (int, np.integer))
        or max_requests < 1
    ):
        raise ConfigError("max_requests", max_requests, "must be an integer >= 1, or None")
    if not (
        isinstance(time_scale, (int, float, np.number))
        and math.isfinite(time_scale)
        and time_scale > 0
    ):
        raise ConfigError("time_scale", time_scale, "must be a finite number > 0")
    path = pathlib.Path(path)
    lines = _read_lines(path)
    header_index = next((i for i, text in enumerate(lines) if text.strip()), None)
    if header_index is None:
        raise TraceFormatError(path, 0, "empty file")
    fmt, columns = _parse_header(path, header_index + 1, lines[header_index])
    limit = max_requests if max_requests is not None else len(lines)
    read_time = _AzureClock() if fmt == "Azure" else _plain_arrival
    times, prompt, output = _parse_rows(path, lines, header_index + 1, columns, _FORMATS[fmt],
                                        read_time, limit)
    if not times:
        raise TraceFormatError(path, 0, "no data rows after the header")
    if fmt == "Azure":
        # Integer nanoseconds made relative to the first request before the conversion, so
        # float64 keeps full precision.
        arrival = np.asarray([t - times[0] for t in times], dtype=np.float64) / 1e9
    else:
        arrival = np.asarray(times, dtype=np.float64)
    return Workload(
        arrival * float(time_scale),
        np.asarray(prompt, dtype=np.int32),
        np.asarray(output, dtype=np.int32),
        path.stem,
    )


def _read_lines(path: pathlib.Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TraceFormatError(path, 0, "file not found") from None
    except IsADirectoryError:
        raise TraceFormatError(path, 0, "is a directory, not a trace file") from None
    except OSError as err:
        raise TraceFormatError(path, 0, f"cannot read: {err.strerror or err}") from None
    if data.startswith(b"\x1f\x8b"):
        raise TraceFormatError(path, 0, "gzip-compressed; decompress it first (gunzip)")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TraceFormatError(path, line, "binary content (NUL byte); expected a CSV text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TraceFormatError(path, line, "not UTF-8 text; expected a CSV text file") from None
    # split("\n") rather than splitlines(): the latter also breaks on form feeds and other
    # separators, which would shift the reported line numbers.
    return [line.rstrip("\r") for line in text.split("\n")]


def _parse_header(path: pathlib.Path, line: int, text: str) -> tuple[str, list[int]]:
    names = [field.strip().lower() for field in text.split(",")]
    for name in names:
        if names.count(name) > 1:
            raise TraceFormatError(path, line, f"header repeats column {name!r}")
    matches = {fmt: sum(c.lower() in names for c in cols) for fmt, cols in _FORMATS.items()}
    fmt = max(matches, key=matches.get)
    expected = " or ".join(f"{f} ({','.join(c)})" for f, c in _FORMATS.items())
    if matches[fmt] == 0:
        first = text.split(",")[0].strip()
        if _TIMESTAMP.fullmatch(first) or _is_float(first):
            raise TraceFormatError(path, line, f"no header row; the first line must be {expected}")
        raise TraceFormatError(path, line, f"unknown header {text.strip()!r}; expected {expected}")
    missing = [c for c in _FORMATS[fmt] if c.lower() not in names]
    if missing:
        raise TraceFormatError(
            path, line, f"header lacks column(s) {', '.join(missing)} of the {fmt} format"
        )
    return fmt, [names.index(c.lower()) for c in _FORMATS[fmt]]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_row(path: pathlib.Path, line: int, text: str, width: int) -> list[str]:
    fields = text.split(",")
    if len(fields) < width:
        raise TraceFormatError(
            path, line, f"truncated row: {len(fields)} field(s), the header has {width}"
        )
    if len(fields) > width:
        raise TraceFormatError(path, line, f"{len(fields)} fields, the header has only {width}")
    return fields


def _token_count(path: pathlib.Path, line: int, column: str, text: str) -> int:
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        value = _whole_float(path, line, column, text)
    if value < 1:
        raise TraceFormatError(path, line, f"{column} must be >= 1 token, got {value}")
    if value > _INT32_MAX:
        raise TraceFormatError(path, line, f"{column} {value} exceeds {_INT32_MAX}")
    return value


def _check_context(path: pathlib.Path, line: int, prompt: int, output: int) -> None:
    # The engine counts a request's positions in int32, so its whole context must fit.
    if prompt + output > _INT32_MAX:
        raise TraceFormatError(
            path, line, f"context {prompt} + {output} tokens exceeds {_INT32_MAX}"
        )


def _finite_float(path: pathlib.Path, line: int, column: str, text: str) -> float:
    """A finite number written in ``column``, else a TraceFormatError naming it."""
    try:
        value = float(text)
    except ValueError:
        what = "is empty" if not text else f"{text!r} is not a number"
        raise TraceFormatError(path, line, f"{column} {what}") from None
    if not math.isfinite(value):
        raise TraceFormatError(path, line, f"{column} {text!r} is not finite")
    return value


def _whole_float(path: pathlib.Path, line: int, column: str, text: str) -> int:
    # Accept "374.0": some exporters write integer columns as floats.
    value = _finite_float(path, line, column, text)
    if not value.is_integer():
        raise TraceFormatError(path, line, f"{column} {text!r} is not a whole number")
    return int(value)


def _plain_arrival(path: pathlib.Path, line: int, text: str, previous: float | None) -> float:
    """arrival_s of a plain-format row, in seconds: finite, >= 0, not before ``previous``."""
    arrival = _finite_float(path, line, "arrival_s", text)
    if arrival < 0:
        raise TraceFormatError(path, line, f"arrival_s {text!r} is negative")
    if previous is not None and arrival < previous:
        raise TraceFormatError(
            path, line, f"arrival_s {text!r} goes back in time (previous row {previous!r})"
        )
    return arrival


class _AzureClock:
    """Azure TIMESTAMPs as integer nanoseconds, checked to be in non-decreasing order."""

    def __init__(self):
        # A trace spans a handful of calendar days, so validating each date once is enough.
        self.day_cache: dict[str, int] = {}

    def __call__(self, path: pathlib.Path, line: int, text: str, previous: int | None) -> int:
        ns = _timestamp_ns(path, line, text, self.day_cache)
        if previous is not None and ns < previous:
            raise TraceFormatError(path, line, f"TIMESTAMP {text!r} goes back in time")
        return ns


def _parse_rows(path: pathlib.Path, lines: list[str], start: int, columns: list[int],
                names: tuple[str, str, str], read_time, limit: int):
    """Data rows of either format: (times, prompt tokens, output tokens) lists.

    ``read_time(path, line, text, previous)`` converts a time field (seconds, or Azure
    nanoseconds) and checks it against the previous row's; ``names`` are the three columns
    as the format calls them, for error messages.
    """
    width = len(lines[start - 1].split(","))
    i_time, i_prompt, i_output = columns
    times: list = []
    prompt: list[int] = []
    output: list[int] = []
    for index in range(start, len(lines)):
        if len(times) >= limit:
            break
        text = lines[index]
        if not text.strip():
            continue
        line = index + 1
        fields = _split_row(path, line, text, width)
        times.append(read_time(path, line, fields[i_time].strip(),
                               times[-1] if times else None))
        prompt.append(_token_count(path, line, names[1], fields[i_prompt]))
        output.append(_token_count(path, line, names[2], fields[i_output]))
        _check_context(path, line, prompt[-1], output[-1])
    return times, prompt, output


def _timestamp_ns(path: pathlib.Path, line: int, text: str, day_cache: dict[str, int]) -> int:
    """Parses one Azure timestamp into integer nanoseconds since 0001-01-01 UTC.

    ``datetime.strptime``'s ``%f`` takes at most six fractional digits and Azure writes seven;
    integer arithmetic on the regex groups keeps every digit exactly.
    """
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise TraceFormatError(
            path, line, f"TIMESTAMP {text!r} is not a date-time like 2023-11-16 18:15:46.6805900"
        )
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    date_key = text[:10]
    days = day_cache.get(date_key)
    if days is None:
        try:
            days = datetime.date(int(year), int(month), int(day)).toordinal()
        except ValueError as err:
            raise TraceFormatError(path, line, f"TIMESTAMP {text!r}: {err}") from None
        day_cache[date_key] = days
    h, m, s = int(hour), int(minute), int(second)
    if h > 23 or m > 59 or s > 59:
        raise TraceFormatError(path, line, f"TIMESTAMP {text!r} has an invalid time of day")
    seconds = days * 86_400 + h * 3_600 + m * 60 + s
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3_600 + int(digits[2:]) * 60)
    nanos = int((fraction or "0")[:9].ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


def save_trace(workload: Workload, path: str | os.PathLike) -> pathlib.Path:
    """Writes a workload in the plain ``arrival_s,prompt_tokens,output_tokens`` CSV format.

    Arrival times are written with ``repr``, the shortest text that reads back to the same
    float64, so ``load_trace(save_trace(w, p))`` reproduces ``w`` exactly.

    Args:
      workload: the requests to write (N rows).
      path: destination file; its parent directory must exist. An existing file is replaced.

    Returns:
      The path written, as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    rows = zip(
        workload.arrival_s.tolist(),
        workload.prompt_tokens.tolist(),
        workload.output_tokens.tolist(),
        strict=True,
    )
    body = "".join(f"{a!r},{p},{o}\n" for a, p, o in rows)
    path.write_text(",".join(_PLAIN_COLUMNS) + "\n" + body, encoding="utf-8")
    return path
