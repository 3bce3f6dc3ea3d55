"""Benchmark: ``epdseg segment`` end to end (read, predict, write every output) on CPU/GPU.

Side by side in one run:
  - a 512 x 512 x 100 volume with models at factors 1, 2 and 4 (ratios against factor 1);
  - one 512 x 512 slice at factor 2.
The models have the bundled model's architecture, read from its card
(Resources/Models/EPDBodyComp_f2.json: EPDNet, width 8), with random weights: speed and
memory do not depend on the weights; ``--width`` changes only the width. The volume is the
bundled sample CT (phantom, 16 slices) repeated to 100 slices. Each case runs in a fresh process; its time is the
pipeline (segment_case: read, infer, write .seg.nrrd x2, probability NRRD, CSV, PNG) after
imports and model load, and its peak memory the rise of peak RSS over that call (plus
torch.cuda.max_memory_allocated on a GPU). The process start (Python, torch import, model
load) is timed separately: it is what a one-off command adds.

    python Testing/benchmarks/bench_segment.py               # CPU
    python Testing/benchmarks/bench_segment.py --device cuda # GPU, when there is one
    python Testing/benchmarks/bench_segment.py --quick       # tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(field)


def bundled_architecture(width: Optional[int] = None):
    """The bundled model's ModelConfig, from its card; ``width`` replaces its width."""
    from dataclasses import replace

    from EPDSegmentationLib.core.model_card import ModelConfig, read_card
    from EPDSegmentationLib.core.resources import bundled_model_path

    config = ModelConfig.from_dict(read_card(bundled_model_path())["architecture"])
    return config if width is None else replace(config, width=width)


def make_inputs(folder: Path, slices: int, size: int, factors, config) -> dict:
    """The test volume (NRRD) and one model per factor (architecture ``config``, random
    weights, real file format)."""
    import torch

    from EPDSegmentationLib.io import read_volume, write_volume
    from EPDSegmentationLib.core.model import build_model
    from EPDSegmentationLib.core.model_card import make_card
    from EPDSegmentationLib.core.model_io import save_model
    from EPDSegmentationLib.core.resources import sample_ct_path
    from EPDSegmentationLib.core.volume import Volume
    from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS

    sample = read_volume(sample_ct_path())
    reps = -(-slices // sample.array.shape[0])
    arr = np.concatenate([sample.array] * reps)[:slices, :size, :size]
    write_volume(Volume(arr, sample.ijk_to_ras), folder / "volume.nrrd", dtype="int16")
    write_volume(Volume(arr[:1], sample.ijk_to_ras), folder / "slice.nrrd", dtype="int16")
    src = sample.spacing[0]
    models = {}
    for k in factors:
        torch.manual_seed(0)
        net = build_model(config)
        card = make_card(net.config.to_dict(), windows=DEFAULT_WINDOWS, factor=k,
                         label_mode="epd", image_mode="average", pixel_mm=(src * k, src * k),
                         input_size=(size // k, size // k),
                         training={"data": {}, "command": "benchmark", "seed": 0})
        save_model(folder / f"model_f{k}", net, card)
        models[k] = str(folder / f"model_f{k}.safetensors")
    return {"volume": str(folder / "volume.nrrd"), "slice": str(folder / "slice.nrrd"),
            "models": models}


def measure_here(case: str, model: str, device: str, batch: int, out: str) -> dict:
    t_start = time.perf_counter()
    import torch

    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.cli.segment import Case, segment_case

    net, card = load_model(model)
    startup = time.perf_counter() - t_start
    base = _rss_kb("VmRSS:")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = segment_case(Case("bench", Path(case)), Path(out), net, card, device=device,
                          batch_size=batch, overwrite=True)
    seconds = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(result.message)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return {"seconds": seconds, "startup": startup, "slices": len(result.slices),
            "peak_mib": (_rss_kb("VmHWM:") - base) / 1024, "gpu_mib": gpu,
            "device": result.device}


def measure(case: str, model: str, device: str, batch: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--one", case, model, out, "--device", device,
           "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--width", type=int, default=None,
                        help="network width (default: the bundled model's, from its card)")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="3 slices of 128 x 128, factors 1 and 2 (same architecture)")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_here(*args.one[:2], args.device, args.batch, args.one[2])))
        return
    if args.quick:
        args.slices, args.size, args.factors = 3, 128, [1, 2]

    import torch

    config = bundled_architecture(args.width)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = make_inputs(tmp, args.slices, args.size, args.factors, config)
        print(f"epdseg segment end to end: {args.size} x {args.size} x {args.slices} volume "
              f"(bundled sample repeated), the bundled model's architecture at width "
              f"{config.width}{'' if args.width is None else ' (--width)'}, batch {args.batch}, "
              f"device {args.device}; {os.cpu_count()} cores, torch {torch.__version__}; "
              f"each case in a fresh process")
        rows = {}
        for k in args.factors:
            rows[k] = measure(inputs["volume"], inputs["models"][k], args.device, args.batch,
                              str(tmp / f"out_f{k}"))
        k2 = 2 if 2 in args.factors else args.factors[-1]
        one = measure(inputs["slice"], inputs["models"][k2], args.device, args.batch,
                      str(tmp / "out_slice"))
    ref = rows[args.factors[0]]
    print(f"\n{'case':<26} {'seconds':>8} {'x f' + str(args.factors[0]):>6} {'s/slice':>8} "
          f"{'peak MiB':>9} {'x f' + str(args.factors[0]):>6} {'GPU MiB':>8} {'startup s':>9}")
    for k, r in rows.items():
        print(f"{f'volume, factor {k}':<26} {r['seconds']:8.2f} {r['seconds'] / ref['seconds']:6.2f}"
              f" {r['seconds'] / r['slices']:8.3f} {r['peak_mib']:9.1f}"
              f" {r['peak_mib'] / ref['peak_mib']:6.2f} {r['gpu_mib']:8.1f} {r['startup']:9.2f}")
    print(f"{f'one slice, factor {k2}':<26} {one['seconds']:8.2f} {'':>6} {one['seconds']:8.3f}"
          f" {one['peak_mib']:9.1f} {'':>6} {one['gpu_mib']:8.1f} {one['startup']:9.2f}")


if __name__ == "__main__":
    main()
