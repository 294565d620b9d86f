"""The PAM 'online' study (see pamjax/studies/reproduce.py for the setup and CSV columns).

Usage: python experiments/online.py [--quick] [--out DIR]
Writes DIR/online.csv and DIR/online.png (default DIR: experiments/out).
"""

import argparse

from pamjax.studies.reproduce import reproduce

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter simulated horizons")
    parser.add_argument("--out", default="experiments/out")
    args = parser.parse_args()
    reproduce("online", args.out, quick=args.quick)
