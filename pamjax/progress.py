"""Progress of a long host loop on stderr, the one helper every loop of pamjax uses.

A tqdm bar when tqdm is installed (the ``progress`` extra), else one line rewritten in place
(``\\r``) and ended with a newline on close, and nothing at all when disabled. Progress never
goes to stdout, which carries the commands' tables.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``done`` out of ``total`` units of work (steps, requests, configurations, iterations).

    Use as a context manager, or call :meth:`close` at the end.

    Args:
      total: units of work in all.
      desc: what is running (the bar's label).
      unit: name of one unit (``"step"``, ``"req"``, ``"config"``, ...).
      enabled: False: show nothing.
      initial: units already done when the loop starts (e.g. a resumed sweep's).
    """

    def __init__(self, total: int, *, desc: str, unit: str, enabled: bool = True,
                 initial: int = 0):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.bar, self.start = initial, None, time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr,
                        leave=False)

    def update(self, n: int = 1, *, status: str | None = None) -> None:
        """Advance by ``n`` units; ``status`` is a short note shown beside the count."""
        self.moveto(self.done + n, status=status)

    def moveto(self, done: int, *, status: str | None = None) -> None:
        """Set the units done so far to ``done``."""
        if not self.enabled:
            return
        if self.bar is not None:
            if status is not None:
                self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(done - self.done)
        else:
            note = f", {status}" if status else ""
            print(f"\r  {self.desc}: {done}/{self.total} {self.unit}{note}, "
                  f"{time.perf_counter() - self.start:.0f} s", end="", file=sys.stderr,
                  flush=True)
        self.done = done

    def close(self) -> None:
        """Remove the bar (tqdm) or end the line."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
