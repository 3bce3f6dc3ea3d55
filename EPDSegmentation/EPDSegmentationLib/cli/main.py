"""The ``epdseg`` command line: ``segment`` CT cases, or run the EPD ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epdseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment", help="segment CT cases and write body-composition outputs",
        description="Segment muscle, IMAT, SAT, VAT and other tissue in CT cases. INPUT: a "
                    "DICOM series folder, a DICOM file, a NIfTI or NRRD volume, a manifest "
                    "(CSV/JSON with an image column) or a folder of such cases.")
    seg.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    seg.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    seg.add_argument("--model", type=Path, default=None,
                     help="model weights (.safetensors with its .json card); default: bundled")
    seg.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    seg.add_argument("--slices", default="all",
                     help="slices K to segment (0-based): all, 40-60, or 12,40-45,50")
    seg.add_argument("--series-uid", default=None,
                     help="SeriesInstanceUID to read when a DICOM folder holds several series")
    seg.add_argument("--batch-size", type=int, default=8)
    seg.add_argument("--overlay-slice", type=int, default=None,
                     help="slice shown in <case>_overlay.png (default: the middle one)")
    seg.add_argument("--dicom-seg", action="store_true",
                     help="also write DICOM SEG (binary and fractional); DICOM input only")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    demo = sub.add_parser("demo", help="EPD against nearest downsampling on a built-in label map")
    demo.add_argument("--output", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    demo.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    from .adapt import add_arguments as add_adapt_arguments   # issue 17: learn from corrections
    add_adapt_arguments(sub.add_parser(
        "adapt", help="fine-tune a model on slices you corrected (new model file)"))
    return parser


def _segment(args) -> int:
    from tqdm import tqdm

    from ..core.inference import DeviceError, select_device
    from ..core.model_card import ModelFileError
    from ..core.model_io import load_model
    from ..core.resources import bundled_model_path
    from .segment import find_cases, format_summary, segment_case

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    cases = find_cases(args.inputs, strict=False)
    if all(c.problem for c in cases):     # nothing to run at all: a usage error
        for c in cases:
            print(f"epdseg: error: {c.problem}", file=sys.stderr)
        return 2
    model_path = args.model if args.model is not None else bundled_model_path()
    try:
        device, reason = select_device(args.device)
        model, card = load_model(model_path, device="cpu")
    except (ModelFileError, DeviceError) as exc:
        print(f"epdseg: error: {exc}", file=sys.stderr)
        return 2
    print(f"model {model_path} (factor 1/{card['factor']}, {card['label_mode']} labels); "
          f"device {device}: {reason}; {len(cases)} case(s)")
    results = []
    for case in tqdm(cases, desc="cases", unit="case", disable=len(cases) < 2):
        bar = tqdm(desc=case.name, unit="slice", leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = segment_case(case, args.output, model, card, device=str(device),
                              batch_size=args.batch_size, slices=args.slices,
                              overwrite=args.overwrite, dicom_seg=args.dicom_seg,
                              overlay_slice=args.overlay_slice, series_uid=args.series_uid,
                              progress=progress)
        bar.close()
        if not result.ok:
            tqdm.write(f"epdseg: {case.name}: {result.message}", file=sys.stderr)
            if result.traceback:     # a bug: show where, then go on with the other cases
                tqdm.write(result.traceback.rstrip(), file=sys.stderr)
        results.append(result)
    print("\n" + format_summary(results))
    print(f"outputs in {args.output}")
    return 0 if all(r.ok for r in results) else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from ..io.errors import InputError

    try:
        if args.command == "segment":
            return _segment(args)
        if args.command == "demo":
            from .demo import run

            run(args.output, args.factors, overwrite=args.overwrite)
        if args.command == "adapt":
            from .adapt import run as run_adapt

            return run_adapt(args, argv)
    except (InputError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"epdseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
