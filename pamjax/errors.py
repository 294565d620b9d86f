"""Exception types raised by pamjax.

Every error names the offending input (field, value, file, line) so that a user can fix it
without reading a traceback. The CLI catches :class:`PamjaxError` and prints its message as
one line on stderr with a non-zero exit status.
"""

from __future__ import annotations


class PamjaxError(Exception):
    """Base class of every error pamjax raises on purpose."""


class ConfigError(PamjaxError, ValueError):
    """A configuration field holds an invalid value.

    Attributes:
      field: dotted name of the field, e.g. ``"hbm.clock_ghz"``.
      value: the rejected value.
      reason: what is wrong with it.
    """

    def __init__(self, field: str, value, reason: str):
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"invalid {field}={value!r}: {reason}")


class UnknownNameError(PamjaxError, ValueError):
    """A preset, system, workload or tier name that pamjax does not know.

    Attributes:
      kind: what was looked up, e.g. ``"model"``.
      name: the unknown name.
      choices: the names that exist, as a tuple.
    """

    def __init__(self, kind: str, name: str, choices):
        self.kind, self.name, self.choices = kind, name, tuple(choices)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.choices)}")


class TraceFormatError(PamjaxError, ValueError):
    """A trace or score file is missing, empty, truncated or malformed.

    Attributes:
      path: the file.
      line: 1-based line number of the problem (0 when the file as a whole is wrong).
      reason: what is wrong.
    """

    def __init__(self, path, line: int, reason: str):
        self.path, self.line, self.reason = str(path), int(line), reason
        where = f"{self.path}:{self.line}" if self.line else self.path
        super().__init__(f"{where}: {reason}")


class CapacityError(PamjaxError, ValueError):
    """A configuration cannot hold even a single request (or its model weights).

    It carries only its message, which names the model, its weight bytes and the capacity
    that cannot hold them.
    """


class ConfigFileError(ConfigError):
    """A platform or model file that cannot be used.

    Attributes:
      path: the file, as given.
      line: 1-based line of a syntax error (0 when the parser gave none or the problem is a
        value rather than the syntax).
      field: dotted field path (e.g. ``"hbm.device.tCCD_L"``), or ``None`` when the file as
        a whole is wrong.
      value: the rejected value (``None`` with no field).
      reason: what is wrong.
    """

    def __init__(self, path, field: str | None, value, reason: str, line: int = 0):
        super().__init__(field, value, reason)
        self.path, self.line = str(path), int(line)
        where = f"{self.path}:{self.line}" if self.line else self.path
        what = f"invalid {field}={value!r}: {reason}" if field else reason
        self.args = (f"{where}: {what}",)
