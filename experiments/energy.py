"""The PAM 'energy' study (see pamjax/studies/reproduce.py for the setup and CSV columns).

Usage: python experiments/energy.py [--quick] [--out DIR]
Writes DIR/energy.csv and DIR/energy.png (default DIR: experiments/out).
"""

import argparse

from pamjax.studies.reproduce import reproduce

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter simulated horizons")
    parser.add_argument("--out", default="experiments/out")
    args = parser.parse_args()
    reproduce("energy", args.out, quick=args.quick)
