"""Persistent XLA compilation cache for the command line.

A simulation step compiles to a large XLA program (tens of seconds on a CPU), and every
``pamjax`` invocation would otherwise compile it again. With the cache on, JAX stores each
compiled executable on disk keyed by the program, the JAX/XLA versions and the devices, and a
later process with the same shapes loads it instead of compiling.

Location: ``$PAMJAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/pamjax/jax`` (default
``~/.cache/pamjax/jax``). ``PAMJAX_NO_CACHE=1`` turns it off. Entries are only written for
programs that took at least ``MIN_COMPILE_SECONDS`` to compile.
"""

from __future__ import annotations

import os
import pathlib

import jax

MIN_COMPILE_SECONDS = 1.0


def cache_dir() -> pathlib.Path:
    """The cache folder the environment asks for (not created)."""
    if os.environ.get("PAMJAX_CACHE_DIR"):
        return pathlib.Path(os.environ["PAMJAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "pamjax" / "jax"


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache (call before the first compilation).

    Returns:
      the cache folder, or None when ``PAMJAX_NO_CACHE`` is set to anything but ``0`` or the
      folder cannot be created (the cache only saves time, so this never raises).
    """
    if os.environ.get("PAMJAX_NO_CACHE", "0") not in ("", "0"):
        return None
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return str(path)
