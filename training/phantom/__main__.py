"""python -m training.phantom {contact-sheet, sample, dataset, stats, slice}"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.phantom",
                                description="The labelled CT phantom (L3; T11 to S1 with "
                                            "--levels / --level).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("contact-sheet", help="phantom slices beside real CT (PNG)")
    c.add_argument("--output", type=Path, default=Path("docs/phantom_contact_sheet.png"))
    c.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="mid-L3 (lumbar) columns; --seeds alone: none")
    c.add_argument("--shared", type=Path, default=None,
                   help="folder of the real sample (default ../shared/data/totalseg-example)")
    c.add_argument("--torso", nargs="+", default=None, metavar="SEED:LEVEL[:MM]",
                   help="torso-anatomy columns instead of the default T11, T12, L1 ones: a "
                        "seed and a vertebra, optionally MM above the middle of its body "
                        "(e.g. 3:L5:19 near the L4-L5 disc, 3:L5)")
    s = sub.add_parser("sample", help="write the bundled sample CT and labels")
    s.add_argument("--output", type=Path, default=Path("Resources/Sample"))
    s.add_argument("--overwrite", action="store_true")
    d = sub.add_parser("dataset", help="write a phantom dataset with manifest.csv")
    d.add_argument("--output", type=Path, required=True)
    d.add_argument("--subjects", type=int, default=20)
    d.add_argument("--slices", type=int, default=6, help="slices per subject")
    d.add_argument("--gap", type=float, default=5.0, help="slice gap, mm")
    d.add_argument("--levels", nargs=2, metavar=("FROM", "TO"), default=None,
                   help="draw the torso anatomy and place each subject's stack within these "
                        "vertebral levels (at a height drawn from its seed), e.g. --levels "
                        "T11 L4 or T11 L5 (default: centred on mid-L3, lumbar anatomy)")
    d.add_argument("--spread", action="store_true",
                   help="with --levels: spread each subject's slices evenly from the bottom "
                        "of the lower level to the top of the upper one (no --gap)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--formats", nargs="+", default=["nrrd"], choices=["nrrd", "nifti", "dicom"])
    d.add_argument("--dicom-syntax", default="explicit",
                   choices=["explicit", "jpeg2000", "jpeg-lossless", "jpegls", "rle"])
    d.add_argument("--val-fraction", type=float, default=0.2)
    d.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("stats", help="phantom statistics beside real CT (markdown)")
    t.add_argument("--subjects", type=int, default=40)
    t.add_argument("--shared", type=Path, default=None)
    t.add_argument("--output", type=Path, default=None, help="also write the tables here")
    one = sub.add_parser("slice", help="render one slice to PNG (image and labels)")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--z", type=float, default=0.0,
                     help="height, mm from mid-L3 (with --level: above that vertebra's middle)")
    one.add_argument("--level", default=None,
                     help="a vertebra, T11 .. S1: draw the torso anatomy there")
    one.add_argument("--anatomy", choices=("lumbar", "torso"), default=None,
                     help="lumbar (default; around L3) or torso (T11 to S1)")
    one.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "contact-sheet":
            from .sheet import SHEET_SEEDS, UPPER_SHEET, make_contact_sheet, parse_torso_panel

            upper = (UPPER_SHEET if args.torso is None
                     else [parse_torso_panel(v) for v in args.torso])
            seeds = SHEET_SEEDS if args.seeds is None else args.seeds
            out = make_contact_sheet(args.output, seeds, args.shared, upper=upper)
            print(f"wrote {out}")
        elif args.command == "sample":
            from .dataset import write_sample

            for path in write_sample(args.output, overwrite=args.overwrite):
                print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        elif args.command == "dataset":
            from .dataset import write_dataset

            if args.spread and not args.levels:
                raise ValueError("--spread needs --levels")
            gap = None if args.spread else args.gap
            m = write_dataset(args.output, args.subjects, args.slices, args.seed, args.size,
                              args.formats, args.val_fraction, slice_gap_mm=gap,
                              dicom_syntax=args.dicom_syntax, overwrite=args.overwrite,
                              levels=args.levels)
            print(f"wrote {m}")
        elif args.command == "stats":
            from .report import report

            text = report(args.subjects, args.shared)
            print(text)
            if args.output is not None:
                args.output.write_text(text + "\n")
        elif args.command == "slice":
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            from .generate import make_slice
            from EPDSegmentationLib.io.overlay import overlay_rgb
            from .sheet import gray

            s = make_slice(args.seed, z_mm=args.z, anatomy=args.anatomy, level=args.level)
            fig, ax = plt.subplots(1, 2, figsize=(12, 6))
            ax[0].imshow(gray(s.hu), cmap="gray", vmin=0, vmax=1)
            ax[1].imshow(overlay_rgb(s.hu, s.labels))
            for a in ax:
                a.axis("off")
            fig.tight_layout()
            fig.savefig(args.output, dpi=100)
            print(f"wrote {args.output}")
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
