"""``python -m training experiment``: the paper's experiment, as a resumable grid of runs.

    python -m training experiment --preset cpu --output runs/paper_cpu --jobs 2
    python -m training experiment --preset paper --output runs/paper --jobs 1   # a GPU
    python -m training experiment --preset cpu512 --output runs/paper_cpu512 --jobs 1  # 512 x 512, trimmed

Writes the phantom datasets once (``<output>/data/<set>/manifest.csv``), then trains every
configuration of the grid, each as its own ``python -m training train`` process (so its time
and peak memory are its own), in ``<output>/runs/<set>/<method>_f<k>_<aug>/seed<s>``. A run
that finished (its model card says so) is skipped, an interrupted one resumed, so the
command can be stopped and started again. ``python -m training report`` turns the runs into
the results page (training/report.py).

The grid (``grid``):
- main: the full-resolution baseline (factor 1), and at 1/2, 1/4, 1/8 the conventional
  method (nearest labels, bilinear images) and EPD (EPD labels, window-mean images), each
  with and without augmentation, for every seed;
- ablation: EPD labels with bilinear images, and nearest labels with window-mean images, at
  1/2, 1/4, 1/8 with augmentation, for every seed (which half carries the gain);
- large: the main configurations with augmentation on a larger phantom set, first seed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from training.phantom.dataset import write_dataset

from .logs import atomic_bytes

#: Presets: data (phantom subjects x slices at `size` pixels), training and seeds.
#: "paper" mirrors the paper (57 subjects x 6 slices of 512 x 512, 100 epochs, three seeds);
#: "cpu" is the same grid reduced to what two CPU cores train in a few hours (128 x 128
#: slices of the same bodies, so about 3 mm pixels; a narrower network; fewer epochs);
#: "cpu512" is the "cpu" preset (network, epochs, recipe, split, metrics) at the paper's
#: 512 x 512 (about 0.87 mm, resampled to the median spacing like "paper": network inputs 532,
#: 266, 133, 67), trimmed to an explicit, ordered list of runs (``runs``) that answers one
#: question on two CPU cores: does EPD's gain grow with the factor at the paper's resolution?
#: (the 1/8 and 1/4 pairs of seed 0 first, so the first hours already compare two factors,
#: then those of seed 1 for the spread, then 1/2 and the baseline once);
#: "smoke" checks the machinery in seconds (tests).
PRESETS: Dict[str, Dict[str, object]] = {
    "paper": dict(size=512, subjects=57, slices=6, large_subjects=334, epochs=100,
                  large_epochs=40, width=16, batch_size=8, lr=1e-3, seeds=(0, 1, 2)),
    "cpu": dict(size=128, subjects=57, slices=6, large_subjects=334, epochs=25,
                large_epochs=5, width=8, batch_size=8, lr=1e-3, seeds=(0, 1, 2)),
    "cpu512": dict(size=512, subjects=57, slices=6, large_subjects=334, epochs=25,
                   large_epochs=5, width=8, batch_size=8, lr=1e-3, seeds=(0, 1),
                   runs=tuple(f"small/{m}_f{k}_aug/seed{s}"
                              for k, s in ((8, 0), (4, 0), (8, 1), (4, 1), (2, 0))
                              for m in ("conventional", "epd"))
                   + ("small/baseline_f1_aug/seed0",)),
    "smoke": dict(size=64, subjects=5, slices=2, large_subjects=6, epochs=1,
                  large_epochs=1, width=4, batch_size=4, lr=1e-3, seeds=(0,)),
}
#: method -> (label mode, image mode)
METHODS: Dict[str, tuple] = {
    "baseline": ("epd", "average"),       # factor 1: both modes are the identity
    "conventional": ("nearest", "bilinear"),
    "epd": ("epd", "average"),
    "epd_labels": ("epd", "bilinear"),     # ablation: EPD labels only
    "epd_images": ("nearest", "average"),  # ablation: window-mean images only
}
GROUPS = ("main", "ablation", "large")
DOWN_FACTORS = (2, 4, 8)
#: Data seeds of the two phantom sets (different bodies).
DATA_SEEDS = {"small": 0, "large": 1}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    dataset: str  # "small" or "large"
    method: str
    factor: int
    augment: bool
    seed: int

    @property
    def config(self) -> str:
        return f"{self.method}_f{self.factor}_{'aug' if self.augment else 'noaug'}"

    @property
    def folder(self) -> str:
        return f"{self.dataset}/{self.config}/seed{self.seed}"


def spec_from_folder(folder: str) -> RunSpec:
    """'small/epd_f8_aug/seed0' -> its RunSpec (the inverse of RunSpec.folder)."""
    try:
        dataset, config, seed = folder.split("/")
        method, fac, aug = config.rsplit("_", 2)
        spec = RunSpec(dataset, method, int(fac[1:]), aug == "aug", int(seed[4:]))
    except ValueError:
        raise ValueError(f"not a run folder: {folder!r} (e.g. 'small/epd_f8_aug/seed0')") from None
    if spec.folder != folder or method not in METHODS or dataset not in DATA_SEEDS:
        raise ValueError(f"not a run folder: {folder!r} (e.g. 'small/epd_f8_aug/seed0')")
    return spec


def _group(spec: RunSpec) -> str:
    if spec.dataset == "large":
        return "large"
    return "ablation" if spec.method in ("epd_labels", "epd_images") else "main"


def grid(preset: Dict[str, object], groups: Sequence[str] = GROUPS,
         seeds: Optional[Sequence[int]] = None) -> List[RunSpec]:
    """The runs of the chosen groups, in the order they are started: the main grid seed by
    seed (so a partial result already has every configuration), then the ablations, then
    the larger set; the costly factor-1 runs first within each. A preset with ``runs`` (run
    folders) is that list, in its order, less the runs outside ``groups`` and ``seeds``."""
    if "runs" in preset:
        specs = [spec_from_folder(f) for f in preset["runs"]]
        return [s for s in specs if _group(s) in groups and (seeds is None or s.seed in seeds)]
    seeds = list(preset["seeds"] if seeds is None else seeds)
    main = [("baseline", 1)] + [(m, k) for k in DOWN_FACTORS for m in ("conventional", "epd")]
    runs: List[RunSpec] = []
    if "main" in groups:
        for s in seeds:
            for aug in (True, False):
                runs += [RunSpec("small", m, k, aug, s) for m, k in main]
    if "ablation" in groups:
        for s in seeds:
            runs += [RunSpec("small", m, k, True, s) for k in DOWN_FACTORS
                     for m in ("epd_labels", "epd_images")]
    if "large" in groups:
        runs += [RunSpec("large", m, k, True, seeds[0]) for m, k in main]
    return runs


def epochs_of(spec: RunSpec, preset: Dict[str, object]) -> int:
    return int(preset["large_epochs"] if spec.dataset == "large" else preset["epochs"])


def train_argv(spec: RunSpec, preset: Dict[str, object], manifest: Path, out: Path,
               device: str) -> List[str]:
    """The ``python -m training train`` arguments of one run."""
    label_mode, image_mode = METHODS[spec.method]
    epochs = epochs_of(spec, preset)
    argv = ["train", "--manifest", str(manifest), "--factor", str(spec.factor),
            "--label-mode", label_mode, "--image-mode", image_mode,
            "--width", str(preset["width"]), "--epochs", str(epochs),
            "--batch-size", str(preset["batch_size"]), "--lr", str(preset["lr"]),
            "--seed", str(spec.seed), "--output", str(out), "--device", device, "--quiet"]
    if not spec.augment:
        argv.append("--no-augment")
    return argv


def run_state(folder: Path, epochs: int) -> str:
    """'done' (model card of a run with these epochs), 'partial' (a checkpoint) or 'new'."""
    card = folder / "model.json"
    if card.exists():
        try:
            if json.loads(card.read_text())["training"]["epochs"] == epochs:
                return "done"
        except (ValueError, KeyError, TypeError):
            pass
    return "partial" if (folder / "checkpoint.pt").exists() else "new"


def write_datasets(out: Path, preset: Dict[str, object], names: Sequence[str]) -> Dict[str, Path]:
    """The phantom sets as files, written once; returns set -> manifest."""
    manifests = {}
    for name in names:
        folder = out / "data" / name
        manifest = folder / "manifest.csv"
        if not manifest.exists():
            n = preset["large_subjects"] if name == "large" else preset["subjects"]
            print(f"writing the {name} phantom set: {n} subjects x {preset['slices']} slices "
                  f"of {preset['size']} x {preset['size']}", file=sys.stderr)
            write_dataset(folder, int(n), int(preset["slices"]), seed=DATA_SEEDS[name],
                          size=int(preset["size"]), val_fraction=0.2, overwrite=True)
        manifests[name] = manifest
    return manifests


def _launch(spec: RunSpec, argv: List[str], folder: Path, threads: int) -> dict:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        log.write(f"$ python -m training {shlex.join(argv)}\n")
        log.flush()
        done = subprocess.run([sys.executable, "-m", "training"] + argv, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    return {"run": spec.folder, "returncode": done.returncode,
            "seconds": time.perf_counter() - t0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--output", type=Path, required=True, help="experiment folder")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    p.add_argument("--skip", nargs="+", default=[], metavar="PATTERN",
                   help="leave out runs whose folder matches (fnmatch), e.g. "
                        "'small/*_noaug/seed2' 'large/baseline_*'")
    p.add_argument("--epochs", type=int, help="override the preset's epochs (small set)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (OMP_NUM_THREADS; default: torch's choice, "
                        "or cores / jobs when --jobs > 1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> None:
    from tqdm import tqdm

    preset = dict(PRESETS[args.preset])
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
        preset["epochs"] = args.epochs
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {args.jobs}")
    out = Path(args.output)
    specs = [s for s in grid(preset, args.groups, args.seeds)
             if not any(fnmatch.fnmatchcase(s.folder, pat) for pat in args.skip)]
    if not specs:
        raise ValueError("no run left to do: --skip leaves out the whole grid")
    record = out / "experiment.json"
    # the run list is not a setting: a preset may grow runs and still resume its folder
    meta = {"preset": args.preset, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in preset.items() if k != "runs"},
            "runs": [s.folder for s in specs],
            "groups": list(args.groups), "seeds": sorted({s.seed for s in specs}),
            "skipped": list(args.skip),
            "command": "python -m training " + shlex.join(list(sys.argv[1:] if argv is None
                                                               else argv)),
            "data_seeds": DATA_SEEDS, "methods": {k: list(v) for k, v in METHODS.items()}}
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("preset") != args.preset or old.get("settings") != meta["settings"]:
            raise ValueError(f"{out} holds an experiment with other settings "
                             f"({old.get('preset')}: {old.get('settings')}); use another --output")

    states = {s: run_state(out / "runs" / s.folder, epochs_of(s, preset)) for s in specs}
    todo = [s for s in specs if states[s] != "done"]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to go "
          f"(preset {args.preset}, {args.jobs} at once)", file=sys.stderr)
    if args.dry_run:
        for s in specs:
            print(f"{states[s]:>8}  {s.folder}")
        return
    out.mkdir(parents=True, exist_ok=True)

    atomic_bytes(record, (json.dumps(meta, indent=2) + "\n").encode())
    manifests = write_datasets(out, preset, sorted({s.dataset for s in specs}))
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0)

    def one(spec: RunSpec) -> dict:
        folder = out / "runs" / spec.folder
        argv_ = train_argv(spec, preset, manifests[spec.dataset].resolve(), folder, args.device)
        if states[spec] == "partial":
            argv_.append("--resume")
        return _launch(spec, argv_, folder, threads)

    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool, \
            tqdm(total=len(todo), desc="runs", unit="run") as bar:
        for result in pool.map(one, todo):
            bar.update(1)
            if result["returncode"]:
                failed.append(result["run"])
                tqdm.write(f"FAILED {result['run']} (exit {result['returncode']}; see its "
                           f"train.log)", file=sys.stderr)
            else:
                tqdm.write(f"done {result['run']} in {result['seconds']:.0f} s", file=sys.stderr)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    print(f"all runs done; now: python -m training report --runs {out} --output docs/results",
          file=sys.stderr)


def iter_runs(out: Path) -> Iterator[tuple]:
    """(RunSpec, folder) of every finished run under an experiment folder."""
    for card in sorted((Path(out) / "runs").glob("*/*/seed*/model.json")):
        folder = card.parent
        yield spec_from_folder(folder.relative_to(Path(out) / "runs").as_posix()), folder


__all__ = ["PRESETS", "METHODS", "RunSpec", "grid", "spec_from_folder", "train_argv", "run_state", "iter_runs"]
