"""The processes of one multi-process job: start them, and let them exchange small messages.

A job of N processes (one per host, say) is started with :func:`initialize`, which checks
its arguments and calls ``jax.distributed.initialize`` (on CPU, with the gloo cross-process
collectives). Afterwards ``jax.devices()`` lists the devices of every process and
``jax.local_devices()`` this process's own. The processes then talk through
:func:`allgather_bytes` (every process gets every process's message, through
``multihost_utils.process_allgather``, i.e. a JAX collective), on which
:func:`broadcast_bytes` and :func:`check_same` are built. With one process all three are
local no-ops, so single-process code pays nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from pamjax.errors import ConfigError


def parse_coordinator(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[IPv6]:PORT"`` for an IPv6 address) -> (host, port).

    Raises:
      ConfigError naming ``coordinator`` when it is not HOST:PORT with a port in 1..65535.
    """
    host, sep, port = str(text).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise ConfigError("coordinator", text, "must be HOST:PORT, e.g. 10.0.0.1:1234, with a "
                          "port in 1..65535")
    return host, int(port)


def check_arguments(coordinator: str | None, num_processes: int | None,
                    process_id: int | None) -> bool:
    """Check the arguments of :func:`initialize`; True when they ask for a multi-process
    job, False when all three are None (a single process).

    Raises:
      ConfigError: only some of the three given, ``num_processes < 1``, ``process_id``
        outside ``0 .. num_processes - 1``, or a malformed ``coordinator``.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return False
    if not all(given):
        raise ConfigError("coordinator", coordinator, "--coordinator, --num-processes and "
                          "--process-id go together (every process of the job gets all three)")
    for field, value, low in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(field, value, f"must be an integer >= {low}")
    if process_id >= num_processes:
        raise ConfigError("process_id", process_id, f"must be below num_processes "
                          f"({num_processes}): processes are numbered 0..{num_processes - 1}")
    parse_coordinator(coordinator)
    return True


def initialize(coordinator: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """Join a job of ``num_processes`` processes as process ``process_id`` (nothing when
    all three are None). Call before any other JAX call of the process.

    Every process is started the same way with its own ``process_id``; process 0 runs the
    coordinator service at ``coordinator`` (``HOST:PORT``, an address of process 0's host
    that every process can reach).

    Raises:
      ConfigError: see :func:`check_arguments`.
    """
    if not check_arguments(coordinator, num_processes, process_id):
        return
    # CPU processes exchange data through gloo (TCP) unless the user chose another
    # implementation (e.g. mpi); GPUs and TPUs use their own collectives, and the setting
    # is only read by the CPU client.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's ``data``, indexed by process (a collective: every process must call
    it, the same number of times and in the same order)."""
    if jax.process_count() == 1:
        return [bytes(data)]
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int32))
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    # Pad to a power of two, so that the collective compiles for a few shapes only.
    width = 1 << (max(max(sizes), 1024) - 1).bit_length()
    padded = np.zeros(width, np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), width)
    return [row[:size].tobytes() for row, size in zip(rows, sizes)]


def broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's ``data`` on every process (the others pass anything, e.g. None; a
    collective, see :func:`allgather_bytes`)."""
    mine = data if jax.process_index() == 0 else b""
    return allgather_bytes(mine or b"")[0]


def check_same(field: str, data: bytes, what: str) -> None:
    """Raise the same ConfigError on every process unless every process passed the same
    ``data`` (a collective, see :func:`allgather_bytes`).

    Args:
      field, what: the ConfigError's field, and what ``data`` describes (for the message).
    """
    every = allgather_bytes(data)
    other = next((p for p, d in enumerate(every) if d != every[0]), None)
    if other is not None:
        raise ConfigError(field, f"process {other}", f"its {what} differ from process 0's; "
                          "start every process of the job with the same arguments")
