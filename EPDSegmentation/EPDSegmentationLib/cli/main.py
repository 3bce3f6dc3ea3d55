"""The ``epdseg`` command line: ``segment`` CT cases (optionally with a cohort table),
``merge`` the cohort tables of shards, or run the EPD ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .. import __version__
from ..core.errors import EPDError
from ..core.heap import keep_freed_memory
from ..core.inference import DeviceError, select_device
from ..core.model_card import ModelFileError
from ..core.resources import bundled_model_path
from ..io.staging import check_output_folder
from . import cohort
from .adapt import add_arguments as add_adapt_arguments
from .cohort import parse_shard
from .options import add_mirror_argument
from .segment import find_cases, format_summary, segment_case


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
    seg.add_argument("--batch-size", type=int, default=8,
                     help="slices per network batch at factor 1; a factor-k model takes k^2 "
                          "times as many (the same pixels), up to a slab of 16")
    seg.add_argument("--overlay-slice", type=int, default=None,
                     help="slice shown in <case>_overlay.png (default: the middle one)")
    seg.add_argument("--dicom-seg", action="store_true",
                     help="also write DICOM SEG (binary and fractional); DICOM input only")
    seg.add_argument("--probabilities", action="store_true",
                     help="also write <case>_probabilities.nrrd, the float32 probabilities "
                          "(6 components; about 4 times the soft .seg.nrrd)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_mirror_argument(seg)
    cohort = seg.add_argument_group(
        "cohort", "one table for all cases (cohort.csv), levels, indices and shards; any of "
                  "these options writes the table (docs/cohort.md)")
    cohort.add_argument("--cohort", action="store_true",
                        help="write the cohort table even without the options below")
    cohort.add_argument("--level", default=None, type=str.upper,
                        choices=["T12", "L1", "L2", "L3", "L4", "L5"],
                        help="find this vertebral level and segment only there (a "
                             "single-slice input is taken as that level)")
    cohort.add_argument("--slab-mm", type=float, default=None,
                        help="with --level: every slice within this thickness (mm) around "
                             "the level's centre, instead of the one slice")
    cohort.add_argument("--height", default=None,
                        help="patient height for the indices, cm or m (172, 1.72, '172 cm'); "
                             "default: a manifest column height, else DICOM PatientSize")
    cohort.add_argument("--protocol", action="store_true",
                        help="also the HU-protocol areas (-29..150 HU muscle, -190..-30 IMAT "
                             "within the network's muscle; SAT/VAT within their HU ranges), "
                             "in the table and in each case's _bodycomp.csv")
    cohort.add_argument("--shard", default=None, metavar="I/N",
                        help="run shard I (0..N-1) of N; default: the SLURM array variables "
                             "when set. Writes cohort.shard-I-of-N.csv; join with 'merge'")

    mrg = sub.add_parser("merge", help="join the cohort.shard-*.csv tables of a folder",
                         description="Join the cohort tables of the shards of one run into "
                                     "one, reporting shards and cases missing or failed.")
    mrg.add_argument("folder", type=Path, help="the output folder the shards wrote into")
    mrg.add_argument("-o", "--output", type=Path, default=None,
                     help="merged table (default: FOLDER/cohort.csv)")
    mrg.add_argument("--overwrite", action="store_true", help="replace an existing table")

    demo = sub.add_parser("demo", help="EPD against nearest downsampling on a built-in label map")
    demo.add_argument("--output", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    demo.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    add_adapt_arguments(sub.add_parser(
        "adapt", help="fine-tune a model on slices you corrected (new model file)"))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM time-out, docker stop) turned into an interruption, handled as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def _segment(args) -> int:
    """``epdseg segment`` with SIGTERM handled as SIGINT (signal handlers can only be set
    in the main thread; elsewhere, e.g. a test's worker thread, SIGTERM keeps its default)."""
    import signal
    import threading

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    keep_freed_memory()     # our own process: reuse freed memory, do not fault it in again
    if threading.current_thread() is not threading.main_thread():
        return _segment_cases(args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _segment_cases(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _segment_cases(args) -> int:
    import signal

    from tqdm import tqdm

    from ..core.model_io import load_model

    check_output_folder(args.output)      # before any case: not after each inference
    cases = find_cases(args.inputs, strict=False, discover=args.series_uid is None)
    if _cohort_mode(args):
        return _segment_cohort(args, cases)
    if all(c.problem for c in cases):     # nothing to run at all: a usage error
        for c in cases:
            print(f"epdseg: error: {c.problem}", file=sys.stderr)
        return 2
    model_path = args.model if args.model is not None else bundled_model_path()
    device, reason = select_device(args.device)
    model, card = load_model(model_path, device="cpu")
    print(f"model {model_path} (factor 1/{card['factor']}, {card['label_mode']} labels); "
          f"device {device}: {reason}; {len(cases)} case(s)")
    provenance = {"command": " ".join(["epdseg"] + [str(a) for a in args.argv]),
                  "epdseg_version": __version__, "model_file": str(Path(model_path).resolve())}
    results = []
    current = None
    try:
        for case in tqdm(cases, desc="cases", unit="case", disable=len(cases) < 2):
            current = case
            bar = tqdm(desc=case.name, unit="slice", leave=False)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            try:
                result = segment_case(case, args.output, model, card, device=str(device),
                                      batch_size=args.batch_size, slices=args.slices,
                                      overwrite=args.overwrite, dicom_seg=args.dicom_seg,
                                      overlay_slice=args.overlay_slice,
                                      series_uid=args.series_uid, progress=progress,
                                      provenance=provenance, probabilities=args.probabilities,
                                      mirror=args.mirror)
            finally:
                bar.close()
            current = None
            if not result.ok:
                tqdm.write(f"epdseg: {case.name}: {result.message}", file=sys.stderr)
                if result.traceback:     # a bug: show where, then go on with the other cases
                    tqdm.write(result.traceback.rstrip(), file=sys.stderr)
            results.append(result)
    except KeyboardInterrupt as exc:      # Ctrl-C or SIGTERM: the case in progress is gone
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        name = signal.Signals(signum).name
        where = (f"case {current.name} was in progress and nothing of it was kept"
                 if current is not None else "between cases")
        print(f"\nepdseg: interrupted by {name} ({where}); {len(results)} of {len(cases)} "
              f"case(s) done", file=sys.stderr)
        if results:
            print("\n" + format_summary(results))
        print(f"outputs in {args.output}")
        return 128 + int(signum)
    print("\n" + format_summary(results))
    print(f"outputs in {args.output}")
    return 0 if all(r.ok for r in results) else 1


def _cohort_mode(args) -> bool:
    args.shard_ij = parse_shard(args.shard)
    return bool(args.cohort or args.level or args.height is not None or args.protocol
                or args.shard_ij is not None or args.slab_mm is not None)


def _segment_cohort(args, cases) -> int:
    """segment with a cohort table: per case the usual outputs, one row per case."""
    from tqdm import tqdm

    from ..core.model_io import load_model

    if args.slab_mm is not None and not args.level:
        raise ValueError("--slab-mm needs --level")
    if args.overlay_slice is not None:
        raise ValueError("--overlay-slice does not apply to a cohort: each case's overlay "
                         "shows the middle of the slices segmented (the level's slice)")
    if args.height is not None:
        from ..core.indices import height_m

        height_m(args.height, "--height")          # a bad value stops before any work
    shard = args.shard_ij
    table = args.output / cohort.table_name(shard)
    if table.exists() and not args.overwrite:
        raise FileExistsError(f"{table} already exists; pass --overwrite or another -o")
    mine = cohort.select_shard(cases, shard)
    model_path = args.model if args.model is not None else bundled_model_path()
    try:
        device, reason = select_device(args.device)
        model, card = load_model(model_path, device="cpu")
        version = cohort.model_version(model_path)
    except (ModelFileError, DeviceError) as exc:
        print(f"epdseg: error: {exc}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    if shard is not None:
        cohort.write_shard_plan(args.output, shard, [c.name for c in mine])
    where = ("" if shard is None
             else f" (shard {shard[0]} of {shard[1]}: {len(mine)} of {len(cases)})")
    print(f"model {model_path}; device {device}: {reason}; {len(mine)} case(s){where}")
    results, rows = [], []
    provenance = {"command": " ".join(["epdseg"] + [str(a) for a in args.argv]),
                  "epdseg_version": __version__, "model_file": str(Path(model_path).resolve())}
    for case in tqdm(mine, desc="cases", unit="case", disable=len(mine) < 2):
        result, row = cohort.run_case(
            case, args.output, model, card, level=args.level, slab_mm=args.slab_mm,
            height=args.height, protocol=args.protocol, device=str(device),
            batch_size=args.batch_size, overwrite=args.overwrite, series_uid=args.series_uid,
            shard=shard, model_version=version, dicom_seg=args.dicom_seg,
            probabilities=args.probabilities, provenance=provenance, mirror=args.mirror)
        if row["status"] != "ok":
            tqdm.write(f"epdseg: {case.name}: {row.get('message', '')}", file=sys.stderr)
        if result is not None:
            results.append(result)
        rows.append(row)
        cohort.write_table(rows, table)          # after every case: a killed job keeps its rows
    if not mine:
        cohort.write_table(rows, table)
    if results:
        print("\n" + format_summary(results))
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"cohort table {table}: {ok} ok, {len(rows) - ok} not ok; outputs in {args.output}")
    return 0 if ok == len(rows) else 1


def _merge(args) -> int:
    path, report = cohort.merge(args.folder, args.output, overwrite=args.overwrite)
    n_rows = len(cohort.read_table(path))
    print(cohort.format_merge_report(path, report, n_rows))
    bad = report["missing_shards"] or report["missing"] or report["failed"]
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns its exit code: 0 done, 1 some case failed, 2 a usage or
    setup error (ours: one line on stderr), 128 + signal when interrupted. An error that is
    not ours (a bug) is not caught: Python prints its traceback and exits 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv

    try:
        if args.command == "segment":
            return _segment(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "demo":
            from .demo import run

            run(args.output, args.factors, overwrite=args.overwrite)
        if args.command == "adapt":
            from .adapt import run as run_adapt

            return run_adapt(args, argv)
    except (EPDError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"epdseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:      # before or after the cases: nothing was half-done
        import signal

        signum = exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT)
        print(f"\nepdseg: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + int(signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
