"""Test-session settings shared by every test module.

The command line turns on JAX's persistent compilation cache (``pamjax.compile_cache``) in
the user's cache folder. Tests call ``pamjax.cli.main`` in-process, which would switch that
cache on for the rest of the pytest process and make later tests read executables written by
other processes and other runs. A CPU executable that fails to deserialize aborts the process
(no Python exception), so one bad entry would end the whole session: the suite runs without
the cache. Tests of the cache itself pass their own ``PAMJAX_CACHE_DIR`` to a subprocess and
remove ``PAMJAX_NO_CACHE`` from that subprocess's environment.
"""

import os

os.environ["PAMJAX_NO_CACHE"] = "1"
