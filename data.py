"""Datasplit command line: write a datasplit CSV for a CellMap root, or check one.

    python data.py write-csv --data-root DIR --out CSV [--val-fraction 0.15] [--seed 0] [--max-scale NM]
    python data.py check-csv CSV

The reading, writing and validation rules are datasplit.py's; errors are one `error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from datasplit import SPLITS, read_datasplit, write_datasplit
from errors import DataError


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CellMap datasplit and cache tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-csv", help="scan a CellMap root and write a datasplit CSV")
    w.add_argument("--data-root", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--val-fraction", type=float, default=0.15)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-scale", type=float, default=None,
                   help="keep crops whose finest label voxel is at most this many nm")
    c = sub.add_parser("check-csv", help="validate a datasplit CSV")
    c.add_argument("csv")
    args = p.parse_args(argv)
    try:
        if args.cmd == "write-csv":
            out = Path(args.out)
            if out.exists():
                raise DataError(f"{out} exists; choose another --out or delete it first")
            path = write_datasplit(args.data_root, out, args.val_fraction, args.seed, args.max_scale)
            entries = read_datasplit(path)
            print(f"wrote {path}: " + ", ".join(f"{s} {sum(e.split == s for e in entries)}" for s in SPLITS))
        else:
            entries = read_datasplit(args.csv)
            print(f"{args.csv}: OK, " + ", ".join(f"{s} {sum(e.split == s for e in entries)}" for s in SPLITS))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())