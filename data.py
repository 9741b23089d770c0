"""Datasplit command line: write a datasplit CSV for a CellMap root, or check one.

    python data.py write-csv --data-root DIR --out CSV [--classes all|quick|nuc,pm,...] [--max-scale NM]
                             [--val-fraction 0.15] [--seed 0]
    python data.py check-csv CSV

write-csv mirrors the official make-datasplit (class filter, scale filter, validation fraction), keeps crops
that overlap on one side (the official tool does not), and prints what it dropped or grouped and why. The reading, writing and validation rules are datasplit.py's; errors are one `error:`
line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from config_shenron import ALL_CLASSES, CLASS_SETS
from datasplit import SPLITS, read_datasplit, write_datasplit
from errors import DataError


def class_list(text: str) -> tuple[str, ...]:
    """--classes: a class set's name or a comma-separated list of the toolkit's classes."""
    if text in CLASS_SETS:
        return CLASS_SETS[text]
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in names if c not in ALL_CLASSES]
    if unknown or not names:
        raise DataError(f"--classes {text!r}: {', '.join(unknown) or 'no class'} is not one of the toolkit's classes "
                        f"({', '.join(ALL_CLASSES)}), nor all or quick")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CellMap datasplit and cache tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-csv", help="scan a CellMap root and write a datasplit CSV")
    w.add_argument("--data-root", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--classes", default="all",
                   help="classes to list: all (the toolkit's 14), quick (5), or a comma-separated list (default all)")
    w.add_argument("--max-scale", type=float, default=None,
                   help="keep a class array only if its voxel size is at most this many nm on every axis (the "
                        "official --scale filter; e.g. 8 leaves out crops labelled at 16-64 nm)")
    w.add_argument("--val-fraction", type=float, default=0.15, help="share of crops for validation (default 0.15)")
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check-csv", help="validate a datasplit CSV")
    c.add_argument("csv")
    args = p.parse_args(argv)
    try:
        if args.cmd == "write-csv":
            out = Path(args.out)
            if out.exists():
                raise DataError(f"{out} exists; choose another --out or delete it first")
            path, dropped = write_datasplit(args.data_root, out, args.val_fraction, args.seed, args.max_scale,
                                            class_list(args.classes))
            entries = read_datasplit(path)
            for line in dropped:
                print(line)
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