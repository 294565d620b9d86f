"""Engine speed benchmark: a thin wrapper around ``pamjax.studies.bench`` (also ``pamjax bench``).

Usage: python experiments/engine_benchmark.py [--quick] [--json PATH]

The figures, their definitions and targets are documented in pamjax/studies/bench.py; the Azure
trace is read from $PAMJAX_TRACE or ../shared/traces/azure_llm_2023_conv.csv.
"""

from __future__ import annotations

import argparse

from pamjax.compile_cache import enable_compilation_cache
from pamjax.studies.bench import bench_command


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small cases (a few minutes on a 2-core CPU)")
    parser.add_argument("--json", default=None, help="write the figures as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args()
    enable_compilation_cache()
    bench_command(quick=args.quick, json_path=args.json, progress=not args.quiet)


if __name__ == "__main__":
    main()
