"""Benchmark: EPD of a 512 x 512 x 300 uint8 label volume (6 classes) at factors 2, 4, 8.

Side by side in one run, for each factor:
  copy floor      copying the input once and writing an output-sized float32 array
  EPD (1 thread)  EPDSegmentationLib.core.epd.epd_labels(workers=1)
  EPD (auto)      the same with its default threads
  one_hot+pool    torch: F.one_hot -> float -> avg_pool2d
  block_reduce    skimage.measure.block_reduce(labels == c, mean) per class
Time is the best of --repeat runs (wall clock, and the process's CPU time, which a busy
machine disturbs less); peak memory is the rise of the process's peak RSS during one call
(Linux /proc/self/clear_refs), input excluded. Ratios are against the copy floor. The issue's
targets are checked at the end of each factor: EPD within 3x of the floor, and at least 5x
faster than one_hot + avg_pool. The load average is printed, since other work on the machine
slows everything (the ratios, measured side by side, less so).

    python Testing/benchmarks/bench_epd.py            # full size (about 3 minutes on 2 cores)
    python Testing/benchmarks/bench_epd.py --quick    # a small volume, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def make_labels(shape, classes: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, classes, shape, dtype=np.uint8)


def methods(labels: np.ndarray, classes: int, k: int):
    """name -> callable; each returns its result so the work is not optimised away."""
    import torch
    import torch.nn.functional as F
    from skimage.measure import block_reduce

    from EPDSegmentationLib.core.epd import epd_labels

    out_shape = (labels.shape[0], classes, -(-labels.shape[1] // k), -(-labels.shape[2] // k))

    def floor():
        a = labels.copy()
        b = np.empty(out_shape, np.float32)
        b.fill(1.0)
        return a, b

    def one_hot_pool():
        t = torch.from_numpy(labels).long()
        oh = F.one_hot(t, classes).permute(0, 3, 1, 2).float()
        return F.avg_pool2d(oh, k, ceil_mode=True).numpy()

    def skimage_blocks():
        return np.stack([block_reduce(labels == c, (1, k, k), np.mean)
                         for c in range(classes)], axis=1).astype(np.float32)

    return {
        "copy floor": floor,
        "EPD (1 thread)": lambda: epd_labels(labels, classes, k, workers=1),
        "EPD (auto threads)": lambda: epd_labels(labels, classes, k),
        "one_hot+avg_pool": one_hot_pool,
        "block_reduce": skimage_blocks,
    }


def measure_here(name: str, shape, classes: int, k: int, repeat: int) -> dict:
    """Time (best of repeat) and peak RSS rise (MiB) of one method in this fresh process."""
    labels = make_labels(shape, classes)
    fn = methods(labels, classes, k)[name]
    gc.collect()
    base = _rss_kb("VmRSS:")
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        del result
    return {"time": best, "cpu": best_cpu, "peak_mib": (_rss_kb("VmHWM:") - base) / 1024}


def measure(name: str, shape, classes: int, k: int, repeat: int) -> dict:
    """Run measure_here in a fresh interpreter, so peak memory starts from a clean heap."""
    cmd = [sys.executable, __file__, "--one", name, "--shape", *map(str, shape),
           "--factors", str(k), "--repeat", str(repeat)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 64 x 8 volume, one repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--skip-slow", action="store_true", help="skip one_hot and block_reduce")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    classes = 6
    shape = tuple(args.shape) if args.shape else ((8, 64, 64) if args.quick else (300, 512, 512))
    repeat = 1 if args.quick else args.repeat
    if args.one:
        print(json.dumps(measure_here(args.one, shape, classes, args.factors[0], repeat)))
        return

    import torch

    from EPDSegmentationLib.core.epd import epd_labels

    print(f"labels {shape[1]} x {shape[2]} x {shape[0]} uint8, {classes} classes; "
          f"{os.cpu_count()} cores, numpy {np.__version__}, torch {torch.__version__}, "
          f"best of {repeat}; each method in a fresh process")
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    labels = make_labels(shape, classes)
    names = ["copy floor", "EPD (1 thread)", "EPD (auto threads)"]
    if not args.skip_slow:
        names += ["one_hot+avg_pool", "block_reduce"]
    for k in args.factors:
        # the methods must agree before their times mean anything
        ref = epd_labels(labels, classes, k)
        for name in names[3:]:
            np.testing.assert_allclose(methods(labels, classes, k)[name](), ref, atol=1e-6)
        print(f"\nfactor {k}: output {(shape[0], classes) + tuple(-(-n // k) for n in shape[1:])}")
        print(f"  {'method':<20} {'time s':>8} {'x floor':>8} {'cpu s':>8} {'x floor':>8} "
              f"{'peak MiB':>9} {'x floor':>8}")
        results = {name: measure(name, shape, classes, k, repeat) for name in names}
        floor = results["copy floor"]
        t0, c0, m0 = floor["time"], floor["cpu"], floor["peak_mib"]
        for name, r in results.items():
            print(f"  {name:<20} {r['time']:8.3f} {r['time'] / t0:8.2f} {r['cpu']:8.3f} "
                  f"{r['cpu'] / c0:8.2f} {r['peak_mib']:9.1f} "
                  f"{r['peak_mib'] / m0 if m0 > 0 else float('nan'):8.2f}")
        if not args.skip_slow:
            for name in names[3:]:
                for ours in names[1:3]:
                    print(f"  {name} / {ours}: {results[name]['time'] / results[ours]['time']:.1f}x")
        ours = min(names[1:3], key=lambda n: results[n]["time"])
        ratio = results[ours]["time"] / t0
        print(f"  target, within 3x of the floor: {ours} {ratio:.2f}x -> "
              f"{'met' if ratio <= 3 else 'NOT met'}")
        if not args.skip_slow:
            speedup = results["one_hot+avg_pool"]["time"] / results[ours]["time"]
            print(f"  target, 5x faster than one_hot+avg_pool: {speedup:.1f}x -> "
                  f"{'met' if speedup >= 5 else 'NOT met'}")
        del ref
    print("\nload average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
