"""Engine speed benchmark: `pamjax bench` as a script (code in ``pamjax.studies.bench``).

Usage: python experiments/engine_benchmark.py [--quick] [--json PATH] [--quiet]

The figures, their definitions and targets are documented in pamjax/studies/bench.py; the
Azure trace is read from $PAMJAX_TRACE or ../shared/traces/azure_llm_2023_conv.csv.
"""

from __future__ import annotations

import sys

from pamjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
