"""Test-session settings shared by every test module.

* Compiled programs are released after each module. Every XLA CPU executable holds its own
  memory mappings, and the suite compiles hundreds of engine programs: kept all together in
  one pytest process they reach the kernel's ``vm.max_map_count`` (65,530 by default), LLVM
  then fails with "Cannot allocate memory" and the process aborts or segfaults inside a
  compilation or a compilation-cache read (what CI saw, exit 134).
* The suite runs without the persistent compilation cache. Tests call ``pamjax.cli.main``
  in-process, which would turn the user's cache on for the rest of the process and make later
  tests depend on entries left by other runs. Tests of the cache itself pass their own
  ``PAMJAX_CACHE_DIR`` to a subprocess and remove ``PAMJAX_NO_CACHE`` from its environment.
"""

import gc
import os

import jax
import pytest

os.environ["PAMJAX_NO_CACHE"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program when a test module ends.

    Each XLA CPU executable keeps its own memory mappings; the suite compiles hundreds of
    engine programs, and one pytest process holding all of them reaches the kernel's
    ``vm.max_map_count`` (65,530 by default), after which LLVM fails with "Cannot allocate
    memory" and the process aborts. Modules share nothing compiled worth keeping.
    """
    yield
    jax.clear_caches()
    gc.collect()
