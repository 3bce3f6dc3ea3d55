"""The ``epdseg`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="epdseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="EPD against nearest downsampling on a built-in label map")
    demo.add_argument("--output", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    demo.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run

            run(args.output, args.factors, overwrite=args.overwrite)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"epdseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
