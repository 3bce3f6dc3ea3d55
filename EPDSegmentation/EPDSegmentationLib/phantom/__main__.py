"""python -m EPDSegmentationLib.phantom {contact-sheet, sample, dataset, stats, slice}"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m EPDSegmentationLib.phantom",
                                description="The labelled L3 CT phantom.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("contact-sheet", help="phantom slices beside real CT (PNG)")
    c.add_argument("--output", type=Path, default=Path("docs/phantom_contact_sheet.png"))
    c.add_argument("--seeds", type=int, nargs="+", default=None)
    c.add_argument("--shared", type=Path, default=None,
                   help="folder of the real sample (default ../shared/data/totalseg-example)")
    s = sub.add_parser("sample", help="write the bundled sample CT and labels")
    s.add_argument("--output", type=Path, default=Path("Resources/Sample"))
    s.add_argument("--overwrite", action="store_true")
    d = sub.add_parser("dataset", help="write a phantom dataset with manifest.csv")
    d.add_argument("--output", type=Path, required=True)
    d.add_argument("--subjects", type=int, default=20)
    d.add_argument("--slices", type=int, default=6, help="slices per subject")
    d.add_argument("--gap", type=float, default=5.0, help="slice gap, mm")
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
    one.add_argument("--z", type=float, default=0.0)
    one.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "contact-sheet":
            from .sheet import SHEET_SEEDS, make_contact_sheet

            out = make_contact_sheet(args.output, args.seeds or SHEET_SEEDS, args.shared)
            print(f"wrote {out}")
        elif args.command == "sample":
            from .dataset import write_sample

            for path in write_sample(args.output, overwrite=args.overwrite):
                print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        elif args.command == "dataset":
            from .dataset import write_dataset

            m = write_dataset(args.output, args.subjects, args.slices, args.seed, args.size,
                              args.formats, args.val_fraction, slice_gap_mm=args.gap,
                              dicom_syntax=args.dicom_syntax, overwrite=args.overwrite)
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
            from ..overlay import overlay_rgb
            from .sheet import _gray

            s = make_slice(args.seed, z_mm=args.z)
            fig, ax = plt.subplots(1, 2, figsize=(12, 6))
            ax[0].imshow(_gray(s.hu), cmap="gray", vmin=0, vmax=1)
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
